"""DynamicBatcher, without gRPC: batching, limits, deadlines, cancellation, errors, drain."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bitserve.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from bitserve.frontend.batching import DynamicBatcher


class Recorder:
    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.calls: list[list[int]] = []
        self.delay = delay
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: list[int]) -> list[int]:
        self.gate.wait(10)
        self.calls.append(list(batch))
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        return [x * 10 for x in batch]


def make(rec: Recorder, **kw) -> DynamicBatcher[int, int]:
    opts = {"max_batch_size": 8, "max_batch_delay_ms": 20, "max_queue_size": 100}
    opts.update(kw)
    b: DynamicBatcher[int, int] = DynamicBatcher(rec, name="t", **opts)
    b.start()
    return b


async def test_concurrent_requests_share_forward_passes():
    rec = Recorder()
    b = make(rec)
    results = await asyncio.gather(*(b.submit([i]) for i in range(32)))
    await b.stop()
    assert [r[0] for r in results] == [i * 10 for i in range(32)]
    assert len(rec.calls) < 32, "concurrent requests must share batches"
    assert max(len(c) for c in rec.calls) == 8
    assert sorted(x for c in rec.calls for x in c) == list(range(32))


async def test_long_request_is_split_to_max_batch_size_and_keeps_order():
    rec = Recorder()
    b = make(rec, max_batch_size=4)
    out = await b.submit(list(range(10)))
    await b.stop()
    assert out == [i * 10 for i in range(10)]
    assert [len(c) for c in rec.calls] == [4, 4, 2]


async def test_batch_flushes_on_time_when_not_full():
    rec = Recorder()
    b = make(rec, max_batch_size=64, max_batch_delay_ms=30)
    t0 = time.monotonic()
    assert await b.submit([1]) == [10]
    assert time.monotonic() - t0 < 5
    await b.stop()


async def test_error_reaches_every_waiting_request():
    rec = Recorder(fail=True)
    b = make(rec)
    results = await asyncio.gather(*(b.submit([i]) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    rec.fail = False
    assert await b.submit([3]) == [30], "the batcher keeps serving after a failed batch"
    await b.stop()


async def test_full_queue_is_refused_with_resource_exhausted():
    rec = Recorder()
    rec.gate.clear()  # hold the worker inside the first batch: the queue fills up
    b = make(rec, max_queue_size=3, max_batch_size=1, max_batch_delay_ms=0)
    first = asyncio.ensure_future(b.submit([1]))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(b.submit([2, 3]))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match=r"queue is full \(2 texts waiting, limit 3\); retry later"):
        await b.submit([4, 5])
    # More texts than the queue can ever hold: no retry could help, so INVALID_ARGUMENT.
    with pytest.raises(InvalidArgument, match="4 texts is more than model 't' can ever queue"):
        await b.submit([1, 2, 3, 4])
    rec.gate.set()
    assert await first == [10] and await queued == [20, 30]
    await b.stop()


async def test_expired_deadline_fails_without_running_the_model():
    rec = Recorder()
    rec.gate.clear()  # hold the worker inside the first batch
    b = make(rec, max_batch_size=1, max_batch_delay_ms=0)
    first = asyncio.ensure_future(b.submit([1]))
    await asyncio.sleep(0.05)
    late = asyncio.ensure_future(b.submit([2], deadline=time.monotonic() + 0.01))
    await asyncio.sleep(0.05)
    rec.gate.set()
    assert await first == [10]
    with pytest.raises(DeadlineExceeded):
        await late
    assert rec.calls == [[1]], "an expired item must not reach the model"
    await b.stop()


async def test_cancelled_request_is_dropped_before_it_runs():
    rec = Recorder()
    rec.gate.clear()
    b = make(rec, max_batch_size=1, max_batch_delay_ms=0)
    first = asyncio.ensure_future(b.submit([1]))
    await asyncio.sleep(0.05)
    gone = asyncio.ensure_future(b.submit([2]))
    await asyncio.sleep(0.01)
    gone.cancel()
    rec.gate.set()
    assert await first == [10]
    await b.stop()
    assert rec.calls == [[1]]


async def test_stop_answers_everything_accepted_then_refuses():
    rec = Recorder(delay=0.01)
    b = make(rec, max_batch_size=2)
    pending = [asyncio.ensure_future(b.submit([i])) for i in range(6)]
    await asyncio.sleep(0)
    await b.stop()
    assert [(await p)[0] for p in pending] == [i * 10 for i in range(6)]
    with pytest.raises(Unavailable):
        await b.submit([1])


async def test_batch_statistics_stay_bounded_however_long_it_runs():
    """Issue 17: `stats.sizes` kept every batch size forever (memory growing with uptime); it
    keeps the last 1,024 (`batching.RECENT_SIZES`) while the counters count everything."""

    async def process(batch: list[int]) -> list[int]:
        return batch

    b: DynamicBatcher[int, int] = DynamicBatcher(
        process, max_batch_size=1, max_batch_delay_ms=0, max_queue_size=10, name="bounded"
    )
    b.start()
    n = 3000
    for i in range(n):
        assert await b.submit([i]) == [i]
    await b.stop()
    assert b.stats.batches == n and b.stats.items == n
    assert len(b.stats.sizes) == 1024 and set(b.stats.sizes) == {1}
