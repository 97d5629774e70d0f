"""Continuous batching and sampling, at the engine level (no gRPC): the tiny Llama on CPU.

The front half of the generate engine talks to the real engine loop (`engine.core.Core`, the
scheduler) running on a thread (`LocalEngine`): same messages, no process, so the scheduler
can be inspected."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from bitserve.engine import workers
from bitserve.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from bitserve.frontend.generate import CausalLMGenerateEngine
from bitserve.metrics import Metrics
from bitserve.settings import ModelSettings
from bitserve.types import FinishReason, SamplingParams

from ...numeric import forward_bound, log_softmax_bound

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over",
    "I love",
    "Stock markets fell as the bank raised interest rates today and",
    "la maison",
]


def _settings(path, **kw) -> ModelSettings:
    return ModelSettings(name="lm", task="generate", path=str(path), **kw)


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return workers.load(_settings(tiny_models["lm"]))


@pytest.fixture
async def make_engine(loaded, tiny_models):
    from bitserve.engine.workers import workers_for
    from bitserve.frontend.registry import stats_hook
    from bitserve.ipc.local import LocalEngine

    engines: list[CausalLMGenerateEngine] = []

    async def make(**kw) -> CausalLMGenerateEngine:
        settings = _settings(tiny_models["lm"], **kw)
        metrics = Metrics()
        core = LocalEngine(workers_for(loaded, [settings]), on_stats=stats_hook(metrics, [settings]))
        await core.start()
        e = CausalLMGenerateEngine(settings, loaded, metrics, core)
        e.scheduler = core.scheduler  # type: ignore[attr-defined]
        await e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        await e.stop()
        await e.core.stop()


@pytest.fixture
async def engine(make_engine):
    return await make_engine()


def solo_greedy(loaded, prompt: str, n: int, eos: int | None = None) -> list[int]:
    tok, model = loaded.tokenizer, loaded.model
    enc = tok(prompt, return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


def slow_steps(engine, seconds: float = 0.004) -> None:
    """Make each decode step take a while, so the test can act while a batch is running."""
    decode = engine.scheduler.lm.decode

    def slow(batch):
        time.sleep(seconds)
        return decode(batch)

    engine.scheduler.lm.decode = slow


def ids(gen) -> list[int]:
    return [t.id for t in gen.logprobs]


GREEDY = SamplingParams(max_new_tokens=24, logprobs=True)


async def test_greedy_equals_solo_generate_under_continuous_batching(engine, loaded):
    """Prompts of different lengths arrive while others decode; each matches its solo run."""
    lengths = [24, 9, 17, 30, 5]

    async def one(i: int):
        await asyncio.sleep(0.004 * i)  # staggered: later ones join a running batch
        p = SamplingParams(max_new_tokens=lengths[i], logprobs=True)
        return (await engine.generate([PROMPTS[i]], p, deadline=None))[0]

    gens = await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
    for i, g in enumerate(gens):
        want = solo_greedy(loaded, PROMPTS[i], lengths[i])
        assert ids(g) == want, PROMPTS[i]
        assert g.text == loaded.tokenizer.decode(want, skip_special_tokens=True)
        assert g.finish_reason is FinishReason.LENGTH
        assert g.generated_tokens == lengths[i]
        assert g.prompt_tokens == len(loaded.tokenizer(PROMPTS[i])["input_ids"])
    assert engine.scheduler.stats.max_running > 1  # they really shared a batch


async def test_one_request_many_texts_and_mixed_sampling_keep_greedy_rows_exact(engine, loaded):
    sampled = SamplingParams(
        max_new_tokens=20, temperature=0.9, top_k=30, top_p=0.9, seed=1, repetition_penalty=1.2
    )
    greedy_task = asyncio.create_task(engine.generate(PROMPTS, GREEDY, deadline=None))
    sampled_task = asyncio.create_task(engine.generate(PROMPTS[:3], sampled, deadline=None))
    gens, _ = await asyncio.gather(greedy_task, sampled_task)
    for p, g in zip(PROMPTS, gens, strict=True):
        assert ids(g) == solo_greedy(loaded, p, 24)


async def test_request_arriving_mid_decode_starts_before_running_ones_finish(make_engine):
    engine = await make_engine()
    slow_steps(engine)
    long = SamplingParams(max_new_tokens=90)
    streams = [engine.generate_stream(p, long, deadline=None) for p in PROMPTS[:3]]
    firsts = [await s.__anext__() for s in streams]  # all three are decoding now
    assert all(c.final is None for c in firsts)
    finished_long: list[float] = []

    async def drain(s):
        async for c in s:
            if c.final is not None:
                finished_long.append(time.monotonic())

    drains = [asyncio.create_task(drain(s)) for s in streams]
    short = (await engine.generate(["I love"], SamplingParams(max_new_tokens=3), deadline=None))[0]
    short_done = time.monotonic()
    assert short.generated_tokens == 3
    await asyncio.gather(*drains)
    assert len(finished_long) == 3
    assert short_done < min(finished_long)  # it joined the running batch and left early
    assert engine.scheduler.stats.max_running == 4


async def test_seed_reproduces_and_differs_across_seeds(engine):
    def params(seed):
        return SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=seed)

    a = await engine.generate([PROMPTS[1]], params(7), deadline=None)
    # Same seed inside a busier batch (other rows, other parameters) gives the same text.
    b, _ = await asyncio.gather(
        engine.generate([PROMPTS[1]], params(7), deadline=None),
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=30, temperature=0.5), deadline=None),
    )
    c = await engine.generate([PROMPTS[1]], params(8), deadline=None)
    assert a[0].text == b[0].text
    assert a[0].text != c[0].text


async def test_top_k_one_is_greedy_and_repetition_penalty_changes_output(engine, loaded):
    k1 = SamplingParams(max_new_tokens=20, temperature=1.5, top_k=1, seed=3, logprobs=True)
    g = (await engine.generate([PROMPTS[0]], k1, deadline=None))[0]
    assert ids(g) == solo_greedy(loaded, PROMPTS[0], 20)
    pen = SamplingParams(max_new_tokens=20, repetition_penalty=5.0, logprobs=True)
    p = (await engine.generate([PROMPTS[0]], pen, deadline=None))[0]
    with torch.inference_mode():
        enc = loaded.tokenizer(PROMPTS[0], return_tensors="pt").to(loaded.device)
        want = loaded.model.generate(
            **enc, max_new_tokens=20, do_sample=False, repetition_penalty=5.0, eos_token_id=None
        )[0, enc["input_ids"].shape[1] :].tolist()
    assert ids(p) == want


@pytest.mark.numeric
async def test_logprobs_are_model_log_probabilities(engine, loaded):
    """Each reported logprob equals the model's own log-softmax at that position for that token."""
    g = (await engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=5, logprobs=True), deadline=None))[
        0
    ]
    assert len(g.logprobs) == 5
    prompt = loaded.tokenizer(PROMPTS[2])["input_ids"]
    full = torch.tensor([prompt + ids(g)], device=loaded.device)
    with torch.inference_mode():
        logits = loaded.model(input_ids=full).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    # The engine decodes step by step from its KV cache, the reference runs one full forward:
    # the same fp32 function with other reduction orders (tests/numeric.py).
    tol = log_softmax_bound(forward_bound(loaded.model.config, full.shape[1], logits.abs().max().item()))
    for k, lp in enumerate(g.logprobs):
        want = float(logp[len(prompt) - 1 + k, lp.id])
        assert lp.logprob == pytest.approx(want, abs=tol), (k, tol)
        assert lp.text == loaded.tokenizer.decode([lp.id])


