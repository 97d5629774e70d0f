"""Dynamic batching: one bounded queue per model, one future per text, flush on size or time.

`DynamicBatcher.submit(items)` enqueues the texts of one request and awaits their results.
A single worker task takes up to `max_batch_size` waiting items (from any number of
requests), waits at most `max_batch_delay_ms` for the batch to fill, and runs the model
function once for the whole batch in a worker thread. Every waiting item gets its result or an
error - never silence: a failing batch hands its exception to each of its items; items whose
deadline passed, or whose caller went away, are dropped without running the model.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from bitserve.errors import BitserveError, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741


class Room:
    """Queue places held for a request from its admission check until it enqueues (while it
    tokenizes): the bound counts them, so a burst is refused at its check, at once, and never
    after waiting for tokenization behind the requests that got in. Released once; `release(k)`
    gives back `k` of them (a request that enqueues in parts)."""

    __slots__ = ("_owner", "n")

    def __init__(self, owner: Any, n: int):
        self._owner, self.n = owner, n

    def release(self, k: int | None = None) -> None:
        k = self.n if k is None else min(k, self.n)
        if k > 0:
            self.n -= k
            self._owner.reserved -= k

    def __enter__(self) -> Room:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BatchHooks:
    """Observation points (metrics); the default does nothing."""

    def on_batch(self, size: int) -> None: ...
    def on_queue_wait(self, seconds: float) -> None: ...
    def on_queue_depth(self, depth: int) -> None: ...


@dataclass
class _Pending(Generic[I, O]):
    item: I
    future: asyncio.Future[O]
    enqueued: float
    deadline: float | None


RECENT_SIZES = 1024  # batch sizes kept for introspection: a server that runs for months keeps no more


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    sizes: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=RECENT_SIZES))


class DynamicBatcher(Generic[I, O]):
    def __init__(
        self,
        process: Callable[[list[I]], Sequence[O]] | Callable[[list[I]], Awaitable[Sequence[O]]],
        *,
        max_batch_size: int,
        max_batch_delay_ms: float,
        max_queue_size: int,
        name: str = "batcher",
        hooks: BatchHooks | None = None,
        executor: Executor | None = None,
    ):
        self._process = process
        # `process` may be a coroutine function (the work runs elsewhere, e.g. in an engine
        # process): awaited on the loop; a plain function runs in `executor`.
        self._async = inspect.iscoroutinefunction(process)
        self.max_batch_size = max_batch_size
        self.max_delay = max_batch_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.name = name
        self.hooks = hooks or BatchHooks()
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._queue: collections.deque[_Pending[I, O]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.reserved = 0  # places held by requests between `reserve` and `submit` (tokenizing)
        self.stats = BatcherStats()

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop taking requests; answer everything already accepted, then end the worker."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    # requests --------------------------------------------------------------------------------
    def check_room(self, n: int) -> None:
        """The errors `submit` would give for `n` items, now; held places count as taken."""
        if self._closing or self._task is None:
            raise Unavailable(f"model {self.name!r} is not serving (shutting down or not started)")
        if n > self.max_queue_size:
            raise InvalidArgument(
                f"texts: {n} texts is more than model {self.name!r} can ever queue "
                f"({self.max_queue_size}); send at most {self.max_queue_size} per request"
            )
        if len(self._queue) + self.reserved + n > self.max_queue_size:
            raise ResourceExhausted(
                f"model {self.name!r} queue is full ({len(self._queue) + self.reserved} texts waiting, "
                f"limit {self.max_queue_size}); retry later"
            )

    def reserve(self, n: int) -> Room:
        """Hold room for `n` items, or raise now what `submit` would: before a request pays for
        its tokenization, a full queue answers at once. Pass the room to `submit`; leaving its
        `with` block gives back whatever was not enqueued."""
        self.check_room(n)
        self.reserved += n
        return Room(self, n)

    async def submit(
        self, items: Sequence[I], *, deadline: float | None = None, room: Room | None = None
    ) -> list[O]:
        """Results for `items`, in order. `deadline` is a time.monotonic() value; `room`: the
        places `reserve` held for them (given back here, as the items take them)."""
        if room is not None:
            room.release()
        self.check_room(len(items))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pending = [_Pending(it, loop.create_future(), now, deadline) for it in items]
        self._queue.extend(pending)
        self.hooks.on_queue_depth(len(self._queue))
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except BaseException:
            # The caller is gone (cancelled) or one item failed: stop the rest from running.
            for p in pending:
                if not p.future.done():
                    p.future.cancel()
            # Cancelled items leave the queue now, so that its depth says what really waits.
            self._queue = collections.deque(p for p in self._queue if not p.future.done())
            self.hooks.on_queue_depth(len(self._queue))
            raise

    # worker ----------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Pending[I, O]]:
        batch: list[_Pending[I, O]] = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            p = self._queue.popleft()
            if p.future.done():  # cancelled by its caller
                continue
            if p.deadline is not None and now >= p.deadline:
                p.future.set_exception(
                    DeadlineExceeded("deadline expired while queued; the model was not run")
                )
                continue
            batch.append(p)
        return batch

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Let the batch fill: up to max_delay after the oldest item arrived.
            oldest = self._queue[0].enqueued
            while len(self._queue) < self.max_batch_size and not self._closing:
                remaining = oldest + self.max_delay - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            self.hooks.on_queue_depth(len(self._queue))
            if not batch:
                continue
            started = time.monotonic()
            for p in batch:
                self.hooks.on_queue_wait(started - p.enqueued)
            self.hooks.on_batch(len(batch))
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.sizes.append(len(batch))
            try:
                items = [p.item for p in batch]
                if self._async:
                    results = await self._process(items)  # type: ignore[misc]
                else:
                    results = await loop.run_in_executor(self._executor, self._process, items)
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(batch)} items"
                    )
            except Exception as e:  # every waiting item gets the error
                if isinstance(e, BitserveError):
                    log.warning("batch of %d failed in %s: %s", len(batch), self.name, e.message)
                else:
                    log.exception("batch of %d failed in %s", len(batch), self.name)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, r in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(r)


def run_blocking(executor: Executor, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` in `executor` from async code."""
    return asyncio.get_running_loop().run_in_executor(executor, fn, *args)
