"""Friendly Python clients over the generated stubs: `Client` (blocking) and `AsyncClient`.

A single string in gives a single result out; a list gives a list. gRPC errors become typed
exceptions (`bitserve_client.errors`) carrying the status code and the server's message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from . import channel as _ch
from . import security
from .errors import from_rpc_error
from .pb.bitserve.v1 import inference_pb2 as pb
from .pb.bitserve.v1 import inference_pb2_grpc as pb_grpc
from .retry import RetryInfoPolicy

_FINISH = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_UNSPECIFIED: "",
}
_TASK = {
    pb.TASK_GENERATE: "generate",
    pb.TASK_CLASSIFY: "classify",
    pb.TASK_SENTIMENT: "sentiment",
    pb.TASK_TRANSLATE: "translate",
    pb.TASK_UNSPECIFIED: "",
}


# results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "length" | "stop" | "eos"
    tokens: int  # generated tokens
    prompt_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class StreamEvent:
    """One streamed piece: `.text` of the new token(s); the last one has `.final` set."""

    text: str
    tokens: tuple[TokenLogprob, ...] = ()
    final: Generation | None = None


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class Sentiment:
    label: str  # "positive" | "negative" | "neutral"
    score: float
    raw_label: str


@dataclass(frozen=True)
class Translation:
    text: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    quantization: str
    dtype: str
    device: str
    parameter_count: int
    memory_bytes: int
    labels: tuple[str, ...]
    architecture: str
    max_context: int
    ready: bool
    path: str
    quality_report_json: str = ""
    engine: str = ""  # models with the same engine share one copy of the weights
    extra: dict[str, Any] = field(default_factory=dict)
    device_map: dict[str, str] = field(default_factory=dict)  # module -> device when spread


def _logprobs(items) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(t.id, t.text, t.logprob) for t in items)


def _generation(g: pb.Generation) -> Generation:
    return Generation(
        text=g.text,
        finish_reason=_FINISH[g.finish_reason],
        tokens=g.generated_tokens,
        prompt_tokens=g.prompt_tokens,
        logprobs=_logprobs(g.logprobs),
    )


def _event(m: pb.GenerateStreamResponse) -> StreamEvent:
    return StreamEvent(
        text=m.text, tokens=_logprobs(m.tokens), final=_generation(m.final) if m.HasField("final") else None
    )


def _model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        task=_TASK[m.task],
        quantization=m.quantization,
        dtype=m.dtype,
        device=m.device,
        parameter_count=m.parameter_count,
        memory_bytes=m.memory_bytes,
        labels=tuple(m.labels),
        architecture=m.architecture,
        max_context=m.max_context,
        ready=m.ready,
        path=m.path,
        quality_report_json=m.quality_report_json,
        engine=m.engine,
        device_map=dict(m.device_map),
    )


# requests -----------------------------------------------------------------------------------
def _texts(texts: str | Sequence[str]) -> tuple[list[str], bool]:
    if isinstance(texts, str):
        return [texts], True
    return list(texts), False


def _one_or_all(items: list, single: bool):
    return items[0] if single else items


def _gen_request(
    prompt: str | Sequence[str],
    model: str | None,
    max_new_tokens: int | None,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    stop: Sequence[str] | str | None,
    seed: int | None,
    logprobs: bool,
) -> tuple[pb.GenerateRequest, bool]:
    texts, single = _texts(prompt)
    if isinstance(stop, str):
        stop = [stop]
    params = pb.GenerationParameters(
        max_new_tokens=max_new_tokens or 0,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=list(stop or []),
        logprobs=logprobs,
    )
    if seed is not None:
        params.seed = seed
    return pb.GenerateRequest(texts=texts, model=model or "", parameters=params), single


Message = Mapping[str, str] | tuple[str, str]
"""A chat message: `{"role": "user", "content": "..."}` (as in OpenAI's API) or `(role, content)`."""


def _chat_request(messages: Sequence[Message], model: str | None, *gen_args) -> pb.ChatRequest:
    if isinstance(messages, (str, Mapping)):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} messages")
    pbm = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        pbm.append(pb.ChatMessage(role=role, content=content))
    req, _ = _gen_request("", model, *gen_args)
    return pb.ChatRequest(messages=pbm, model=model or "", parameters=req.parameters)