async def test_stop_sequence_cuts_text_and_stream(engine, loaded):
    full = (await engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=30), deadline=None))[0].text
    stop = full[10:13]
    assert stop and full.find(stop) >= 0
    cut = full[: full.find(stop)]
    p = SamplingParams(max_new_tokens=30, stop=("never-appears", stop))
    g = (await engine.generate([PROMPTS[3]], p, deadline=None))[0]
    assert g.text == cut
    assert g.finish_reason is FinishReason.STOP
    assert g.generated_tokens < 30
    chunks = [c async for c in engine.generate_stream(PROMPTS[3], p, deadline=None)]
    assert "".join(c.text for c in chunks) == cut == chunks[-1].final.text
    assert chunks[-1].final.finish_reason is FinishReason.STOP


async def test_stream_pieces_concatenate_to_final_text(engine, loaded):
    p = SamplingParams(max_new_tokens=40, logprobs=True)
    chunks = [c async for c in engine.generate_stream(PROMPTS[1], p, deadline=None)]
    final = chunks[-1].final
    assert final is not None and all(c.final is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == final.text
    assert [t.id for c in chunks for t in c.tokens] == solo_greedy(loaded, PROMPTS[1], 40)
    assert final.text == loaded.tokenizer.decode(
        solo_greedy(loaded, PROMPTS[1], 40), skip_special_tokens=True
    )


async def test_eos_ends_generation_and_is_not_in_text(engine, loaded):
    want = solo_greedy(loaded, PROMPTS[1], 20)
    eos = want[5]  # pretend the 6th greedy token is the model's eos
    engine.scheduler.lm.eos = {eos}
    g = (await engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=20), deadline=None))[0]
    first = want.index(eos)
    assert g.finish_reason is FinishReason.EOS
    assert g.generated_tokens == first + 1
    assert g.text == loaded.tokenizer.decode(want[:first], skip_special_tokens=True)


