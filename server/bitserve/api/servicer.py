"""Thin RPC methods: validate/convert -> registry -> engine -> convert.

Errors are mapped to gRPC statuses in one place (`_Call.__aexit__`): typed `BitserveError`s keep
their code and message; anything else is logged with context and becomes INTERNAL. Either way
the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import bitserve
from bitserve.api import checks, convert
from bitserve.errors import BitserveError, InvalidArgument, Unavailable, clip_message
from bitserve.frontend import tokens
from bitserve.frontend.base import ClassifyEngine, Engine, GenerateEngine, SentimentEngine, TranslateEngine
from bitserve.frontend.context import current_client
from bitserve.frontend.registry import ModelRegistry
from bitserve.frontend.tenants import Tenant, Tenants, current_tenant, fairness_key
from bitserve.metrics import Metrics
from bitserve.settings import Settings
from bitserve.types import SamplingParams, Task, TokenPrompt
from bitserve_client import contract
from bitserve_proto.v1 import inference_pb2 as pb
from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEADLINE_SLACK_S = 0.05


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


UNRESOLVED_MODEL = checks.UNRESOLVED_MODEL


async def _stream(
    engine: GenerateEngine, text: str | TokenPrompt, params: SamplingParams, context: grpc.aio.ServicerContext
) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
    """A generation's chunks as stream messages; closing it ends the generation on the engine."""
    stream = engine.generate_stream(text, params, deadline=_deadline(context))
    try:
        async for chunk in stream:
            yield convert.stream_response(engine.name, chunk)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def _retry_info(code: grpc.StatusCode, message: str, retry_after: float | None) -> tuple:
    """`grpc-status-details-bin` trailing metadata holding a google.rpc.RetryInfo, when the
    error says when to retry (a tenant's limit); else no metadata."""
    if retry_after is None:
        return ()
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(retry_after), nanos=int((retry_after % 1) * 1e9))
        )
    )
    status = status_pb2.Status(code=code.value[0], message=message, details=[info])
    return tuple(rpc_status.to_status(status).trailing_metadata)


