"""The engine loop's messages to the front: a unary answer without stop strings comes in one
message when it finishes (ids, logprobs, finish), stats only when they change."""

from __future__ import annotations

import pytest
import torch

from bitserve.engine import workers
from bitserve.engine.core import Core
from bitserve.ipc import protocol as P
from bitserve.settings import ModelSettings
from bitserve.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return workers.load(ModelSettings(name="lm", task="generate", path=str(tiny_models["lm"])))


def _run(loaded, tiny_models, whole: bool, n: int = 6, top_logprobs: int = 0) -> list[list]:
    settings = ModelSettings(name="lm", task="generate", path=str(tiny_models["lm"]))
    sent: list[list] = []
    core = Core(workers.workers_for(loaded, [settings]), sent.append)
    core.w.scheduler.lm.eos = frozenset()  # the length limit ends it
    prompt = loaded.tokenizer("Hello world")["input_ids"]
    req = GenerationRequest(
        1, "lm", prompt, SamplingParams(max_new_tokens=n, logprobs=True, top_logprobs=top_logprobs), n
    )
    core.handle([P.GENERATE, 1, P.request_to_wire(req, whole=whole)])
    with torch.inference_mode():
        for _ in range(n + 3):
            core.step()
    return [P.unpack(P.pack(m)) for m in sent]  # as it crosses the process boundary


def test_a_whole_answer_is_one_message_with_every_token_and_logprob(loaded, tiny_models):
    per_token = _run(loaded, tiny_models, whole=False)
    whole = _run(loaded, tiny_models, whole=True)
    streamed = [t for m in per_token for t in m[1]]
    assert len(streamed) == 6 and len([m for m in per_token if m[1]]) == 6
    (done,) = [f for m in whole for f in m[3]]
    rid, ids, lps, finish, first, tops = done
    assert rid == 1 and finish == "length" and tops is None
    assert ids == [t[1] for t in streamed] and lps == [t[2] for t in streamed]
    assert not any(m[1] for m in whole)
    # Stats only when they change: the admission (a row runs) and the finish (none runs).
    assert len(whole) == 2
    assert [m[2]["running"] for m in whole] == [{"lm": 1}, {}]
    # Every decode step is still reported, for the batch-size histogram.
    assert sum(len(m[2]["steps"]) for m in whole) == sum(len(m[2]["steps"]) for m in per_token) == 5


def test_a_whole_answer_keeps_the_top_logprobs_of_every_token(loaded, tiny_models):
    per_token = _run(loaded, tiny_models, whole=False, top_logprobs=3)
    whole = _run(loaded, tiny_models, whole=True, top_logprobs=3)
    streamed = [t for m in per_token for t in m[1]]
    (done,) = [f for m in whole for f in m[3]]
    tops = done[5]
    assert tops == [t[4] for t in streamed]
    assert len(tops) == 6 and all(len(top) == 3 for top in tops)


def test_an_idle_engine_releases_the_empty_batchs_kv_pages_once(loaded, tiny_models):
    """The persistent batch keeps its CPU buffers between requests; when the loop falls idle
    after work it hands their pages back, once (not on every idle poll, not while rows run)."""
    from bitserve.engine.core import IDLE_POLL_MS

    settings = ModelSettings(name="lm", task="generate", path=str(tiny_models["lm"]))
    core = Core(workers.workers_for(loaded, [settings]), lambda m: None)
    slots = core.w.scheduler.slots
    assert slots is not None
    released: list[int] = []
    real = slots.release_pages
    slots.release_pages = lambda: released.append(len(slots)) or real()  # type: ignore[method-assign]
    prompt = loaded.tokenizer("Hello world")["input_ids"]
    req = GenerationRequest(1, "lm", prompt, SamplingParams(max_new_tokens=5), 5)
    inbox = [[[P.GENERATE, 1, P.request_to_wire(req, whole=True)]]]
    idle_polls = []

    def recv(timeout_ms: int) -> list[list]:
        if timeout_ms == IDLE_POLL_MS:
            idle_polls.append(len(released))
        return inbox.pop(0) if inbox else []

    with torch.inference_mode():
        core.serve(recv, alive=lambda: len(idle_polls) < 3)
    assert released == [0]  # once, with no row held
    # The first wait comes before the request (nothing to release); after the work, released
    # before the next idle wait, then never again.
    assert idle_polls == [0, 1, 1]
    assert slots.cache is not None  # the buffers themselves stay