async def test_cancelled_stream_stops_decoding_and_frees_its_slot(make_engine):
    engine = await make_engine(max_concurrent_sequences=1)
    sched = engine.scheduler
    slow_steps(engine)
    stream = engine.generate_stream(PROMPTS[0], SamplingParams(max_new_tokens=100), deadline=None)
    await stream.__anext__()
    await stream.__anext__()
    while sched.batch is None:
        await asyncio.sleep(0.001)
    (seq,) = sched.batch.seqs
    await stream.aclose()  # the consumer goes away (gRPC cancel / deadline)
    for _ in range(200):
        if not sched.running:
            break
        await asyncio.sleep(0.005)
    assert not sched.running
    steps = sched.stats.steps
    await asyncio.sleep(0.05)
    assert sched.stats.steps == steps  # nothing decodes any more
    assert len(seq.token_ids) < 20
    # The one slot is free again: a new request runs.
    g = (await engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=4), deadline=None))[0]
    assert g.generated_tokens == 4


async def test_cancelled_unary_call_leaves_the_batch(engine):
    slow_steps(engine)
    task = asyncio.create_task(
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=100), deadline=None)
    )
    while engine.scheduler.stats.steps < 3:
        await asyncio.sleep(0.002)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if not engine.scheduler.running:
            break
        await asyncio.sleep(0.005)
    assert not engine.scheduler.running
    assert engine.scheduler.stats.steps < 60


async def test_deadline_passed_before_admission_does_not_run_model(engine):
    prefills = engine.scheduler.stats.prefills
    with pytest.raises(DeadlineExceeded):
        await engine.generate([PROMPTS[0]], GREEDY, deadline=time.monotonic() - 1)
    assert engine.scheduler.stats.prefills == prefills


async def test_max_new_tokens_validated_against_context_and_limit(make_engine, loaded):
    engine = await make_engine(max_new_tokens_limit=200)
    with pytest.raises(InvalidArgument, match="max_new_tokens") as e:
        await engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=128), deadline=None)
    assert str(loaded.max_context) in e.value.message
    with pytest.raises(InvalidArgument, match="max_new_tokens.*at most 200"):
        await engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=201), deadline=None)
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        await engine.generate_stream(
            PROMPTS[3], SamplingParams(max_new_tokens=128), deadline=None
        ).__anext__()


async def test_queue_full_is_resource_exhausted_and_too_many_texts_invalid(make_engine):
    engine = await make_engine(max_queue_size=2, max_concurrent_sequences=1)
    # 3 texts can never fit a queue of 2: retrying cannot help, so INVALID_ARGUMENT.
    with pytest.raises(InvalidArgument, match="can ever queue"):
        await engine.generate(PROMPTS[:3], GREEDY, deadline=None)
    slow_steps(engine)
    first = asyncio.create_task(
        engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=30), deadline=None)
    )
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match="retry later"):  # 2 outstanding + 2 > 2 + 1
        await engine.generate(PROMPTS[2:4], GREEDY, deadline=None)
    assert [g.generated_tokens for g in await first] == [30, 30]


async def test_a_refusal_does_not_wait_for_the_tokenization_of_admitted_requests(make_engine):
    """Issue 17's burst: requests still tokenizing hold their places, so a full engine refuses
    the next one at once, not after the blocked tokenization it would otherwise queue behind
    (the old code checked `outstanding` only, which counts sequences already sent)."""
    engine = await make_engine(max_queue_size=2, max_concurrent_sequences=1)  # room for 3
    gate = threading.Event()
    engine._tokenize_pool.submit(gate.wait, 30)  # the tokenization thread is busy until `gate`
    try:
        admitted = [asyncio.create_task(engine.generate([p], GREEDY, deadline=None)) for p in PROMPTS[:3]]
        for _ in range(20):
            await asyncio.sleep(0)
        assert engine.outstanding == 0  # all three are tokenizing: none is sent yet
        refused = asyncio.create_task(engine.generate([PROMPTS[3]], GREEDY, deadline=None))
        for _ in range(20):
            await asyncio.sleep(0)
        assert refused.done(), "the refusal waited for the tokenization of admitted requests"
        with pytest.raises(ResourceExhausted, match=r"is full \(3 sequences running or queued, limit 3\)"):
            refused.result()
    finally:
        gate.set()
    gens = await asyncio.wait_for(asyncio.gather(*admitted), 60)  # none of the admitted is lost
    assert [g.generated_tokens for (g,) in gens] == [GREEDY.max_new_tokens] * 3
    assert engine.reserved == 0 and engine.outstanding == 0


