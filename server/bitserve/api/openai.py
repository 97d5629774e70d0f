"""OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions (SSE streams), /v1/models.

A second front on the same registry, engines, checks (`api.checks`), bearer tokens
(`api.security`), shutdown gate and metrics as the gRPC servicer; it runs in the same process
and event loop (uvicorn serving a Starlette app, started by `api.server`). Typed errors become
OpenAI-style bodies, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
that matches their gRPC code (`code` is that code's name), mapped once, in `_Call.end`.

Differences from OpenAI's API: `temperature` defaults to 1 as OpenAI's does, so greedy needs
`temperature: 0` (the gRPC API's default is greedy); `top_k` and `repetition_penalty` are
accepted as extensions (as vLLM does); fields the server has no use for are ignored. `model`
may name a LoRA adapter as "base:adapter" (model names hold no ':'); /v1/models lists each adapter
that way, with `parent` set to its base, as vLLM lists its LoRA modules; an unknown adapter is a
404 (NOT_FOUND), never answered by the base.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bitserve.api import checks, security
from bitserve.errors import BitserveError, InvalidArgument, clip_message
from bitserve.frontend.base import GenerateEngine
from bitserve.frontend.context import current_client
from bitserve.frontend.registry import ModelRegistry
from bitserve.metrics import Metrics
from bitserve.settings import Settings
from bitserve.types import (
    Constraint,
    FinishReason,
    Generation,
    SamplingParams,
    StreamChunk,
    Task,
    TokenLogprob,
    TokenPrompt,
)

log = logging.getLogger(__name__)

# gRPC status code name -> HTTP status, as google.rpc.Code documents the pairs.
HTTP_STATUS = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# HTTP status -> OpenAI's error `type`.
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
_FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
MAX_TOP_LOGPROBS = 20  # OpenAI's own limit for chat `top_logprobs`


# requests -------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM spells them the same)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = 0.0


class CompletionBody(_Body):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = ""
    schema_: dict[str, Any] = Field(alias="schema")


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


class ChatBody(_Body):
    messages: list[_Message]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: _ResponseFormat | None = None


def constraint_of(fmt: _ResponseFormat | None) -> Constraint | None:
    """`response_format` -> what the engine constrains decoding to."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json_object", "")
    if fmt.json_schema is None:
        raise InvalidArgument("response_format.json_schema is required when type is 'json_schema'")
    return Constraint("json_schema", json.dumps(fmt.json_schema.schema_))


def _logit_bias(bias: dict[str, float] | None) -> list[tuple[int, float]]:
    out = []
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise InvalidArgument(f"logit_bias: keys are token ids, got {key[:40]!r}")
        out.append((int(key), value))
    return out


def _sampling(body: _Body, engine: GenerateEngine, *, adapter: str = "", **extra: Any) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    params = checks.sampling(
        engine.settings.default_max_new_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        stop=stop,
        seed=body.seed,
        n=body.n,
        logit_bias=_logit_bias(body.logit_bias),
        prefix="",
        names={"max_new_tokens": "max_tokens"},
        **extra,
    )
    return dataclasses.replace(params, adapter=adapter) if adapter else params


def _id(engine: GenerateEngine, adapter: str) -> str:
    """The model id a response names: the request's "base:adapter", or the model's name."""
    return f"{engine.name}:{adapter}" if adapter else engine.name


# responses ------------------------------------------------------------------------------------
def error_body(code: str, message: str, param: str | None = None) -> tuple[int, dict[str, Any]]:
    status = HTTP_STATUS.get(code, 500)
    kind = ERROR_TYPE.get(status, "server_error")
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _usage(gens: Sequence[Generation], n: int) -> dict[str, int]:
    # Each prompt counts once, however many completions it has (they share its prefill).
    prompt = sum(g.prompt_tokens for g in gens[:: max(n, 1)])
    completion = sum(g.generated_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _top(t: TokenLogprob) -> list[tuple[str, float]]:
    return [(text, lp) for _, text, lp in t.top]


def _chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for s, lp in _top(t)]} for t in tokens
        ]
    }


