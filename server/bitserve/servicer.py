"""Thin RPC methods: validate/convert -> registry -> engine -> convert.

Errors are mapped to gRPC statuses in one place (`_Call.__aexit__`): typed `BitserveError`s keep
their code and message; anything else is logged with context and becomes INTERNAL. Either way
the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from bitserve_client.pb.bitserve.v1 import inference_pb2 as pb
from bitserve_client.pb.bitserve.v1 import inference_pb2_grpc as pb_grpc

from . import convert
from .engines.base import ClassifyEngine, GenerateEngine, SentimentEngine, TranslateEngine
from .errors import BitserveError
from .metrics import Metrics
from .registry import ModelRegistry
from .settings import Settings
from .types import Task

log = logging.getLogger(__name__)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class _Call:
    """Per-RPC bookkeeping: status mapping, request counter and duration histogram."""

    def __init__(
        self, metrics: Metrics, context: grpc.aio.ServicerContext, task: Task, method: str, model: str
    ):
        self.metrics, self.context, self.task, self.method = metrics, context, task, method
        self.model = model  # replaced by the resolved engine's name
        self._start = 0.0

    async def __aenter__(self) -> _Call:
        self._start = time.perf_counter()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        code = grpc.StatusCode.OK
        message = ""
        if exc is None:
            pass
        elif isinstance(exc, BitserveError):
            code, message = exc.code, exc.message
        elif isinstance(exc, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        elif isinstance(exc, grpc.aio.AbortError):
            code = self.context.code() or grpc.StatusCode.UNKNOWN
        else:
            log.error("%s on model %r failed", self.method, self.model, exc_info=exc)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error in {self.method}: {type(exc).__name__}: {exc}"
        self.metrics.requests.labels(self.model, self.task.value, self.method, code.name).inc()
        self.metrics.request_duration.labels(self.model, self.task.value, self.method).observe(
            time.perf_counter() - self._start
        )
        if message:
            await self.context.abort(code, message)  # raises AbortError: ends the RPC


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics):
        self._server = settings.server
        self._registry = registry
        self._metrics = metrics

    def _call(self, context, task: Task, method: str, model: str) -> _Call:
        return _Call(self._metrics, context, task, method, model)

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        async with self._call(context, Task.GENERATE, "Generate", request.model) as call:
            engine = self._registry.get(Task.GENERATE, request.model, GenerateEngine)
            call.model = engine.name
            texts = convert.texts_from(request.texts, self._server)
            params = convert.sampling_from(request.parameters, engine.settings.default_max_new_tokens)
            gens = await engine.generate(texts, params, deadline=_deadline(context))
            return convert.generate_response(engine.name, gens)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with self._call(context, Task.GENERATE, "GenerateStream", request.model) as call:
            engine = self._registry.get(Task.GENERATE, request.model, GenerateEngine)
            call.model = engine.name
            (text,) = convert.texts_from(request.texts, self._server, exactly_one=True)
            params = convert.sampling_from(request.parameters, engine.settings.default_max_new_tokens)
            stream = engine.generate_stream(text, params, deadline=_deadline(context))
            try:
                async for chunk in stream:
                    yield convert.stream_response(engine.name, chunk)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        async with self._call(context, Task.CLASSIFY, "Classify", request.model) as call:
            engine = self._registry.get(Task.CLASSIFY, request.model, ClassifyEngine)
            call.model = engine.name
            texts = convert.texts_from(request.texts, self._server)
            results = await engine.classify(
                texts,
                top_k=request.top_k or None,
                candidate_labels=convert.candidate_labels_from(request.candidate_labels),
                deadline=_deadline(context),
            )
            return convert.classify_response(engine.name, results, engine.multi_label)

    async def Sentiment(self, request: pb.SentimentRequest, context) -> pb.SentimentResponse:
        async with self._call(context, Task.SENTIMENT, "Sentiment", request.model) as call:
            engine = self._registry.get(Task.SENTIMENT, request.model, SentimentEngine)
            call.model = engine.name
            texts = convert.texts_from(request.texts, self._server)
            results = await engine.sentiment(texts, deadline=_deadline(context))
            return convert.sentiment_response(engine.name, results)

    async def Translate(self, request: pb.TranslateRequest, context) -> pb.TranslateResponse:
        async with self._call(context, Task.TRANSLATE, "Translate", request.model) as call:
            engine = self._registry.get(Task.TRANSLATE, request.model, TranslateEngine)
            call.model = engine.name
            texts = convert.texts_from(request.texts, self._server)
            results = await engine.translate(
                texts,
                source_lang=request.source_lang or None,
                target_lang=request.target_lang or None,
                max_new_tokens=request.max_new_tokens or None,
                deadline=_deadline(context),
            )
            return convert.translate_response(engine.name, results)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[convert.model_info_pb(e.info()) for e in self._registry.engines()]
        )