async def test_a_tenant_at_its_limit_is_refused_without_using_the_tokenization_thread(make_engine):
    """Issue 22: a hog tenant's calls over its concurrency limit are refused before they are
    tokenized, so they never queue on the tokenization thread another tenant's requests need
    (the old code tokenized them first, then refused them)."""
    from bitserve.frontend.tenants import Tenants, current_tenant
    from bitserve.settings import TenantSettings

    engine = await make_engine()
    hog = Tenants({"hog": TenantSettings(max_concurrent_sequences=1)}).get("hog")
    assert hog is not None
    hog.sequences = 1  # at its limit
    gate = threading.Event()
    engine._tokenize_pool.submit(gate.wait, 30)  # the tokenization thread is busy until `gate`
    token = current_tenant.set(hog)
    try:
        refused = asyncio.create_task(engine.generate([PROMPTS[0]], GREEDY, deadline=None))
        stream = engine.generate_stream(PROMPTS[0], GREEDY, deadline=None)
        streamed = asyncio.create_task(stream.__anext__())  # type: ignore[attr-defined]
    finally:
        current_tenant.reset(token)
    try:
        for _ in range(20):
            await asyncio.sleep(0)
        assert refused.done() and streamed.done(), "a refusal waited for the tokenization thread"
        for task in (refused, streamed):
            with pytest.raises(ResourceExhausted, match="at its limit of 1 concurrent sequences"):
                task.result()
    finally:
        gate.set()
    assert engine.reserved == 0 and engine.outstanding == 0


async def test_stop_finishes_accepted_requests_then_refuses(make_engine):
    engine = await make_engine(max_concurrent_sequences=2)
    task = asyncio.create_task(engine.generate(PROMPTS, SamplingParams(max_new_tokens=10), deadline=None))
    await asyncio.sleep(0.01)  # submitted
    await engine.core.stop()  # the engine finishes what it accepted, then ends
    gens = await task
    assert [g.generated_tokens for g in gens] == [10] * len(PROMPTS)
    with pytest.raises(Unavailable):
        await engine.generate([PROMPTS[0]], GREEDY, deadline=None)


async def test_generation_metrics(engine):
    await engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6), deadline=None)
    reg = engine.metrics.registry
    labels = {"model": "lm", "task": "generate"}
    assert reg.get_sample_value("bitserve_generated_tokens_total", labels) == 12
    assert reg.get_sample_value("bitserve_time_to_first_token_seconds_count", labels) == 2
    assert reg.get_sample_value("bitserve_inter_token_latency_seconds_count", labels) == 10
    assert reg.get_sample_value("bitserve_batch_size_count", labels) >= 5
    assert reg.get_sample_value("bitserve_prompt_tokens_total", labels) > 0
    assert reg.get_sample_value("bitserve_queue_wait_seconds_count", labels) == 2
    assert reg.get_sample_value("bitserve_running_sequences", labels) == 0


async def test_long_generations_cross_cache_growth_and_match_solo_generate(engine, loaded):
    """The decode cache grows in place with headroom and the decode mask is passed 4-D: rows
    that run past the headroom (64) while others join and leave still match solo runs."""
    from bitserve.engine.worker.kv_cache import _grow_layer_class, new_cache

    lengths = [100, 7, 80, 3, 70]

    async def one(i: int):
        await asyncio.sleep(0.003 * i)
        p = SamplingParams(max_new_tokens=lengths[i], logprobs=True)
        return (await engine.generate([PROMPTS[i]], p, deadline=None))[0]

    gens = await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
    for i, g in enumerate(gens):
        assert ids(g) == solo_greedy(loaded, PROMPTS[i], lengths[i]), PROMPTS[i]
    assert engine.scheduler.lm._mask_4d  # the tiny Llama runs SDPA
    cache = new_cache(engine.scheduler.lm.model)
    assert all(type(layer) is _grow_layer_class() for layer in cache.layers)