def _completion_logprobs(tokens: Sequence[TokenLogprob], start: int = 0) -> dict[str, Any]:
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(_top(t)) for t in tokens],
        "text_offset": offsets,
    }


# the app --------------------------------------------------------------------------------------
class _Call:
    """Per-request bookkeeping, as the servicer's: admission, error mapping, metrics."""

    def __init__(self, front: OpenAIFront, request: Request, method: str):
        self.front, self.request, self.method = front, request, method
        self.model = checks.UNRESOLVED_MODEL
        self._start = time.perf_counter()
        self._ended = False
        front.gate.inflight += 1
        peer = request.client
        current_client.set(request.headers.get("x-client-id") or (f"{peer.host}:{peer.port}" if peer else ""))

    async def body(self, kind: type[_Body]) -> Any:
        """Authenticated, admitted and parsed: the request body, or a typed error."""
        problem = self.front.check_auth(self.request)
        if problem is not None:
            raise _Unauthenticated(problem)
        declared = self.request.headers.get("content-length", "")
        # shutdown and the byte budget, checked before the body is read (when its length is
        # declared) and parsed
        self.front.gate.begin(int(declared) if declared.isdigit() else 0, "")
        raw = await self.request.body()
        self.front.gate.begin(len(raw), "")
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise InvalidArgument(f"the request body is not JSON: {e}") from None
        try:
            body = kind.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise _BadField(param, f"{param}: {first['msg']}") from None
        self.model = self.front.gate.label(checks.model_name(body.model))
        return body

    def end(self, exc: BaseException | None) -> Response | None:
        """Count the request; for an error, the response that says it."""
        if self._ended:
            return None
        self._ended = True
        self.front.gate.inflight -= 1
        code, response = "OK", None
        if isinstance(exc, BitserveError):
            code = exc.code
            status, body = error_body(code, clip_message(exc.message), getattr(exc, "param", None))
            response = JSONResponse(body, status_code=status)
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            code = "CANCELLED"
        elif exc is not None:
            log.error("%s on model %r failed", self.method, self.model, exc_info=exc)
            code = "INTERNAL"
            message = clip_message(f"internal error in {self.method}: {type(exc).__name__}: {exc}")
            status, body = error_body(code, message)
            response = JSONResponse(body, status_code=status)
        m = self.front.metrics
        m.requests.labels(self.model, Task.GENERATE.value, self.method, code).inc()
        m.request_duration.labels(self.model, Task.GENERATE.value, self.method, code).observe(
            time.perf_counter() - self._start
        )
        return response


class _Unauthenticated(BitserveError):
    code = "UNAUTHENTICATED"


