"""Text generation with a causal LM, front half: validation, tokenization, detokenization,
stop strings and streaming. The engine process decodes (continuous batching, `generation/`)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from bitserve.errors import InvalidArgument, ResourceExhausted
from bitserve.frontend import adapters, tenants
from bitserve.frontend.base import Engine, GenerateEngine, prompt_name, register
from bitserve.frontend.batching import Room
from bitserve.frontend.context import current_client
from bitserve.frontend.text.detokenize import decoder_factory
from bitserve.frontend.text.incremental import TextState
from bitserve.frontend.text.stops import StopStrings
from bitserve.metrics import Metrics
from bitserve.types import (
    CONSTRAINT_KINDS,
    FinishReason,
    Generation,
    GenerationRequest,
    SamplingParams,
    StreamChunk,
    TokenLogprob,
    TokenPrompt,
)

_FINISH = {"eos": FinishReason.EOS, "length": FinishReason.LENGTH, "stop": FinishReason.STOP}

MAX_COMPLETIONS = 32  # n per prompt
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit too)
MAX_LOGIT_BIAS = 1024  # entries per request
MAX_CONSTRAINT_CHARS = 65536  # a schema, regex or grammar text


class _GenMetrics:
    """Token-level metrics, measured where the tokens arrive (the front), per (model, task)."""

    def __init__(self, m: Metrics, model: str, task: str):
        self.generated = m.generated_tokens.labels(model, task)
        self.prompt = m.prompt_tokens.labels(model, task)
        self.ttft = m.time_to_first_token.labels(model, task)
        self.itl = m.inter_token_latency.labels(model, task)
        self._m, self._model = m, model
        self._adapters: dict[str, tuple[Any, Any]] = {}

    def adapter(self, name: str) -> tuple[Any, Any]:
        """(tokens, sequences) counters of one adapter (a name the engine accepted)."""
        c = self._adapters.get(name)
        if c is None:
            m = self._m
            c = (
                m.adapter_generated_tokens.labels(self._model, name),
                m.adapter_sequences.labels(self._model, name),
            )
            self._adapters[name] = c
        return c


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
        stops: StopStrings | None = None,
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
            self.text = TextState(engine.new_decoder, stops if stops is not None else params.stop)
        self.started = time.monotonic()
        self.last = 0.0
        self.rid = 0
        self.done = False
        # Nothing reads this answer before it is finished (no stream, no stop strings): the
        # engine may send it whole.
        self.whole = on_chunk is None and not params.stop
        self.ticket: tenants.Ticket | None = None  # the tenant's hold, given back at the end

    def on_token(
        self,
        token: int,
        logprob: float | None,
        finish: str | None,
        now: float,
        top: list[list[float]] | None = None,
    ) -> None:
        m = self.engine.gen_metrics
        m.generated.inc()
        if self.params.adapter:
            m.adapter(self.params.adapter)[0].inc()
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
            alts = tuple((int(i), self.engine.decode_one(int(i)), float(v)) for i, v in top or ())
            lp = TokenLogprob(token, self.engine.decode_one(token), logprob, alts)
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
        if self.params.adapter:
            self.engine.gen_metrics.adapter(self.params.adapter)[1].inc()
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
        self.reserved = 0  # sequences admitted by `reserve` and not yet sent (tokenizing)
        self.limit = settings.max_queue_size + settings.max_concurrent_sequences

    def decode(self, ids: list[int]) -> str:
        return str(self._decode_tok.decode(ids, skip_special_tokens=True))

    def decode_one(self, token: int) -> str:
        return str(self._decode_tok.decode([token]))

    # validation ------------------------------------------------------------------------------
    async def prompts(self, texts: Sequence[str | TokenPrompt], max_new_tokens: int) -> list[list[int]]:
        """Token ids per text, checked against the context; INVALID_ARGUMENT naming the text."""
        ids = await self.tokenize_checked(texts)
        self.check_context(ids, max_new_tokens, texts=texts)
        return ids

    def check_context(
        self,
        ids: list[list[int]],
        n: int,
        what: str = "texts",
        texts: Sequence[str | TokenPrompt] | None = None,
    ) -> None:
        ctx = self.loaded.max_context
        for i, t in enumerate(ids):
            name = prompt_name(texts[i], i, what) if texts is not None else f"{what}[{i}]"
            if not t:
                raise InvalidArgument(f"{name} is empty; generation needs at least one prompt token")
            if len(t) + n > ctx:
                raise InvalidArgument(
                    f"max_new_tokens is {n} but {name} has {len(t)} tokens; model {self.name!r} "
                    f"has a context of {ctx} tokens, so max_new_tokens may be at most {max(ctx - len(t), 0)}"
                )

    async def stop_strings(self, params: SamplingParams) -> StopStrings | None:
        """The request's stop strings, compiled on the tokenization thread (linear in their length)."""
        return await self.off_loop(StopStrings, params.stop) if params.stop else None

    def with_adapter(self, params: SamplingParams) -> SamplingParams:
        """`params` with the adapter the request runs with (`adapters.resolve`: its own, the
        model's default_adapter, or the base for "base")."""
        adapter = adapters.resolve(self.settings, params.adapter)
        return params if adapter == params.adapter else dataclasses.replace(params, adapter=adapter)

    def check_params(self, params: SamplingParams) -> None:
        """The structured-output and sampling controls, whichever front built them;
        INVALID_ARGUMENT naming the field."""
        if not 1 <= params.n <= MAX_COMPLETIONS:
            raise InvalidArgument(f"parameters.n must be in [1, {MAX_COMPLETIONS}], got {params.n}")
        if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(
                f"parameters.top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}"
            )
        if len(params.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidArgument(
                f"parameters.logit_bias has {len(params.logit_bias)} entries; the limit is {MAX_LOGIT_BIAS}"
            )
        vocab = len(self._decode_tok)
        for t, b in params.logit_bias:
            if not 0 <= t < vocab:
                raise InvalidArgument(
                    f"parameters.logit_bias: token id {t} is not in model {self.name!r}'s vocabulary "
                    f"(ids 0..{vocab - 1})"
                )
            if not -100.0 <= b <= 100.0:  # also false for NaN
                raise InvalidArgument(f"parameters.logit_bias[{t}] must be in [-100, 100], got {b}")
        c = params.constraint
        if c is not None:
            check_constraint(c.kind, c.value)

    def admit(self, n: int) -> None:
        """Room for `n` more sequences, or RESOURCE_EXHAUSTED now (not after a queue wait)."""
        if n > self.settings.max_queue_size:
            raise InvalidArgument(
                f"texts: {n} texts is more than model {self.name!r} can ever queue "
                f"({self.settings.max_queue_size}); send at most {self.settings.max_queue_size} per request"
            )
        if self.outstanding + self.reserved + n > self.limit:
            raise ResourceExhausted(
                f"model {self.name!r} is full ({self.outstanding + self.reserved} sequences running "
                f"or queued, limit {self.limit}); retry later"
            )

    def reserve(self, n: int) -> Room:
        """`admit(n)` and hold the room until the request's sequences are sent (`run_all` takes
        it): a burst is refused at once, never after tokenizing behind the requests that got in.
        So is a tenant at its concurrency or queue-share limit."""
        self.admit(n)
        tenants.check_capacity(self.name, self.limit, n)
        self.reserved += n
        return Room(self, n)

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
        self.submit_many([(prompt, params, collector)], n, deadline, stop_ids)

    def submit_many(
        self,
        reqs: list[tuple[list[int], SamplingParams, TokenCollector]],
        n: int,
        deadline: float | None,
        stop_ids: tuple[int, ...] = (),
    ) -> None:
        """Send (prompt, params, collector) requests to the engine in one message."""
        client = current_client.get()
        wire = [
            (
                GenerationRequest(
                    rid=0,
                    model=self.name,
                    prompt_ids=prompt,
                    params=params,
                    max_new_tokens=n,
                    stop_ids=stop_ids,
                    deadline=deadline,
                    client=client,
                ),
                collector,
            )
            for prompt, params, collector in reqs
        ]
        rids = self.core.generate_many(wire)
        for (prompt, _, collector), rid in zip(reqs, rids, strict=True):
            collector.rid = rid
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
        stops: StopStrings | None = None,
        room: Room | None = None,
    ) -> list[Generation]:
        """Generate for every prompt (`params.n` completions each, prompt by prompt); the ones
        still running leave the engine if this is cancelled or one of them fails. `room`: what
        `reserve` held for them (given back as they are sent)."""
        if room is not None:
            room.release(len(prompts) * params.n)
        self.admit(len(prompts) * params.n)
        # The n completions of a prompt: one tokenization, requests sent together (the engine
        # prefills identical prompts admitted together once).
        seqs = [(p, j) for p in prompts for j in range(params.n)]
        tickets = tenants.admit_sequences(self.name, self.limit, [len(p) for p, _ in seqs], n)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        reqs: list[tuple[list[int], SamplingParams, TokenCollector]] = []
        for (p, j), ticket in zip(seqs, tickets):
            pj = completion_params(params, j)
            fut = loop.create_future()
            c = TokenCollector(
                self,
                len(p),
                pj,
                on_done=_resolver(fut, self._released),
                stop_ids=frozenset(stop_ids),
                stops=stops,
            )
            c.ticket = ticket
            futures.append(fut)
            reqs.append((p, pj, c))
        try:
            # One message: the engine admits the n completions of a prompt in the same step.
            self.submit_many(reqs, n, deadline, stop_ids)
        except BaseException:  # the engine is down (restarting): nothing of this request stays held
            for t in tickets:
                if t is not None:
                    t.finish(0)
            raise
        collectors = [c for _, _, c in reqs]
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
        self, texts: Sequence[str | TokenPrompt], params: SamplingParams, *, deadline: float | None
    ) -> list[Generation]:
        n = self.resolve_max_new_tokens(params.max_new_tokens)
        self.check_params(params)
        params = self.with_adapter(params)
        # A full engine answers before the request pays for tokenizing.
        with self.reserve(len(texts) * params.n) as room:
            prompts = await self.prompts(list(texts), n)
            stops = await self.stop_strings(params)
            return await self.run_all(prompts, params, n, deadline, stops=stops, room=room)

    async def generate_stream(
        self, text: str | TokenPrompt, params: SamplingParams, *, deadline: float | None
    ) -> AsyncIterator[StreamChunk]:
        n = self.resolve_max_new_tokens(params.max_new_tokens)
        self.check_params(params)
        params = self.with_adapter(params)
        if params.n != 1:
            raise InvalidArgument(
                f"parameters.n is {params.n}; a stream carries one completion (use the unary call for n > 1)"
            )
        with self.reserve(1):  # given back just before the sequence is sent, below
            (prompt,) = await self.prompts([text], n)
            stops = await self.stop_strings(params)
        self.admit(1)
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def done(result: Any) -> None:
            self._released()
            if isinstance(result, BaseException):
                queue.put_nowait(result)

        (ticket,) = tenants.admit_sequences(self.name, self.limit, [len(prompt)], n)
        c = TokenCollector(self, len(prompt), params, on_done=done, on_chunk=queue.put_nowait, stops=stops)
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


