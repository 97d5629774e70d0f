"""The Admin service (bitserve.v1.Admin): LoRA adapters loaded and unloaded at run time.

Thin RPC methods: resolve the model -> frontend/adapters.py -> convert. Errors map to statuses
as the inference calls' do (typed `BitserveError`s keep their code). The token auth, when the
server has one, covers this service like every other.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from bitserve.api import convert
from bitserve.errors import BitserveError, InvalidArgument, clip_message
from bitserve.frontend import adapters
from bitserve.frontend.registry import ModelRegistry
from bitserve_proto.v1 import inference_pb2 as pb
from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

R = TypeVar("R")


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, registry: ModelRegistry, *, expose_paths: bool = True):
        self._registry = registry
        self._paths = expose_paths

    async def _run(self, context: grpc.aio.ServicerContext, method: str, fn: Callable[[], Awaitable[R]]) -> R:
        try:
            return await fn()
        except BitserveError as e:
            await context.abort(grpc.StatusCode[e.code], clip_message(e.message))
        except Exception as e:
            log.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, clip_message(f"{method}: {type(e).__name__}: {e}"))
        raise AssertionError("unreachable")  # abort raises

    def _model(self, name: str):  # type: ignore[no-untyped-def]
        if not name:
            raise InvalidArgument("model is empty: name the model the adapter is for")
        return self._registry.model(name)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.LoadAdapterResponse:
        async def run() -> pb.LoadAdapterResponse:
            entry = await adapters.load(self._model(request.model), request.name, request.path)
            return pb.LoadAdapterResponse(adapter=convert.adapter_info_pb(entry, with_path=self._paths))

        return await self._run(context, "LoadAdapter", run)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.UnloadAdapterResponse:
        async def run() -> pb.UnloadAdapterResponse:
            running = await adapters.unload(self._model(request.model), request.name)
            return pb.UnloadAdapterResponse(running=running)

        return await self._run(context, "UnloadAdapter", run)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        async def run() -> pb.ListAdaptersResponse:
            engines = [self._model(request.model)] if request.model else self._registry.engines()
            out = pb.ListAdaptersResponse()
            for e in engines:
                if not adapters.serves_adapters(e) or not e.core.ready:
                    continue
                listed = await adapters.listing(e)
                out.models[e.name].adapters.extend(
                    convert.adapter_info_pb(a, with_path=self._paths) for a in listed
                )
            return out

        return await self._run(context, "ListAdapters", run)