class Client:
    """Blocking client. `timeout` (seconds) becomes each call's gRPC deadline.

    `target`: an address, a gRPC target URI (`dns:///host:port`) or a list of addresses, balanced
    round-robin; UNAVAILABLE is retried with backoff (`bitserve_client.channel` says how, and how
    `service_config` replaces that)."""

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        service_config: dict[str, Any] | None = None,
        tls: bool | None = None,
        root_certificates: security.PEM = None,
        private_key: security.PEM = None,
        certificate_chain: security.PEM = None,
        token: str | None = None,
    ):
        """TLS when `tls` or any certificate is given (`root_certificates`: PEM bytes or a file;
        None trusts the system roots); `private_key` + `certificate_chain` for mutual TLS;
        `token` is sent as `authorization: Bearer <token>` on every call."""
        self._channel = channel or security.channel(
            _ch.target_of(target),
            _ch.options(service_config),
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=token,
        )
        self._stub = pb_grpc.InferenceStub(self._channel)
        self.timeout = timeout
        # RESOURCE_EXHAUSTED with a RetryInfo is waited out and resent (bitserve_client.retry).
        self.retry_policy = RetryInfoPolicy()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout):
        try:
            t = self.timeout if timeout is None else timeout
            return self.retry_policy.call(lambda: method(request, timeout=t))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        repetition_penalty: float = 0.0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        timeout: float | None = None,
    ):
        req, single = _gen_request(
            prompt, model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed, logprobs
        )
        resp = self._call(self._stub.Generate, req, timeout)
        return _one_or_all([_generation(g) for g in resp.generations], single)

    def generate_stream(
        self,
        prompt: str,
        *,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        repetition_penalty: float = 0.0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        timeout: float | None = None,
    ) -> Iterator[StreamEvent]:
        """Iterate over new tokens as they are generated; the last event has `.final`.
        Leaving the loop early (break, or closing the iterator) cancels the generation."""
        req, _ = _gen_request(
            prompt, model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed, logprobs
        )
        call = self._stub.GenerateStream(req, timeout=self.timeout if timeout is None else timeout)
        try:
            for m in call:
                yield _event(m)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        repetition_penalty: float = 0.0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        timeout: float | None = None,
    ) -> Generation:
        """The assistant's reply to `messages`, rendered with the model's chat template on the server."""
        req = _chat_request(
            messages,
            model,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            stop,
            seed,
            logprobs,
        )
        return _generation(self._call(self._stub.Chat, req, timeout).generation)

    def chat_stream(
        self,
        messages: Sequence[Message],
        *,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        repetition_penalty: float = 0.0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        timeout: float | None = None,
    ) -> Iterator[StreamEvent]:
        """`chat`, streamed as `generate_stream` streams."""
        req = _chat_request(
            messages,
            model,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            stop,
            seed,
            logprobs,
        )
        call = self._stub.ChatStream(req, timeout=self.timeout if timeout is None else timeout)
        try:
            for m in call:
                yield _event(m)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def classify(
        self,
        texts: str | Sequence[str],
        *,
        model: str | None = None,
        top_k: int | None = None,
        candidate_labels: Sequence[str] | None = None,
        timeout: float | None = None,
    ):
        items, single = _texts(texts)
        req = pb.ClassifyRequest(
            texts=items, model=model or "", top_k=top_k or 0, candidate_labels=list(candidate_labels or [])
        )
        resp = self._call(self._stub.Classify, req, timeout)
        out = [[LabelScore(s.label, s.score) for s in r.labels] for r in resp.results]
        return _one_or_all(out, single)

    def sentiment(
        self, texts: str | Sequence[str], *, model: str | None = None, timeout: float | None = None
    ):
        items, single = _texts(texts)
        resp = self._call(self._stub.Sentiment, pb.SentimentRequest(texts=items, model=model or ""), timeout)
        return _one_or_all([Sentiment(r.label, r.score, r.raw_label) for r in resp.results], single)

    def translate(
        self,
        texts: str | Sequence[str],
        *,
        source_lang: str | None = None,
        target_lang: str | None = None,
        model: str | None = None,
        max_new_tokens: int | None = None,
        timeout: float | None = None,
    ):
        items, single = _texts(texts)
        req = pb.TranslateRequest(
            texts=items,
            model=model or "",
            source_lang=source_lang or "",
            target_lang=target_lang or "",
            max_new_tokens=max_new_tokens or 0,
        )
        resp = self._call(self._stub.Translate, req, timeout)
        return _one_or_all([Translation(r.text) for r in resp.results], single)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        resp = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [_model_info(m) for m in resp.models]