class _Call:
    """Per-RPC bookkeeping: admission, status mapping, request counter and duration histogram."""

    def __init__(
        self, servicer: InferenceServicer, context: grpc.aio.ServicerContext, task: Task, method: str
    ):
        self.servicer, self.context, self.task, self.method = servicer, context, task, method
        self.model = UNRESOLVED_MODEL  # replaced by the resolved engine's name
        self.tenant: Tenant | None = None
        self._start = 0.0

    async def __aenter__(self) -> _Call:
        self._start = time.perf_counter()
        self.servicer.gate.inflight += 1
        metadata = self.context.invocation_metadata() or ()
        md = dict(metadata)
        tenants = self.servicer._tenants
        self.tenant = tenants.get(self.servicer._tenant_of(metadata)) if tenants else None
        current_tenant.set(self.tenant)
        caller = str(md.get("x-client-id") or self.context.peer() or "")
        current_client.set(fairness_key(self.tenant.name if self.tenant else None, caller))
        return self

    def begin(self, request) -> str:
        """Checks made before any work: shutdown, the byte budget, the model name."""
        if self.servicer.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        if self.tenant is not None:
            self.tenant.admit_call()
        name = self.servicer.gate.begin(request.ByteSize(), request.model)
        self.model = self.servicer.gate.label(name)
        return name

    def _expired(self) -> bool:
        # grpc's own deadline cancel can reach the handler a hair before its clock reads 0.
        remaining = self.context.time_remaining()
        return remaining is not None and remaining <= DEADLINE_SLACK_S

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        self.servicer.gate.inflight -= 1
        code = grpc.StatusCode.OK
        message = ""
        retry_after: float | None = None
        if exc is None:
            pass
        elif isinstance(exc, BitserveError):
            code, message = grpc.StatusCode[exc.code], clip_message(exc.message)
            retry_after = exc.retry_after
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            # GeneratorExit: grpc closed a stream whose caller left.
            code = grpc.StatusCode.CANCELLED
        elif isinstance(exc, grpc.aio.AbortError):
            code = self.context.code() or grpc.StatusCode.UNKNOWN
        elif self.context.cancelled():
            log.debug("%s on model %r ended after its caller left", self.method, self.model, exc_info=exc)
        else:
            log.error("%s on model %r failed", self.method, self.model, exc_info=exc)
            code = grpc.StatusCode.INTERNAL
            message = clip_message(f"internal error in {self.method}: {type(exc).__name__}: {exc}")
        gone = exc is not None and (self.context.cancelled() or isinstance(exc, GeneratorExit))
        if gone or (code == grpc.StatusCode.CANCELLED and self._expired()):
            # The caller cancelled or its deadline passed: nobody reads a status now, and aborting
            # a finished RPC fails inside grpc. Count what happened; end quietly.
            code = grpc.StatusCode.DEADLINE_EXCEEDED if self._expired() else grpc.StatusCode.CANCELLED
            message = ""
        metrics = self.servicer._metrics
        metrics.requests.labels(self.model, self.task.value, self.method, code.name).inc()
        self.servicer._tenants.count(self.tenant, code.name)
        metrics.request_duration.labels(self.model, self.task.value, self.method, code.name).observe(
            time.perf_counter() - self._start
        )
        if message:
            # raises AbortError: ends the RPC
            await self.context.abort(code, message, trailing_metadata=_retry_info(code, message, retry_after))
        # A caller that left needs no error raised to grpc (it would log it); cancellation itself
        # propagates, as asyncio expects.
        return gone and not isinstance(exc, (asyncio.CancelledError, GeneratorExit))


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        metrics: Metrics,
        gate: checks.Gate | None = None,
        *,
        tenants: Tenants | None = None,
        tenant_of: Callable[[Any], str | None] | None = None,
    ):
        """`tenant_of`: the tenant named by a call's metadata (its bearer token), or None."""
        self._tenants = tenants if tenants is not None else Tenants({})
        self._tenant_of = tenant_of or (lambda metadata: None)
        self._server = settings.server
        self._registry = registry
        self._metrics = metrics
        self.gate = gate or checks.Gate(settings)  # shared with the HTTP front, when it runs

    @property
    def inflight(self) -> int:
        """Inference calls accepted and not yet answered (on both fronts)."""
        return self.gate.inflight

    @property
    def draining(self) -> bool:
        return self.gate.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.gate.draining = value

    def _call(self, context, task: Task, method: str) -> _Call:
        return _Call(self, context, task, method)

    def _params(self, request: pb.GenerateRequest | pb.ChatRequest, engine: GenerateEngine) -> SamplingParams:
        params = convert.sampling_from(
            request.parameters, engine.settings.default_max_new_tokens, self._server.max_stop_chars
        )
        return convert.with_adapter(params, request.adapter)

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse | None:
        async with self._call(context, Task.GENERATE, "Generate") as call:
            name = call.begin(request)
            engine = self._registry.get(Task.GENERATE, name, GenerateEngine)
            call.model = engine.name
            texts = convert.texts_from(request.texts, self._server)
            convert.check_fits_queue(len(texts), engine.name, engine.settings.max_queue_size)
            params = self._params(request, engine)
            gens = await engine.generate(texts, params, deadline=_deadline(context))
            return convert.generate_response(engine.name, gens)
        return None  # the caller left (cancelled, deadline): nothing to answer

    async def GenerateStream(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with self._call(context, Task.GENERATE, "GenerateStream") as call:
            name = call.begin(request)
            engine = self._registry.get(Task.GENERATE, name, GenerateEngine)
            call.model = engine.name
            (text,) = convert.texts_from(request.texts, self._server, exactly_one=True)
            params = self._params(request, engine)
            async with contextlib.aclosing(_stream(engine, text, params, context)) as messages:
                async for message in messages:
                    yield message

    async def _chat_prompt(self, request: pb.ChatRequest, engine: GenerateEngine) -> TokenPrompt:
        return await checks.chat_prompt(engine, [(m.role, m.content) for m in request.messages], self._server)

    async def Chat(self, request: pb.ChatRequest, context) -> pb.ChatResponse | None:
        async with self._call(context, Task.GENERATE, "Chat") as call:
            name = call.begin(request)
            engine = self._registry.get(Task.GENERATE, name, GenerateEngine)
            call.model = engine.name
            params = self._params(request, engine)
            prompt = await self._chat_prompt(request, engine)
            gens = await engine.generate([prompt], params, deadline=_deadline(context))
            return convert.chat_response(engine.name, gens)
        return None  # the caller left (cancelled, deadline): nothing to answer

    async def ChatStream(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with self._call(context, Task.GENERATE, "ChatStream") as call:
            name = call.begin(request)
            engine = self._registry.get(Task.GENERATE, name, GenerateEngine)
            call.model = engine.name
            params = self._params(request, engine)
            prompt = await self._chat_prompt(request, engine)
            async with contextlib.aclosing(_stream(engine, prompt, params, context)) as messages:
                async for message in messages:
                    yield message

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse | None:
        async with self._call(context, Task.CLASSIFY, "Classify") as call:
            name = call.begin(request)
            labels = convert.candidate_labels_from(request.candidate_labels, self._server)
            engine = self._registry.get(Task.CLASSIFY, name, ClassifyEngine)
            call.model = engine.name
            texts = convert.texts_from(request.texts, self._server)
            convert.check_fits_queue(len(texts), engine.name, engine.settings.max_queue_size)
            results = await engine.classify(
                texts,
                top_k=request.top_k or None,
                candidate_labels=labels,
                deadline=_deadline(context),
                adapter=convert.adapter_from(request.adapter),
            )
            return convert.classify_response(engine.name, results, engine.multi_label)
        return None  # the caller left (cancelled, deadline): nothing to answer

    async def Sentiment(self, request: pb.SentimentRequest, context) -> pb.SentimentResponse | None:
        async with self._call(context, Task.SENTIMENT, "Sentiment") as call:
            name = call.begin(request)
            engine = self._registry.get(Task.SENTIMENT, name, SentimentEngine)
            call.model = engine.name
            texts = convert.texts_from(request.texts, self._server)
            convert.check_fits_queue(len(texts), engine.name, engine.settings.max_queue_size)
            results = await engine.sentiment(
                texts, deadline=_deadline(context), adapter=convert.adapter_from(request.adapter)
            )
            return convert.sentiment_response(engine.name, results)
        return None  # the caller left (cancelled, deadline): nothing to answer

    async def Translate(self, request: pb.TranslateRequest, context) -> pb.TranslateResponse | None:
        async with self._call(context, Task.TRANSLATE, "Translate") as call:
            name = call.begin(request)
            source = convert.language_from("source_lang", request.source_lang)
            target = convert.language_from("target_lang", request.target_lang)
            engine = self._registry.get(Task.TRANSLATE, name, TranslateEngine)
            call.model = engine.name
            texts = convert.texts_from(request.texts, self._server)
            convert.check_fits_queue(len(texts), engine.name, engine.settings.max_queue_size)
            results = await engine.translate(
                texts,
                source_lang=source,
                target_lang=target,
                max_new_tokens=request.max_new_tokens or None,
                deadline=_deadline(context),
                adapter=convert.adapter_from(request.adapter),
            )
            return convert.translate_response(engine.name, results)
        return None  # the caller left (cancelled, deadline): nothing to answer

    # Tokenize / Detokenize (issue 20) --------------------------------------------------------
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse | None:
        async with self._call(context, self.gate.task_of(request.model), "Tokenize") as call:
            name = call.begin(request)
            engine = self._registry.get(call.task, name, Engine)
            call.model = engine.name
            if request.messages:
                if request.texts:
                    raise InvalidArgument("send texts or messages, not both")
                pairs = [(m.role, m.content) for m in request.messages]
                texts = [await checks.chat_text(engine, pairs, self._server)]
            else:
                texts = convert.texts_from(request.texts, self._server)
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            results = await engine.off_loop(tokens.tokenize, engine.tokenizer, texts, add)
            return convert.tokenize_response(engine.name, results)
        return None  # the caller left (cancelled, deadline): nothing to answer

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse | None:
        async with self._call(context, self.gate.task_of(request.model), "Detokenize") as call:
            name = call.begin(request)
            engine = self._registry.get(call.task, name, Engine)
            call.model = engine.name
            text = await engine.off_loop(
                tokens.detokenize, engine.tokenizer, list(request.ids), request.skip_special_tokens
            )
            return pb.DetokenizeResponse(model=engine.name, text=text)
        return None  # the caller left (cancelled, deadline): nothing to answer

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                convert.model_info_pb(e.info(), with_path=self._server.expose_model_paths)
                for e in self._registry.engines()
            ],
            server_version=bitserve.__version__,
            contract_revision=contract.REVISION,
        )