class _BadField(InvalidArgument):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _SSE(StreamingResponse):
    """An event stream whose `cleanup` runs however the response ends (also when the client
    left before the first byte, when the body iterator never starts)."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], Any]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


def _event(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class OpenAIFront:
    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics, gate: checks.Gate):
        self.server = settings.server
        self.registry = registry
        self.metrics = metrics
        self.gate = gate
        self.tokens = security.load_tokens(settings.server)
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            ]
        )

    def check_auth(self, request: Request) -> str | None:
        if not self.tokens:
            return None
        return security.check_bearer(self.tokens, request.headers.get("authorization"), "header")

    def _engine(self, call: _Call, name: str) -> tuple[GenerateEngine, str]:
        """The engine of `model` ("base" or "base:adapter") and the adapter named ("": none)."""
        base, adapter = checks.model_and_adapter(name)
        engine = self.registry.get(Task.GENERATE, base, GenerateEngine)
        call.model = engine.name
        return engine, adapter

    # /v1/completions ---------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        call = _Call(self, request, "/v1/completions")
        try:
            body: CompletionBody = await call.body(CompletionBody)
            engine, adapter = self._engine(call, body.model)
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            prompts = checks.texts(
                prompts, self.server, exactly_one="a stream" if body.stream else None, field="prompt"
            )
            checks.fits_queue(len(prompts) * body.n, engine.name, engine.settings.max_queue_size)
            params = _sampling(
                body,
                engine,
                max_new_tokens=body.max_tokens or 0,
                logprobs=body.logprobs is not None,
                top_logprobs=body.logprobs or 0,
                adapter=adapter,
            )
            rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
            head = {"id": rid, "object": "text_completion", "created": created, "model": _id(engine, adapter)}
            if body.stream:
                return await self._stream(call, engine, prompts[0], params, body, head, _completion_chunk)
            gens = await engine.generate(prompts, params, deadline=None)
        except BaseException as e:
            response = call.end(e)
            if response is None:
                raise
            return response
        call.end(None)
        choices = [
            {
                "index": i,
                "text": g.text,
                "logprobs": _completion_logprobs(g.logprobs) if params.logprobs else None,
                "finish_reason": _FINISH[g.finish_reason],
            }
            for i, g in enumerate(gens)
        ]
        return JSONResponse({**head, "choices": choices, "usage": _usage(gens, params.n)})

    # /v1/chat/completions ----------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        call = _Call(self, request, "/v1/chat/completions")
        try:
            body: ChatBody = await call.body(ChatBody)
            engine, adapter = self._engine(call, body.model)
            prompt = await checks.chat_prompt(
                engine, [(m.role, m.text()) for m in body.messages], self.server
            )
            checks.fits_queue(body.n, engine.name, engine.settings.max_queue_size)
            params = _sampling(
                body,
                engine,
                max_new_tokens=body.max_completion_tokens or body.max_tokens or 0,
                logprobs=body.logprobs,
                top_logprobs=body.top_logprobs,
                constraint=constraint_of(body.response_format),
                adapter=adapter,
            )
            rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            head = {"id": rid, "object": "chat.completion", "created": created, "model": _id(engine, adapter)}
            if body.stream:
                head["object"] = "chat.completion.chunk"
                return await self._stream(call, engine, prompt, params, body, head, _chat_chunk)
            gens = await engine.generate([prompt], params, deadline=None)
        except BaseException as e:
            response = call.end(e)
            if response is None:
                raise
            return response
        call.end(None)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": _chat_logprobs(g.logprobs) if params.logprobs else None,
                "finish_reason": _FINISH[g.finish_reason],
            }
            for i, g in enumerate(gens)
        ]
        return JSONResponse({**head, "choices": choices, "usage": _usage(gens, params.n)})

    # streams -----------------------------------------------------------------------------------
    async def _stream(
        self,
        call: _Call,
        engine: GenerateEngine,
        prompt: str | TokenPrompt,
        params: SamplingParams,
        body: _Body,
        head: dict[str, Any],
        chunk_of: Callable[[dict[str, Any], StreamChunk, SamplingParams, bool], dict[str, Any]],
    ) -> Response:
        """SSE events of one generation. The first chunk is awaited before the response
        starts, so a request the engine refuses (context, queue) still gets its HTTP status."""
        if params.n != 1:
            raise _BadField("n", "n: streaming answers one completion per request; send n=1")
        chunks = engine.generate_stream(prompt, params, deadline=None)
        try:
            first = await chunks.__anext__()
        except BaseException:
            await chunks.aclose()  # type: ignore[attr-defined]
            raise
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        done = False

        async def events() -> AsyncIterator[str]:
            nonlocal done
            chunk: StreamChunk | None = first
            opening = True
            try:
                while chunk is not None:
                    yield _event(chunk_of(head, chunk, params, opening))
                    opening = False
                    if chunk.final is not None:
                        if include_usage:
                            yield _event({**head, "choices": [], "usage": _usage([chunk.final], 1)})
                        break
                    chunk = await chunks.__anext__()
                yield "data: [DONE]\n\n"
                done = True
            except BitserveError as e:
                # Headers are gone: the error travels as an event, as OpenAI's streams send it.
                call.end(e)
                yield _event(error_body(e.code, clip_message(e.message))[1])
            except Exception as e:
                call.end(e)
                yield _event(
                    error_body("INTERNAL", f"internal error in {call.method}: {type(e).__name__}")[1]
                )

        async def cleanup() -> None:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
            # ended already when an error was sent; else it finished, or its client left
            call.end(None if done else asyncio.CancelledError())

        return _SSE(events(), cleanup)

    # /v1/models --------------------------------------------------------------------------------
    def _model_card(self, name: str, task: Task) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "bitserve",
            "task": task.value,
        }

    def _cards(self) -> list[dict[str, Any]]:
        """Each model, then each of its LoRA adapters as "base:adapter" (as the engine last
        reported them: configured and loaded at run time)."""
        cards = []
        for e in self.registry.engines():
            cards.append(self._model_card(e.name, e.task))
            cards.extend(
                {**self._model_card(f"{e.name}:{a['name']}", e.task), "parent": e.name} for a in e.adapters
            )
        return cards

    async def models(self, request: Request) -> Response:
        problem = self.check_auth(request)
        if problem is not None:
            status, body = error_body("UNAUTHENTICATED", problem)
            return JSONResponse(body, status_code=status)
        return JSONResponse({"object": "list", "data": self._cards()})

    async def model(self, request: Request) -> Response:
        problem = self.check_auth(request)
        if problem is not None:
            status, body = error_body("UNAUTHENTICATED", problem)
            return JSONResponse(body, status_code=status)
        name = request.path_params["model"]
        for card in self._cards():
            if card["id"] == name:
                return JSONResponse(card)
        status, body = error_body("NOT_FOUND", f"model {name[:200]!r} is not loaded", "model")
        return JSONResponse(body, status_code=status)


def _completion_chunk(
    head: dict[str, Any], chunk: StreamChunk, params: SamplingParams, opening: bool
) -> dict[str, Any]:
    final = chunk.final
    return {
        **head,
        "choices": [
            {
                "index": 0,
                "text": chunk.text,
                "logprobs": _completion_logprobs(chunk.tokens) if params.logprobs else None,
                "finish_reason": _FINISH[final.finish_reason] if final is not None else None,
            }
        ],
    }


def _chat_chunk(
    head: dict[str, Any], chunk: StreamChunk, params: SamplingParams, opening: bool
) -> dict[str, Any]:
    final = chunk.final
    delta: dict[str, Any] = {"content": chunk.text}
    if opening:
        delta["role"] = "assistant"
    return {
        **head,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": _chat_logprobs(chunk.tokens) if params.logprobs else None,
                "finish_reason": _FINISH[final.finish_reason] if final is not None else None,
            }
        ],
    }


class HttpServer:
    """uvicorn serving the app on the server's event loop (no signal handlers of its own: the
    CLI owns shutdown, and `api.server.Server.stop` drains both fronts through one gate)."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics, gate: checks.Gate):
        import uvicorn

        s = settings.server
        self.front = OpenAIFront(settings, registry, metrics, gate)
        tls: dict[str, Any] = {}
        if s.tls_cert_file:
            tls = {"ssl_certfile": s.tls_cert_file, "ssl_keyfile": s.tls_key_file}
            if s.tls_client_ca_file:
                import ssl

                tls.update(ssl_ca_certs=s.tls_client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self._config = uvicorn.Config(
            self.front.app,
            host=s.host,
            port=s.openai_port or 0,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
            **tls,
        )
        self._server = uvicorn.Server(self._config)
        self._main: asyncio.Task[None] | None = None
        self._sockets: list[Any] = []

    async def start(self) -> int:
        """Bind and serve; the port bound (a free one for port 0)."""
        cfg = self._config
        cfg.load()
        self._server.lifespan = cfg.lifespan_class(cfg)
        # bound here, not by uvicorn's bind_socket (which exits the process when it fails)
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as e:
            sock.close()
            raise OSError(
                f"server.openai_port: cannot bind {cfg.host}:{cfg.port}: {e.strerror or e}"
            ) from None
        self._sockets = [sock]
        await self._server.startup(sockets=self._sockets)
        if self._server.should_exit:  # startup failed (it has logged why)
            raise OSError(f"cannot serve the OpenAI-compatible HTTP API on {cfg.host}:{cfg.port}")
        self._main = asyncio.get_running_loop().create_task(self._server.main_loop())
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._main is not None:
            await self._main
        await self._server.shutdown(sockets=self._sockets)
