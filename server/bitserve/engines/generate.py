"""Text generation with a causal LM: validation and the async face of the continuous-batching
scheduler (`scheduler.py`), which does the work."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

from ..errors import InvalidArgument
from ..metrics import Metrics
from ..types import Generation, SamplingParams, StreamChunk
from .base import GenerateEngine, register
from .scheduler import CausalLM, Scheduler, Sequence_

GPU_SWITCH_INTERVAL_S = 0.0005


@register
class CausalLMGenerateEngine(GenerateEngine):
    backend = "head"

    @classmethod
    def auto_class(cls) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def __init__(self, settings: Any, loaded: Any, metrics: Metrics):
        super().__init__(settings, loaded, metrics)
        self.scheduler = Scheduler(
            CausalLM(loaded.model, loaded.tokenizer, loaded.device),
            loaded.tokenizer,
            max_concurrent=settings.max_concurrent_sequences,
            prefill_token_budget=settings.prefill_token_budget,
            max_waiting_ms=settings.max_waiting_ms,
            max_queue_size=settings.max_queue_size,
            name=self.name,
            observer=_MetricObserver(metrics, self.name, self.task.value),
        )

    async def start(self) -> None:
        if self.loaded.device.type == "cuda" and sys.getswitchinterval() > GPU_SWITCH_INTERVAL_S:
            # The worker thread launches kernels holding the GIL; the event loop needs it back
            # often and briefly (many short grabs per gRPC message), not every 5 ms.
            sys.setswitchinterval(GPU_SWITCH_INTERVAL_S)
        self.scheduler.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.scheduler.stop()

    # validation ------------------------------------------------------------------------------
    def _sequences(
        self, texts: list[str], params: SamplingParams, deadline: float | None, emits: list[Any], stream: bool
    ) -> list[Sequence_]:
        n = self.resolve_max_new_tokens(params.max_new_tokens)
        ids = self.tokenize_checked(texts)
        ctx = self.loaded.max_context
        for i, t in enumerate(ids):
            if not t:
                raise InvalidArgument(f"texts[{i}] is empty; generation needs at least one prompt token")
            if len(t) + n > ctx:
                raise InvalidArgument(
                    f"max_new_tokens is {n} but texts[{i}] has {len(t)} tokens; model {self.name!r} "
                    f"has a context of {ctx} tokens, so max_new_tokens may be at most {max(ctx - len(t), 0)}"
                )
        return [
            Sequence_(t, params, n, deadline=deadline, emit=e, stream=stream)
            for t, e in zip(ids, emits, strict=True)
        ]

    # requests --------------------------------------------------------------------------------
    async def generate(
        self, texts: list[str], params: SamplingParams, *, deadline: float | None
    ) -> list[Generation]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in texts]
        seqs = self._sequences(list(texts), params, deadline, [_resolver(f) for f in futures], False)
        self.scheduler.submit(seqs)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            # Caller gone (cancelled, deadline) or one text failed: the rest leave the batch.
            for s in seqs:
                s.cancelled = True

    async def generate_stream(
        self, text: str, params: SamplingParams, *, deadline: float | None
    ) -> AsyncIterator[StreamChunk]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        (seq,) = self._sequences([text], params, deadline, [queue.put_nowait], True)
        self.scheduler.submit([seq])
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                # A consumer slower than the decode loop gets the tokens that piled up as one
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
            # Closed early (consumer stopped iterating) or cancelled: free the slot next step.
            seq.cancelled = True


def _resolver(fut: asyncio.Future[Any]) -> Any:
    def emit(payload: Any) -> None:
        if fut.done():
            return
        if isinstance(payload, BaseException):
            fut.set_exception(payload)
        else:
            fut.set_result(payload)

    return emit


class _MetricObserver:
    """Scheduler events -> Prometheus, every series labelled (model, task)."""

    def __init__(self, m: Metrics, model: str, task: str):
        self._depth = m.queue_depth.labels(model, task)
        self._wait = m.queue_wait.labels(model, task)
        self._running = m.running_sequences.labels(model, task)
        self._batch = m.batch_size.labels(model, task)
        self._prompt = m.prompt_tokens.labels(model, task)
        self._generated = m.generated_tokens.labels(model, task)
        self._ttft = m.time_to_first_token.labels(model, task)
        self._itl = m.inter_token_latency.labels(model, task)

    def queue_depth(self, n: int) -> None:
        self._depth.set(n)

    def queue_wait(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def running(self, n: int) -> None:
        self._running.set(n)

    def step(self, n: int) -> None:
        self._batch.observe(n)

    def prompt_tokens(self, n: int) -> None:
        self._prompt.inc(n)

    def tokens(self, n: int, ttft: list[float], itl: list[tuple[float, int]]) -> None:
        self._generated.inc(n)
        for t in ttft:
            self._ttft.observe(t)
        for t, count in itl:
            _observe_n(self._itl, t, count)


def _observe_n(hist: Any, value: float, count: int) -> None:
    """`count` observations of one value at the cost of one (a 64-row step shares one
    inter-token time); falls back to a loop if prometheus_client's internals change."""
    try:
        bounds, buckets, total = hist._upper_bounds, hist._buckets, hist._sum
    except AttributeError:  # pragma: no cover
        for _ in range(count):
            hist.observe(value)
        return
    total.inc(value * count)
    for bound, bucket in zip(bounds, buckets, strict=True):
        if value <= bound:
            bucket.inc(count)
            break