def completion_params(params: SamplingParams, j: int) -> SamplingParams:
    """The j-th of n completions: a seeded request gives each its own (reproducible) seed."""
    if j == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + j)


def check_constraint(kind: str, value: str) -> None:
    """What can be checked before compiling (the engine compiles, and names the field if that
    fails): the kind, the size, JSON where JSON is expected."""
    if kind not in CONSTRAINT_KINDS:
        raise InvalidArgument(
            f"parameters.constraint: kind must be one of {', '.join(CONSTRAINT_KINDS)}; got {kind!r}"
        )
    field = f"parameters.constraint.{kind}"
    if len(value) > MAX_CONSTRAINT_CHARS:
        raise InvalidArgument(f"{field} is {len(value)} characters; the limit is {MAX_CONSTRAINT_CHARS}")
    if kind in ("regex", "grammar") and not value.strip():
        raise InvalidArgument(f"{field} is empty")
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise InvalidArgument(f"{field} is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgument(
                f"{field} must be a JSON object (a JSON Schema), got {type(schema).__name__}"
            )
    if kind == "choice":
        try:
            options = json.loads(value)
        except ValueError as e:
            raise InvalidArgument(f"{field} is not a JSON list of strings: {e}") from None
        if not isinstance(options, list) or not options:
            raise InvalidArgument(f"{field} must list at least one option")
        for i, o in enumerate(options):
            if not isinstance(o, str) or not o:
                raise InvalidArgument(f"{field}[{i}] must be a non-empty string, got {o!r}")


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
