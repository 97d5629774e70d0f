"""gRPC server assembly: servicer, health, reflection, metrics endpoint, lifecycle.

Start-up order suits Kubernetes: the port binds first and health answers NOT_SERVING (overall
and per model) while weights load; each model turns SERVING when ready, and the overall status
once all are. On stop, health turns NOT_SERVING (the port stays open, so probes see it), new inference calls
get UNAVAILABLE, accepted ones get `grace_period_s` to finish, then engines drain and stop
(all together). An engine process that has used up its restarts keeps its models NOT_SERVING;
with `exit_on_engine_failure`, `serve_until` then ends with `EngineGaveUp` (the CLI exits 3).
"""

from __future__ import annotations

import asyncio
import logging
import time
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import start_http_server

from bitserve.api import checks, reflection, security, undecodable
from bitserve.api.admin import AdminServicer
from bitserve.api.openai import HttpServer
from bitserve.api.servicer import InferenceServicer
from bitserve.frontend.base import Engine
from bitserve.frontend.registry import ModelRegistry
from bitserve.frontend.tenants import Tenants
from bitserve.ipc.client import EngineGaveUp, sweep_stale_dirs
from bitserve.metrics import Metrics
from bitserve.settings import Settings
from bitserve_proto.v1 import inference_pb2 as pb
from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class _CancelledWriteIsDebug(logging.Filter):
    """grpc.aio logs at ERROR, with a traceback, a stream message whose send fails because the
    caller has just cancelled (its core has not yet marked the call closed: a race inside grpc,
    grpc/grpc#32551). The caller is gone and the call is counted CANCELLED; this is debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("ExecuteBatchError raised in core by servicer method"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("grpc._cython.cygrpc").addFilter(_CancelledWriteIsDebug())

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.registry = ModelRegistry(settings, self.metrics)
        self.tenants = Tenants(settings.server.tenants, self.metrics)
        self.health = HealthServicer()
        self.gate = checks.Gate(settings)  # shutdown and in-flight calls, for both fronts
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.openai_port: int | None = None
        self._openai: HttpServer | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: WSGIServer | None = None
        self._loading: asyncio.Task[None] | None = None
        self.servicer: InferenceServicer | None = None
        self._failed: asyncio.Future[None] | None = None  # set when an engine gives up (and we exit)

    async def start(self, *, wait_until_loaded: bool = True) -> None:
        s = self.settings.server
        entries = security.load_token_tenants(s)
        tokens = [t for t, _ in entries]
        credentials = security.server_credentials(s)
        sweep_stale_dirs()  # what a front killed with -9 left behind
        self._failed = asyncio.get_running_loop().create_future()
        self._grpc = grpc.aio.server(
            interceptors=[security.TokenAuth(tokens, protect_health=s.auth_health)] if tokens else None,
            options=[
                # A request over the byte budget is refused by gRPC itself, before it is parsed
                # into Python objects (RESOURCE_EXHAUSTED: "Received message larger than max").
                ("grpc.max_receive_message_length", s.max_request_bytes),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.servicer = InferenceServicer(
            self.settings,
            self.registry,
            self.metrics,
            self.gate,
            tenants=self.tenants,
            tenant_of=security.TenantOf(entries),
        )
        undecodable.add_servicer(pb_grpc.add_InferenceServicer_to_server, self.servicer, self._grpc)
        admin = AdminServicer(self.registry, expose_paths=s.expose_model_paths)
        undecodable.add_servicer(pb_grpc.add_AdminServicer_to_server, admin, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        if s.reflection:
            reflection.enable(
                (
                    SERVICE_NAME,
                    ADMIN_SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                ),
                self._grpc,
            )
        address = f"{s.host}:{s.port}"
        if credentials is not None:
            self.port = self._grpc.add_secure_port(address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {s.host}:{s.port}")
        if s.metrics_port >= 0:
            self._http, _ = start_http_server(
                s.metrics_port, addr=s.metrics_host or s.host, registry=self.metrics.registry
            )
            self.metrics_port = self._http.server_port
        if s.openai_port is not None:
            self._openai = HttpServer(self.settings, self.registry, self.metrics, self.gate)
            self.openai_port = await self._openai.start()
        for name in ("", SERVICE_NAME, *(m.name for m in self.settings.models)):
            await self.health.set(name, _NOT_SERVING)
        await self._grpc.start()
        log.info(
            "gRPC listening on %s:%d (%s%s); metrics on %s:%s",
            s.host,
            self.port,
            "TLS" if credentials else "plaintext",
            ", bearer tokens required" if tokens else "",
            s.metrics_host or s.host,
            self.metrics_port,
        )
        if self.openai_port is not None:
            log.info("OpenAI-compatible HTTP on %s:%d", s.host, self.openai_port)
        self._loading = asyncio.get_running_loop().create_task(self._load())
        if wait_until_loaded:
            await self._loading

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()

        def ready(engine: Engine) -> None:
            loop.create_task(self.health.set(engine.name, _SERVING))

        def engine_state(names: list[str], serving: bool) -> None:
            # An engine process died (NOT_SERVING until it is back) or came back.
            async def update() -> None:
                status = _SERVING if serving else _NOT_SERVING
                for name in names:
                    await self.health.set(name, status)
                everything = serving and all(c.ready for c in self.registry.cores)
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, _SERVING if everything else _NOT_SERVING)

            loop.create_task(update())

        self.registry.on_state = engine_state

        def gave_up(message: str) -> None:
            if self.settings.server.exit_on_engine_failure and self._failed and not self._failed.done():
                self._failed.set_exception(EngineGaveUp(message))

        self.registry.on_give_up = gave_up

        await self.registry.load_all(on_loaded=ready)
        for name in (*(m.name for m in self.settings.models), "", SERVICE_NAME):
            await self.health.set(name, _SERVING)
        log.info("all %d models serving", len(self.settings.models))

    async def wait_loaded(self) -> None:
        if self._loading is not None:
            await self._loading

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then stop. The listener stays open through the grace period so that a load
        balancer sees health NOT_SERVING and new inference calls get UNAVAILABLE, while accepted
        calls finish; it closes once none is left, or when the grace period ends."""
        grace = self.settings.server.grace_period_s if grace is None else grace
        end = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        self.gate.draining = True
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        while self.gate.inflight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if self._grpc is not None:
            await self._grpc.stop(max(end - time.monotonic(), 0.0))
        if self._openai is not None:
            await self._openai.stop()
            self._openai = None
        await self.registry.stop_all()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; a model that fails to load ends serving with its error, and
        so does an engine that gave up when `exit_on_engine_failure` is on (EngineGaveUp)."""
        waiter = asyncio.ensure_future(stop.wait())
        pending = {waiter} | {t for t in (self._loading, self._failed) if t is not None}
        while waiter in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and task.exception() is not None:
                    waiter.cancel()
                    raise task.exception()  # type: ignore[misc]
