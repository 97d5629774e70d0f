"""Text generation with a causal LM, front half: validation, tokenization, detokenization,
stop strings and streaming. The engine process decodes (continuous batching, `generation/`)."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from bitserve.errors import InvalidArgument, ResourceExhausted
from bitserve.frontend import tenants
from bitserve.frontend.base import Engine, GenerateEngine, register
from bitserve.frontend.context import current_client
from bitserve.frontend.text.detokenize import decoder_factory
from bitserve.frontend.text.incremental import TextState
from bitserve.metrics import Metrics
from bitserve.types import (
    FinishReason,
    Generation,
    GenerationRequest,
    SamplingParams,
    StreamChunk,
    TokenLogprob,
)

_FINISH = {"eos": FinishReason.EOS, "length": FinishReason.LENGTH, "stop": FinishReason.STOP}


class _GenMetrics:
    """Token-level metrics, measured where the tokens arrive (the front), per (model, task)."""

    def __init__(self, m: Metrics, model: str, task: str):
        self.generated = m.generated_tokens.labels(model, task)
        self.prompt = m.prompt_tokens.labels(model, task)
        self.ttft = m.time_to_first_token.labels(model, task)
        self.itl = m.inter_token_latency.labels(model, task)


class TokenCollector:
    """One request's tokens as the engine sends them: its text (incrementally where a stream or
    a stop string needs it), logprobs and finish; `on_done` gets the Generation (or an error)
    and, for streams, `on_chunk` a StreamChunk per token."""

    def __init__(
        self,
        engine: GenerationFront,
        prompt_tokens: int,
        params: SamplingParams,
        *,
        on_done: Callable[[Any], None],
        on_chunk: Callable[[StreamChunk], None] | None = None,
        stop_ids: frozenset[int] = frozenset(),
    ):
        self.engine = engine
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.on_done = on_done
        self.on_chunk = on_chunk
        self.stop_ids = stop_ids
        self.ids: list[int] = []  # every generated token, an ending EOS/stop token included
        self.logprobs: list[TokenLogprob] = []
        self.text: TextState | None = None
        if on_chunk is not None or params.stop:
            self.text = TextState(engine.new_decoder, params.stop)
        self.started = time.monotonic()
        self.last = 0.0
        self.rid = 0
        self.done = False
        self.ticket: tenants.Ticket | None = None  # the tenant's hold, given back at the end

    def on_token(self, token: int, logprob: float | None, finish: str | None, now: float) -> None:
        m = self.engine.gen_metrics
        m.generated.inc()
        if self.last:
            m.itl.observe(now - self.last)
        else:
            m.ttft.observe(now - self.started)
            if self.ticket is not None:
                self.ticket.first_token(now - self.started)
        self.last = now
        self.ids.append(token)
        lp = None
        if logprob is not None:
            lp = TokenLogprob(token, self.engine.decode_one(token), logprob)
            self.logprobs.append(lp)
        ends = finish in ("eos", "stop")  # the ending token is not part of the text
        if self.text is not None and not ends:
            self.text.add(token)
            if self.text.stopped:
                finish = "stop-string"
                self.engine.core.abort([self.rid])
        if finish is not None:
            self._finish(finish, lp)
        elif self.on_chunk is not None:
            assert self.text is not None
            # A message per token even when its text is held back (a partial character, a
            # possible stop string): the client sees progress, and TTFT is real.
            self.on_chunk(StreamChunk(self.text.take(), (lp,) if lp is not None else ()))

    def _finish(self, finish: str, lp: TokenLogprob | None) -> None:
        self.done = True
        self.release_ticket()
        reason = FinishReason.STOP if finish == "stop-string" else _FINISH[finish]
        if self.text is not None:
            text = self.text.finish()
        else:
            ids = self.ids[:-1] if finish in ("eos", "stop") else self.ids
            text = self.engine.decode(ids)
        gen = Generation(
            text=text,
            generated_tokens=len(self.ids),
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,
            logprobs=list(self.logprobs),
        )
        if self.on_chunk is not None:
            assert self.text is not None
            self.on_chunk(StreamChunk(self.text.take(), (lp,) if lp is not None else (), final=gen))
        self.on_done(gen)

    def on_error(self, exc: BaseException) -> None:
        self.done = True
        self.release_ticket()
        self.on_done(exc)

    def release_ticket(self) -> None:
        if self.ticket is not None:
            self.ticket.finish(len(self.ids))


class GenerationFront(Engine):
    """The front of anything the engine's generation scheduler decodes: admission, submit,
    collect, abandon. Not a served engine by itself."""

    uses_scheduler = True

    def __init__(self, settings: Any, loaded: Any, metrics: Metrics, core: Any):
        super().__init__(settings, loaded, metrics, core)
        # Decoding happens on the loop while the tokenization thread may be encoding: a fast
        # tokenizer object must not be used from two threads at once, so decode with a copy.
        self._decode_tok = decode_tokenizer(loaded)
        self.new_decoder = decoder_factory(self._decode_tok)
        self.gen_metrics = _GenMetrics(metrics, self.name, self.task.value)
        self.outstanding = 0  # sequences sent to the engine and not finished
        self.limit = settings.max_queue_size + settings.max_concurrent_sequences

    def decode(self, ids: list[int]) -> str:
        return str(self._decode_tok.decode(ids, skip_special_tokens=True))

    def decode_one(self, token: int) -> str:
        return str(self._decode_tok.decode([token]))

    # validation ------------------------------------------------------------------------------
    async def prompts(self, texts: list[str], max_new_tokens: int) -> list[list[int]]:
        """Token ids per text, checked against the context; INVALID_ARGUMENT naming the text."""
        ids = await self.tokenize_checked(texts)
        self.check_context(ids, max_new_tokens)
        return ids

    def check_context(self, ids: list[list[int]], n: int, what: str = "texts") -> None:
        ctx = self.loaded.max_context
        for i, t in enumerate(ids):
            if not t:
                raise InvalidArgument(f"{what}[{i}] is empty; generation needs at least one prompt token")
            if len(t) + n > ctx:
                raise InvalidArgument(
                    f"max_new_tokens is {n} but {what}[{i}] has {len(t)} tokens; model {self.name!r} "
                    f"has a context of {ctx} tokens, so max_new_tokens may be at most {max(ctx - len(t), 0)}"
                )

    def admit(self, n: int) -> None:
        """Room for `n` more sequences, or RESOURCE_EXHAUSTED now (not after a queue wait)."""
        if n > self.settings.max_queue_size:
            raise InvalidArgument(
                f"texts: {n} texts is more than model {self.name!r} can ever queue "
                f"({self.settings.max_queue_size}); send at most {self.settings.max_queue_size} per request"
            )
        if self.outstanding + n > self.limit:
            raise ResourceExhausted(
                f"model {self.name!r} is full ({self.outstanding} sequences running or queued, "
                f"limit {self.limit}); retry later"
            )

    # requests --------------------------------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        n: int,
        deadline: float | None,
        collector: TokenCollector,
        stop_ids: tuple[int, ...] = (),
    ) -> None:
        req = GenerationRequest(
            rid=0,
            model=self.name,
            prompt_ids=prompt,
            params=params,
            max_new_tokens=n,
            stop_ids=stop_ids,
            deadline=deadline,
            client=current_client.get(),
        )
        collector.rid = self.core.generate(req, collector)
        self.outstanding += 1
        self.gen_metrics.prompt.inc(len(prompt))

    def _released(self, _: Any = None) -> None:
        self.outstanding -= 1

    async def run_all(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        deadline: float | None,
        stop_ids: tuple[int, ...] = (),
    ) -> list[Generation]:
        """Generate for every prompt; the ones still running leave the engine if this is
        cancelled or one of them fails."""
        self.admit(len(prompts))
        tickets = tenants.admit_sequences(self.name, self.limit, [len(p) for p in prompts], n)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        collectors: list[TokenCollector] = []
        for p, ticket in zip(prompts, tickets):
            fut = loop.create_future()
            c = TokenCollector(
                self, len(p), params, on_done=_resolver(fut, self._released), stop_ids=frozenset(stop_ids)
            )
            c.ticket = ticket
            try:
                self.submit(p, params, n, deadline, c, stop_ids)
            except BaseException:  # the engine is down (restarting): nothing of this request stays held
                for t in tickets[len(collectors) :]:
                    if t is not None:
                        t.finish(0)
                self._abandon(collectors)
                raise
            futures.append(fut)
            collectors.append(c)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            self._abandon(collectors)

    def _abandon(self, collectors: list[TokenCollector]) -> None:
        live = [c for c in collectors if not c.done]
        for c in live:
            c.done = True
            c.release_ticket()
            self._released()
        if live:
            self.core.abort([c.rid for c in live])


@register
class CausalLMGenerateEngine(GenerationFront, GenerateEngine):
    backend = "head"

    async def generate(
        self, texts: list[str], params: SamplingParams, *, deadline: float | None
    ) -> list[Generation]:
        n = self.resolve_max_new_tokens(params.max_new_tokens)
        self.admit(len(texts))  # a full engine answers before the request pays for tokenizing
        return await self.run_all(await self.prompts(list(texts), n), params, n, deadline)

    async def generate_stream(
        self, text: str, params: SamplingParams, *, deadline: float | None
    ) -> AsyncIterator[StreamChunk]:
        n = self.resolve_max_new_tokens(params.max_new_tokens)
        self.admit(1)
        (prompt,) = await self.prompts([text], n)
        self.admit(1)
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def done(result: Any) -> None:
            self._released()
            if isinstance(result, BaseException):
                queue.put_nowait(result)

        (ticket,) = tenants.admit_sequences(self.name, self.limit, [len(prompt)], n)
        c = TokenCollector(self, len(prompt), params, on_done=done, on_chunk=queue.put_nowait)
        c.ticket = ticket
        try:
            self.submit(prompt, params, n, deadline, c)
        except BaseException:  # the engine is down (restarting): the tenant's hold goes back
            c.release_ticket()
            raise
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                # A consumer slower than the engine gets the tokens that piled up as one
                # message: one per token when it keeps up, fewer under load.
                error = None
                while item.final is None and not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        error = nxt
                        break
                    item = StreamChunk(item.text + nxt.text, item.tokens + nxt.tokens, nxt.final)
                yield item
                if error is not None:
                    raise error
                if item.final is not None:
                    return
        finally:
            # Closed early (consumer stopped iterating) or cancelled: free the slot.
            self._abandon([c])


def decode_tokenizer(loaded: Any) -> Any:
    """One copy of the tokenizer per checkpoint for decoding on the event loop (the original
    encodes on the tokenization threads: a fast tokenizer is not shared across threads)."""
    tok = getattr(loaded, "_decode_tokenizer", None)
    if tok is None:
        tok = copy.deepcopy(loaded.tokenizer)
        loaded._decode_tokenizer = tok
    return tok


def _resolver(fut: asyncio.Future[Any], release: Callable[[Any], None]) -> Callable[[Any], None]:
    def done(payload: Any) -> None:
        release(payload)
        if fut.done():
            return
        if isinstance(payload, BaseException):
            fut.set_exception(payload)
        else:
            fut.set_result(payload)

    return done
