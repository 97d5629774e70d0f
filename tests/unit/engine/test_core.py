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


def test_an_idle_engine_releases_the_empty_batchs_kv_pages_once_it_stays_idle(
    loaded, tiny_models, monkeypatch
):
    """The persistent batch keeps its CPU buffers between requests; the loop hands their pages
    back once it has been idle RELEASE_AFTER_IDLE_S after work - not between two requests of a
    client that sends one after another, not while rows run, and only once."""
    import time

    from bitserve.engine import core as core_mod

    monkeypatch.setattr(core_mod, "RELEASE_AFTER_IDLE_S", 0.05)
    settings = ModelSettings(name="lm", task="generate", path=str(tiny_models["lm"]))
    core = Core(workers.workers_for(loaded, [settings]), lambda m: None)
    slots = core.w.scheduler.slots
    assert slots is not None
    released: list[tuple[int, float]] = []
    real = slots.release_pages
    slots.release_pages = lambda: released.append((len(slots), time.monotonic())) or real()  # type: ignore[method-assign]
    prompt = loaded.tokenizer("Hello world")["input_ids"]

    def request(rid: int) -> list:
        req = GenerationRequest(rid, "lm", prompt, SamplingParams(max_new_tokens=5), 5)
        return [[P.GENERATE, rid, P.request_to_wire(req, whole=True)]]

    # Request 1 at once; request 2 on the first short wait after it (well within the delay).
    inbox = [request(1)]
    log: list[tuple[int, int]] = []  # (timeout, releases so far) per wait
    finished: list[float] = []

    def recv(timeout_ms: int) -> list[list]:
        log.append((timeout_ms, len(released)))
        if inbox:
            return inbox.pop(0)
        if core.w.scheduler.has_work():
            return []
        if len(finished) == 0:
            finished.append(time.monotonic())
            return request(2)
        if timeout_ms < core_mod.IDLE_POLL_MS:
            time.sleep(timeout_ms / 1000)  # a poll that times out
        return []

    with torch.inference_mode():
        core.serve(recv, alive=lambda: sum(t == core_mod.IDLE_POLL_MS for t, _ in log) < 3)
    assert len(released) == 1 and released[0][0] == 0  # once, with no row held
    assert released[0][1] - finished[0] >= 0.05  # after request 2 and its idle delay
    # Every wait before the release was short (the delay) or came before any work; after it,
    # the idle polls.
    first_release = next(i for i, (_, n) in enumerate(log) if n == 1)
    assert all(t < core_mod.IDLE_POLL_MS for t, _ in log[1:first_release])
    assert all(t == core_mod.IDLE_POLL_MS for t, _ in log[first_release:])
    assert slots.cache is not None  # the buffers themselves stay