def test_nearly_full_batch_waits_for_company_only_when_a_row_is_due():
    from bitserve.engine.sched.policy import MAX_DEFER_STEPS, Budget, Policy, Waiting

    policy = Policy(Budget(max_concurrent=8, prefill_tokens=4096))
    waiting = [Waiting(prompt_len=2, arrived=0.0)]
    remaining = [100] * 7  # one slot free: below the join group (8 // 4 = 2)
    # No running row leaves within the deferral window: waiting would only idle the slot.
    assert policy.schedule(waiting, remaining, now=1.0).admit == [0]
    # A row is due in 5 steps: wait for it (up to MAX_DEFER_STEPS), then join together.
    remaining[0] = 5
    waits = 0
    while not policy.schedule(waiting, remaining, now=1.0).admit:
        waits += 1
    assert 0 < waits <= MAX_DEFER_STEPS


async def test_stream_sends_a_message_per_token_when_steps_are_slow(make_engine):
    """A stream that keeps up gets a message per token (the front groups tokens only when its
    consumer falls behind)."""
    engine = await make_engine()
    slow_steps(engine, 0.004)
    p = SamplingParams(max_new_tokens=12, logprobs=True)
    chunks = [c async for c in engine.generate_stream(PROMPTS[0], p, deadline=None)]
    assert [len(c.tokens) for c in chunks] == [1] * 12


def test_length_groups_split_prompts_only_when_padding_costs_more_than_a_pass():
    from bitserve.engine.sched.policy import length_groups

    mixed = [4, 50] * 10
    short, long = list(range(0, 20, 2)), list(range(1, 20, 2))
    assert length_groups(mixed, 1000) == [list(range(20))]  # 460 padded tokens < one pass
    assert length_groups(mixed, 100) == [short, long]  # shortest first, nothing lost
    assert length_groups([7], 0) == [[0]]


async def test_prompts_prefilled_in_length_groups_match_solo_generate(make_engine, loaded, monkeypatch):
    from bitserve.engine.sched import scheduler

    monkeypatch.setitem(scheduler.PREFILL_PASS_TOKENS, "cpu", 1)  # split wherever lengths differ
    engine = await make_engine()
    if engine.scheduler.lm.device.type != "cpu":
        monkeypatch.setattr(scheduler, "PREFILL_PASS_TOKENS_DEFAULT", 1)
    gens = await engine.generate(PROMPTS, GREEDY, deadline=None)
    for p, g in zip(PROMPTS, gens, strict=True):
        assert ids(g) == solo_greedy(loaded, p, 24), p
    assert engine.scheduler.stats.prefills > 1


@pytest.mark.parametrize("finish", ["length-1", "length-24", "eos", "stop"])
async def test_stream_pieces_add_up_to_the_final_text_for_every_finish(engine, loaded, finish):
    """Joined, the streamed pieces are the final text, whatever ended the generation (the last
    token's text used to be missing when the length limit ended it)."""
    want = solo_greedy(loaded, PROMPTS[1], 24)
    full = loaded.tokenizer.decode(want, skip_special_tokens=True)
    if finish == "length-1":
        p = SamplingParams(max_new_tokens=1)
    elif finish == "eos":
        engine.scheduler.lm.eos = frozenset({want[7]})
        p = SamplingParams(max_new_tokens=24)
    elif finish == "stop":
        p = SamplingParams(max_new_tokens=24, stop=(full[6:9],))
    else:
        p = SamplingParams(max_new_tokens=24)
    chunks = [c async for c in engine.generate_stream(PROMPTS[1], p, deadline=None)]
    final = chunks[-1].final
    assert final is not None
    assert "".join(c.text for c in chunks) == final.text
    assert final.text != "" or finish == "stop"
    if finish == "length-1":
        assert final.text == loaded.tokenizer.decode(want[:1], skip_special_tokens=True)


def test_policy_admits_round_robin_across_clients_and_answers_expired():
    from bitserve.engine.sched.policy import Budget, Policy, Waiting

    policy = Policy(Budget(max_concurrent=4, prefill_tokens=10_000))
    heavy = [Waiting(prompt_len=5, arrived=float(i), client="heavy") for i in range(6)]
    light = [Waiting(prompt_len=5, arrived=10.0, client="light")]
    expired = [Waiting(prompt_len=5, arrived=0.0, deadline=11.0, client="light")]
    waiting = heavy + light + expired
    d = policy.schedule(waiting, [], now=12.0)
    assert d.expired == [7]
    # Four slots: the light client's one request gets one of them despite arriving last.
    assert d.admit == [0, 6, 1, 2]


