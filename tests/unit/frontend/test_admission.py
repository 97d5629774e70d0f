"""A full model refuses at once: the places of requests still tokenizing count against the queue
bound, so a refusal never waits behind their tokenization (issue 17, the burst), and an
accepted request keeps its place until it is answered.

The tokenizer and the engine process are fakes that block until the test lets them go: with the
queue itself still empty (everything admitted is tokenizing), a further request must be refused
before the loop has run anything else. On the old code (a check of the queue only, then
tokenization, then a second check) it passed the check and waited for the blocked tokenizer."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from bitserve.errors import InvalidArgument, ResourceExhausted
from bitserve.frontend.classify import HeadSentimentEngine
from bitserve.metrics import Metrics
from bitserve.settings import ModelSettings
from bitserve.types import Task


class BlockedTokenizer:
    """Encodes a text as one id per word, once `gate` is set; counts the texts it was given."""

    pad_token = "<pad>"
    eos_token = "</s>"
    unk_token = "<unk>"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.seen: list[str] = []

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        assert self.gate.wait(30), "the test never let the tokenizer go"
        self.seen += texts
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


class FakeCore:
    """The engine process: answers a batch (one score pair per item) when `go` is set."""

    ready = True
    id = "fake"

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.batches: list[int] = []

    async def call(self, op: str, name: str, batch: list[Any]) -> list[list[float]]:
        await self.go.wait()
        self.batches.append(len(batch))
        return [[0.25, 0.75] for _ in batch]


async def _engine(tmp_path, queue: int = 4) -> tuple[HeadSentimentEngine, BlockedTokenizer, FakeCore]:
    settings = ModelSettings(
        name="s",
        task=Task.SENTIMENT,
        path=str(tmp_path),
        max_queue_size=queue,
        max_batch_size=4,
        max_batch_delay_ms=1,
        max_input_tokens=8,
    )
    tok = BlockedTokenizer()
    loaded = SimpleNamespace(
        config=SimpleNamespace(id2label={0: "NEGATIVE", 1: "POSITIVE"}, num_labels=2),
        tokenizer=tok,
        max_context=64,
    )
    core = FakeCore()
    engine = HeadSentimentEngine(settings, loaded, Metrics(), core)  # type: ignore[arg-type]
    await engine.start()
    return engine, tok, core


async def _spin(n: int = 20) -> None:
    """Let the loop run everything that is ready, a few times over."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_refusal_does_not_wait_for_the_tokenization_of_admitted_requests(tmp_path):
    engine, tok, core = await _engine(tmp_path, queue=4)
    try:
        admitted = [
            asyncio.create_task(engine.sentiment(["good film", "bad"], deadline=None)) for _ in range(2)
        ]
        await _spin()
        assert engine._batcher.depth == 0  # nothing is queued yet: both are tokenizing
        assert not any(t.done() for t in admitted)
        refused = asyncio.create_task(engine.sentiment(["too many"], deadline=None))
        await _spin()
        # Answered while the tokenizer is still blocked: it never waited behind the others.
        assert refused.done(), "the refusal waited for the tokenization of admitted requests"
        with pytest.raises(ResourceExhausted, match=r"queue is full \(4 texts waiting, limit 4\)"):
            refused.result()
        assert tok.seen == []  # the refused text was never tokenized
        # The admitted requests are not lost: they get their results once the work can run.
        tok.gate.set()
        core.go.set()
        results = await asyncio.wait_for(asyncio.gather(*admitted), 30)
        assert [[r.label for r in rs] for rs in results] == [["positive", "positive"]] * 2
        assert sorted(tok.seen) == sorted(["good film", "bad"] * 2)
        assert sum(core.batches) == 4
        # Their places are given back: the queue takes a full request again.
        assert engine._batcher.reserved == 0 and engine._batcher.depth == 0
        assert len(await engine.sentiment(["a", "b", "c", "d"], deadline=None)) == 4
    finally:
        tok.gate.set()
        core.go.set()
        await engine.stop()


async def test_a_request_that_fails_before_it_is_queued_gives_its_places_back(tmp_path):
    engine, tok, core = await _engine(tmp_path, queue=4)
    tok.gate.set()
    core.go.set()
    try:
        long_text = " ".join(["word"] * 20)  # 20 tokens, over max_input_tokens 8
        with pytest.raises(InvalidArgument, match=r"texts\[1\] is 20 tokens"):
            await engine.sentiment(["fine", long_text, "x", "y"], deadline=None)
        assert engine._batcher.reserved == 0
        # A cancelled request (its caller left while it was tokenizing) gives them back too.
        tok.gate.clear()
        task = asyncio.create_task(engine.sentiment(["a", "b", "c", "d"], deadline=None))
        await _spin()
        assert engine._batcher.reserved == 4
        task.cancel()
        tok.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine._batcher.reserved == 0
        assert len(await engine.sentiment(["a", "b", "c", "d"], deadline=None)) == 4
    finally:
        tok.gate.set()
        await engine.stop()
