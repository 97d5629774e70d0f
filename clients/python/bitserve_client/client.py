"""`Client` (blocking) and `AsyncClient` (asyncio): two thin faces over `calls`.

Each method builds its call in `calls` (request, reader, deadline) and sends it through the
face's `_unary` or `_stream`; the faces differ only in blocking or awaiting. A single string in
gives a single result out; a list gives a list. gRPC errors become typed exceptions
(`bitserve_client.errors`) carrying the status code and the server's message.

Before a call that uses a field or RPC added after contract revision 1, a face asks the server
its revision once (ListModels) and raises `IncompatibleServerError` rather than send what an
older server would drop (`bitserve_client.contract`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

from . import calls, contract, security
from . import channel as _ch
from . import tokens as _tok
from .calls import Call, Message
from .errors import from_rpc_error
from .results import AdapterInfo, ModelInfo, ServerInfo, StreamEvent
from .retry import RetryInfoPolicy

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .calls import CallOptions, ClassifyOptions, GenerationOptions, SentimentOptions, TranslateOptions

R = TypeVar("R")


class _Face:
    """What both faces share: the channel options, the stub, the deadline, the server's revision."""

    def __init__(self, target: str | Sequence[str], timeout: float | None):
        self._target = _ch.target_of(target)
        self.timeout = timeout
        self._server: ServerInfo | None = None
        # RESOURCE_EXHAUSTED with a RetryInfo is waited out and resent (bitserve_client.retry).
        self.retry_policy = RetryInfoPolicy()

    def _deadline(self, call: Call[Any]) -> float | None:
        return self.timeout if call.timeout is None else call.timeout

    def _asks_server(self, call: Call[Any]) -> bool:
        """Whether this call needs the server's revision before it is sent (not known yet)."""
        return self._server is None and contract.needs(call.rpc, call.request) > contract.FIRST

    def _check(self, call: Call[Any]) -> None:
        if self._server is not None:
            contract.check(
                call.rpc, call.request, self._target, self._server.version, self._server.contract_revision
            )


