"""gRPC server assembly: servicer, health, reflection, metrics endpoint, lifecycle.

Start-up order suits Kubernetes: the port binds first and health answers NOT_SERVING (overall
and per model) while weights load; each model turns SERVING when ready, and the overall status
once all are. On stop, health turns NOT_SERVING, new calls are refused, accepted ones get
`grace_period_s` to finish, then engines drain and stop.
"""

from __future__ import annotations

import asyncio
import logging
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from bitserve_client.pb.bitserve.v1 import inference_pb2 as pb
from bitserve_client.pb.bitserve.v1 import inference_pb2_grpc as pb_grpc

from .engines.base import Engine
from .metrics import Metrics
from .registry import ModelRegistry
from .servicer import InferenceServicer
from .settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.registry = ModelRegistry(settings, self.metrics)
        self.health = HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: WSGIServer | None = None
        self._loading: asyncio.Task[None] | None = None

    async def start(self, *, wait_until_loaded: bool = True) -> None:
        s = self.settings.server
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self.settings, self.registry, self.metrics), self._grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._grpc,
        )
        self.port = self._grpc.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {s.host}:{s.port}")
        if s.metrics_port >= 0:
            self._http, _ = start_http_server(s.metrics_port, addr=s.host, registry=self.metrics.registry)
            self.metrics_port = self._http.server_port
        for name in ("", SERVICE_NAME, *(m.name for m in self.settings.models)):
            await self.health.set(name, _NOT_SERVING)
        await self._grpc.start()
        log.info("gRPC listening on %s:%d; metrics on %s", s.host, self.port, self.metrics_port)
        self._loading = asyncio.get_running_loop().create_task(self._load())
        if wait_until_loaded:
            await self._loading

    async def _load(self) -> None:
        def ready(engine: Engine) -> None:
            asyncio.get_running_loop().create_task(self.health.set(engine.name, _SERVING))

        await self.registry.load_all(on_loaded=ready)
        for name in (*(m.name for m in self.settings.models), "", SERVICE_NAME):
            await self.health.set(name, _SERVING)
        log.info("all %d models serving", len(self.settings.models))

    async def wait_loaded(self) -> None:
        if self._loading is not None:
            await self._loading

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.server.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.registry.stop_all()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; a model that fails to load ends serving with its error."""
        waiter = asyncio.ensure_future(stop.wait())
        pending = {waiter} | ({self._loading} if self._loading is not None else set())
        while waiter in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and task.exception() is not None:
                    waiter.cancel()
                    raise task.exception()  # type: ignore[misc]