def test_policy_idle_window_and_prefill_budget():
    from bitserve.engine.sched.policy import Budget, Policy, Waiting

    policy = Policy(Budget(max_concurrent=8, prefill_tokens=100, max_waiting_s=0.05))
    w = [Waiting(prompt_len=40, arrived=1.0), Waiting(prompt_len=40, arrived=1.01)]
    d = policy.schedule(w, [], now=1.02)
    assert d.admit == [] and d.wait_until == pytest.approx(1.05)  # idle: let company arrive
    d = policy.schedule(w + [Waiting(prompt_len=40, arrived=1.04)], [], now=1.06)
    assert d.admit == [0, 1]  # a third 40-token prompt would pad the pass to 120 > 100


async def test_a_light_client_is_not_starved_by_a_heavy_one(make_engine):
    """One slot; a heavy client queues 8 requests, then a light client sends 1. Admission is
    round-robin across clients: the light request runs second, not ninth (FIFO)."""
    from bitserve.frontend.context import current_client

    engine = await make_engine(max_concurrent_sequences=1)
    slow_steps(engine, 0.002)
    finished: list[str] = []

    async def call(client: str, i: int) -> None:
        current_client.set(client)
        await engine.generate([PROMPTS[i % len(PROMPTS)]], SamplingParams(max_new_tokens=4), deadline=None)
        finished.append(f"{client}{i}")

    heavy = [asyncio.create_task(call("heavy", i)) for i in range(8)]
    await asyncio.sleep(0.01)  # the heavy requests are queued first
    light = asyncio.create_task(call("light", 0))
    await asyncio.gather(*heavy, light)
    assert finished.index("light0") <= 2, finished


@pytest.mark.numeric
def test_warp_equals_transformers_warpers_row_by_row():
    """Each row's filtered logits equal what transformers' own warpers give for that row's
    (temperature, top_k, top_p), in transformers' order."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from bitserve.engine.worker.sampler import warp

    torch.manual_seed(0)
    rows = [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.5, 20, 0.6), (2.0, 1, 0.9)]
    x = torch.randn(len(rows), 300) * 3
    got = warp(
        x,
        torch.tensor([[t] for t, _, _ in rows]),
        torch.tensor([k for _, k, _ in rows]),
        torch.tensor([[p] for _, _, p in rows]),
    )
    for i, (t, k, p) in enumerate(rows):
        want = TemperatureLogitsWarper(t)(None, x[i : i + 1].clone())
        if k:
            want = TopKLogitsWarper(k)(None, want)
        if p < 1.0:
            want = TopPLogitsWarper(p)(None, want)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want[0])), i
        kept = ~torch.isinf(want[0])
        # Both divide by the same temperature (one correctly rounded IEEE division per entry) and
        # only mask afterwards: the kept logits are equal bit for bit, on every kernel path.
        assert torch.equal(got[i][kept], want[0][kept]), i


def test_policy_with_a_kv_budget_admits_within_the_rectangle():
    from bitserve.engine.sched.policy import Budget, Policy, Waiting, kv_rectangle

    policy = Policy(Budget(max_concurrent=8, prefill_tokens=10_000, kv_tokens=400))
    w = [Waiting(prompt_len=10, arrived=0.0, max_new_tokens=30) for _ in range(8)]
    # One slot free of eight, no running row due soon: admitted at once.
    needs = [50] * 7
    assert kv_rectangle(needs + [41]) == 400
    assert policy.schedule(w[:1], [20] * 7, now=1.0, kv_needs=needs).admit == [0]
    # Running rows needing 60 columns: 6 x 60 = 360; a 7th row makes the rectangle 420 > 400.
    assert policy.schedule(w, [20] * 6, now=1.0, kv_needs=[60] * 6).admit == []
    # Nothing running: rows join while 41 columns each fit: 9 x 41 > 400, so 8 is the slot cap,
    # and 400 // 41 = 9 would allow more; slots bound it first.
    assert len(policy.schedule(w, [], now=1.0).admit) == 8
    short = Policy(Budget(max_concurrent=8, prefill_tokens=10_000, kv_tokens=100))
    assert short.schedule(w, [], now=1.0).admit == [0, 1]  # 2 x 41 <= 100 < 3 x 41