class Client(_Face):
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
        **tls: Unpack[security.Options],
    ):
        """TLS when `tls` or any certificate is given (`root_certificates`: PEM bytes or a file;
        None trusts the system roots); `private_key` + `certificate_chain` for mutual TLS;
        `token` is sent as `authorization: Bearer <token>` on every call."""
        super().__init__(target, timeout)
        self._channel = channel or security.channel(self._target, _ch.options(service_config), **tls)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._stubs = {"Inference": self._stub, "Admin": pb_grpc.AdminStub(self._channel)}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, call: Call[R]) -> R:
        if self._asks_server(call):
            self._server = self.server_info()
        self._check(call)
        send = getattr(self._stubs[call.service], call.rpc)
        try:
            return call.read(self.retry_policy.call(lambda: send(call.request, timeout=self._deadline(call))))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _stream(self, call: Call[R]) -> Iterator[R]:
        """Leaving the loop early (break, or closing the iterator) cancels the call."""
        if self._asks_server(call):
            self._server = self.server_info()
        self._check(call)
        it = getattr(self._stubs[call.service], call.rpc)(call.request, timeout=self._deadline(call))
        try:
            for m in it:
                yield call.read(m)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            it.cancel()

    def generate(self, prompt: str | Sequence[str], **options: Unpack[GenerationOptions]) -> Any:
        """A `Generation` for one prompt, a list of them for a list of prompts; with `n` > 1,
        a list of n Generations in place of each."""
        return self._unary(calls.generate(prompt, options))

    def generate_stream(self, prompt: str, **options: Unpack[GenerationOptions]) -> Iterator[StreamEvent]:
        """New tokens as they are generated; the last event has `.final`. Leaving the loop early
        (break, or closing the iterator) cancels the generation."""
        return self._stream(calls.generate_stream(prompt, options))

    def chat(self, messages: Sequence[Message], **options: Unpack[GenerationOptions]) -> Any:
        """The assistant's reply to `messages` (a `Generation`), rendered with the model's chat
        template on the server; with `n` > 1, a list of n replies."""
        return self._unary(calls.chat(messages, options))

    def chat_stream(
        self, messages: Sequence[Message], **options: Unpack[GenerationOptions]
    ) -> Iterator[StreamEvent]:
        """`chat`, streamed as `generate_stream` streams."""
        return self._stream(calls.chat_stream(messages, options))

    def classify(self, texts: str | Sequence[str], **options: Unpack[ClassifyOptions]) -> Any:
        """A list of `LabelScore` per text (a list of lists for a list of texts)."""
        return self._unary(calls.classify(texts, options))

    def sentiment(self, texts: str | Sequence[str], **options: Unpack[SentimentOptions]) -> Any:
        return self._unary(calls.sentiment(texts, options))

    def translate(self, texts: str | Sequence[str], **options: Unpack[TranslateOptions]) -> Any:
        return self._unary(calls.translate(texts, options))

    def list_models(self, **options: Unpack[CallOptions]) -> list[ModelInfo]:
        return self._unary(calls.list_models(options))

    # the Admin service: LoRA adapters at run time -------------------------------------------------
    def load_adapter(self, model: str, name: str, path: str, **options: Unpack[CallOptions]) -> AdapterInfo:
        """Load the adapter at `path` (a directory on the server) as `name` on `model`."""
        return self._unary(calls.load_adapter(model, name, path, options))

    def unload_adapter(self, model: str, name: str, **options: Unpack[CallOptions]) -> int:
        """Unload it (then NOT_FOUND); rows still decoding with it finish first: their count."""
        return self._unary(calls.unload_adapter(model, name, options))

    def list_adapters(
        self, model: str | None = None, **options: Unpack[CallOptions]
    ) -> dict[str, list[AdapterInfo]]:
        return self._unary(calls.list_adapters(model, options))

    def server_info(self, **options: Unpack[CallOptions]) -> ServerInfo:
        """The server's release and contract revision (ListModels)."""
        return self._unary(calls.server_info(options))

    def tokenize(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        model: str | None = None,
        add_special_tokens: bool = True,
        messages: Sequence[Message] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """`Tokens` of a text (a list for a list); or of `messages` as Chat renders them."""
        req, single = _tok.tokenize_request(texts, model, add_special_tokens, messages)
        return self._unary(Call("Tokenize", req, lambda r: _tok.tokens_of(r, single), timeout))

    def detokenize(
        self,
        ids: Sequence[int],
        *,
        model: str | None = None,
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> str:
        req = _tok.detokenize_request(ids, model, skip_special_tokens)
        return self._unary(Call("Detokenize", req, lambda r: str(r.text), timeout))


class AsyncClient(_Face):
    """asyncio client with the same methods as `Client` (awaitable; streams are async iterators)."""

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        timeout: float | None = None,
        channel: grpc.aio.Channel | None = None,
        service_config: dict[str, Any] | None = None,
        **tls: Unpack[security.Options],
    ):
        """Security options as for `Client`."""
        super().__init__(target, timeout)
        self._channel = channel or security.aio_channel(self._target, _ch.options(service_config), **tls)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._stubs = {"Inference": self._stub, "Admin": pb_grpc.AdminStub(self._channel)}

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, call: Call[R]) -> R:
        if self._asks_server(call):
            self._server = await self.server_info()
        self._check(call)
        send = getattr(self._stubs[call.service], call.rpc)
        try:
            return call.read(
                await self.retry_policy.acall(lambda: send(call.request, timeout=self._deadline(call)))
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def _stream(self, call: Call[R]) -> AsyncIterator[R]:
        if self._asks_server(call):
            self._server = await self.server_info()
        self._check(call)
        it = getattr(self._stubs[call.service], call.rpc)(call.request, timeout=self._deadline(call))
        try:
            async for m in it:
                yield call.read(m)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            it.cancel()

    async def generate(self, prompt: str | Sequence[str], **options: Unpack[GenerationOptions]) -> Any:
        return await self._unary(calls.generate(prompt, options))

    def generate_stream(
        self, prompt: str, **options: Unpack[GenerationOptions]
    ) -> AsyncIterator[StreamEvent]:
        return self._stream(calls.generate_stream(prompt, options))

    async def chat(self, messages: Sequence[Message], **options: Unpack[GenerationOptions]) -> Any:
        return await self._unary(calls.chat(messages, options))

    def chat_stream(
        self, messages: Sequence[Message], **options: Unpack[GenerationOptions]
    ) -> AsyncIterator[StreamEvent]:
        return self._stream(calls.chat_stream(messages, options))

    async def classify(self, texts: str | Sequence[str], **options: Unpack[ClassifyOptions]) -> Any:
        return await self._unary(calls.classify(texts, options))

    async def sentiment(self, texts: str | Sequence[str], **options: Unpack[SentimentOptions]) -> Any:
        return await self._unary(calls.sentiment(texts, options))

    async def translate(self, texts: str | Sequence[str], **options: Unpack[TranslateOptions]) -> Any:
        return await self._unary(calls.translate(texts, options))

    async def list_models(self, **options: Unpack[CallOptions]) -> list[ModelInfo]:
        return await self._unary(calls.list_models(options))

    # the Admin service: LoRA adapters at run time -------------------------------------------------
    async def load_adapter(
        self, model: str, name: str, path: str, **options: Unpack[CallOptions]
    ) -> AdapterInfo:
        return await self._unary(calls.load_adapter(model, name, path, options))

    async def unload_adapter(self, model: str, name: str, **options: Unpack[CallOptions]) -> int:
        return await self._unary(calls.unload_adapter(model, name, options))

    async def list_adapters(
        self, model: str | None = None, **options: Unpack[CallOptions]
    ) -> dict[str, list[AdapterInfo]]:
        return await self._unary(calls.list_adapters(model, options))

    async def server_info(self, **options: Unpack[CallOptions]) -> ServerInfo:
        return await self._unary(calls.server_info(options))

    async def tokenize(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        model: str | None = None,
        add_special_tokens: bool = True,
        messages: Sequence[Message] | None = None,
        timeout: float | None = None,
    ) -> Any:
        req, single = _tok.tokenize_request(texts, model, add_special_tokens, messages)
        return await self._unary(Call("Tokenize", req, lambda r: _tok.tokens_of(r, single), timeout))

    async def detokenize(
        self,
        ids: Sequence[int],
        *,
        model: str | None = None,
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> str:
        req = _tok.detokenize_request(ids, model, skip_special_tokens)
        return await self._unary(Call("Detokenize", req, lambda r: str(r.text), timeout))