class AsyncClient:
    """asyncio client with the same methods as `Client` (awaitable; streams are async iterators)."""

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        timeout: float | None = None,
        channel: grpc.aio.Channel | None = None,
        service_config: dict[str, Any] | None = None,
        tls: bool | None = None,
        root_certificates: security.PEM = None,
        private_key: security.PEM = None,
        certificate_chain: security.PEM = None,
        token: str | None = None,
    ):
        """Security options as for `Client`."""
        self._channel = channel or security.aio_channel(
            _ch.target_of(target),
            _ch.options(service_config),
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=token,
        )
        self._stub = pb_grpc.InferenceStub(self._channel)
        self.timeout = timeout
        # RESOURCE_EXHAUSTED with a RetryInfo is waited out and resent (bitserve_client.retry).
        self.retry_policy = RetryInfoPolicy()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request, timeout):
        try:
            t = self.timeout if timeout is None else timeout
            return await self.retry_policy.acall(lambda: method(request, timeout=t))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def generate(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        repetition_penalty: float = 0.0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        timeout: float | None = None,
    ):
        req, single = _gen_request(
            prompt, model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed, logprobs
        )
        resp = await self._call(self._stub.Generate, req, timeout)
        return _one_or_all([_generation(g) for g in resp.generations], single)

    async def generate_stream(
        self,
        prompt: str,
        *,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        repetition_penalty: float = 0.0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamEvent]:
        req, _ = _gen_request(
            prompt, model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed, logprobs
        )
        call = self._stub.GenerateStream(req, timeout=self.timeout if timeout is None else timeout)
        try:
            async for m in call:
                yield _event(m)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        repetition_penalty: float = 0.0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        timeout: float | None = None,
    ) -> Generation:
        """The assistant's reply to `messages`, rendered with the model's chat template on the server."""
        req = _chat_request(
            messages,
            model,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            stop,
            seed,
            logprobs,
        )
        return _generation((await self._call(self._stub.Chat, req, timeout)).generation)

    async def chat_stream(
        self,
        messages: Sequence[Message],
        *,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        repetition_penalty: float = 0.0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """`chat`, streamed as `generate_stream` streams."""
        req = _chat_request(
            messages,
            model,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            stop,
            seed,
            logprobs,
        )
        call = self._stub.ChatStream(req, timeout=self.timeout if timeout is None else timeout)
        try:
            async for m in call:
                yield _event(m)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def classify(
        self,
        texts: str | Sequence[str],
        *,
        model: str | None = None,
        top_k: int | None = None,
        candidate_labels: Sequence[str] | None = None,
        timeout: float | None = None,
    ):
        items, single = _texts(texts)
        req = pb.ClassifyRequest(
            texts=items, model=model or "", top_k=top_k or 0, candidate_labels=list(candidate_labels or [])
        )
        resp = await self._call(self._stub.Classify, req, timeout)
        out = [[LabelScore(s.label, s.score) for s in r.labels] for r in resp.results]
        return _one_or_all(out, single)

    async def sentiment(
        self, texts: str | Sequence[str], *, model: str | None = None, timeout: float | None = None
    ):
        items, single = _texts(texts)
        resp = await self._call(
            self._stub.Sentiment, pb.SentimentRequest(texts=items, model=model or ""), timeout
        )
        return _one_or_all([Sentiment(r.label, r.score, r.raw_label) for r in resp.results], single)

    async def translate(
        self,
        texts: str | Sequence[str],
        *,
        source_lang: str | None = None,
        target_lang: str | None = None,
        model: str | None = None,
        max_new_tokens: int | None = None,
        timeout: float | None = None,
    ):
        items, single = _texts(texts)
        req = pb.TranslateRequest(
            texts=items,
            model=model or "",
            source_lang=source_lang or "",
            target_lang=target_lang or "",
            max_new_tokens=max_new_tokens or 0,
        )
        resp = await self._call(self._stub.Translate, req, timeout)
        return _one_or_all([Translation(r.text) for r in resp.results], single)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        resp = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [_model_info(m) for m in resp.models]
