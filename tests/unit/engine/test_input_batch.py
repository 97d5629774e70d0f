"""The persistent batch (slots written in place), driven step by step through the scheduler:
greedy output equals each prompt's solo `generate()` token for token - fp32, int8 and nf4 on
CPU - whatever order rows join and leave in; a join never copies running rows; a departure
moves at most one row per layer."""

from __future__ import annotations

import pytest
import torch

from bitserve.engine import workers
from bitserve.engine.sched.scheduler import Scheduler
from bitserve.engine.worker.input_batch import SlotBatch, supports
from bitserve.engine.worker.model_runner import CausalLM
from bitserve.settings import ModelSettings
from bitserve.types import GenerationRequest, SamplingParams

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over",
    "I love",
    "Stock markets fell as the bank raised interest rates today and",
    "la maison",
]

# (arrival step, max_new_tokens) per prompt. Each order makes rows leave from a different place
# (first, last, middle, several at once) while others join (alone, together, into freed slots).
ORDERS = {
    "staggered-first-leaves-first": [(0, 3), (1, 9), (2, 14), (4, 20), (6, 25)],
    "together-last-leaves-first": [(0, 25), (0, 20), (0, 14), (0, 9), (0, 3)],
    "middle-leaves-joins-refill": [(0, 20), (0, 2), (0, 22), (5, 4), (7, 18)],
    "two-leave-at-once-then-join": [(0, 6), (0, 6), (0, 30), (6, 5), (6, 12)],
}


def _load(path, quantize: str):
    return workers.load(ModelSettings(name="lm", task="generate", path=str(path), quantize=quantize))


@pytest.fixture(scope="module")
def models(tiny_models):
    cache: dict[str, object] = {}

    def get(quantize: str):
        if quantize not in cache:
            cache[quantize] = _load(tiny_models["lm"], quantize)
        return cache[quantize]

    return get


def solo(loaded, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=torch.tensor([prompt], device=loaded.device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=loaded.device),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    return out[0, len(prompt) :].tolist()


def scheduler(
    loaded, *, persistent: bool = True, max_concurrent: int = 8, kv_cache_tokens: int = 0
) -> Scheduler:
    lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device, max_context=loaded.max_context)
    return Scheduler(
        lm,
        max_concurrent=max_concurrent,
        prefill_token_budget=4096,
        max_waiting_ms=0,
        persistent=persistent,
        kv_cache_tokens=kv_cache_tokens,
    )


def run(sched: Scheduler, prompts: list[list[int]], order: list[tuple[int, int]]) -> dict[int, list[int]]:
    """Drive `sched` step by step, adding prompt i at step order[i][0]; tokens per prompt."""
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    done: set[int] = set()
    step = 0
    with torch.inference_mode():
        while len(done) < len(prompts):
            for i, (at, n) in enumerate(order):
                if at == step:
                    p = SamplingParams(max_new_tokens=n)
                    sched.add(GenerationRequest(i, "lm", prompts[i], p, n, (), None))
            r = sched.step()
            assert not r.errors, r.errors
            for rid, tok, _, finish, _top in r.tokens:
                got[rid].append(tok)
                if finish is not None:
                    done.add(rid)
            step += 1
            assert step < 500
    return got


# bitsandbytes on CPU is slow: each quantized mode runs one order by default (a middle row
# leaves, joins refill its slot), the other orders under -m slow.
CASES = (
    [("none", o) for o in ORDERS]
    + [("none-growing", o) for o in ORDERS]
    + [
        pytest.param(q, o, marks=() if o == "middle-leaves-joins-refill" else pytest.mark.slow)
        for q in ("int8", "nf4")
        for o in ORDERS
    ]
)


@pytest.mark.parametrize(("quantize", "order"), CASES)
def test_greedy_equals_solo_generate_whatever_joins_and_leaves(models, quantize, order):
    """ "-growing": buffers that grow as rows need them (a GPU's path; the CPU's default
    allocates the KV budget at once, lazily)."""
    loaded = models(quantize.removesuffix("-growing"))
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    sched = scheduler(loaded)
    assert sched.path == "persistent" and sched.slots is not None
    sched.slots.lazy = not quantize.endswith("-growing")
    got = run(sched, prompts, ORDERS[order])
    for i, (_, n) in enumerate(ORDERS[order]):
        assert got[i] == solo(loaded, prompts[i], n), PROMPTS[i]
    assert sched.stats.max_running > 1
    assert sched.batch is None and sched.slots is not None and not sched.slots.held
    # Growing buffers go with the last row; the CPU's lazy mappings stay for the next request.
    assert (sched.slots.cache is None) == quantize.endswith("-growing")


def test_copying_path_still_equals_solo_generate(models):
    loaded = models("none")
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    sched = scheduler(loaded, persistent=False)
    assert sched.path == "copying" and sched.slots is None
    order = ORDERS["middle-leaves-joins-refill"]
    got = run(sched, prompts, order)
    for i, (_, n) in enumerate(order):
        assert got[i] == solo(loaded, prompts[i], n)


def test_a_join_writes_free_slots_and_never_touches_running_rows(models):
    loaded = models("none")
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    sched = scheduler(loaded)
    slots = sched.slots
    assert isinstance(slots, SlotBatch)
    with torch.inference_mode():
        for i in range(2):
            sched.add(GenerationRequest(i, "lm", prompts[i], SamplingParams(max_new_tokens=30), 30, (), None))
        for _ in range(4):
            sched.step()
        assert len(slots) == 2
        layer = slots.cache.layers[0]
        ptr = layer.keys.data_ptr()
        used = max(slots.cols)
        before = layer.keys[:2, :, :used].clone()
        sched.add(GenerationRequest(2, "lm", prompts[2], SamplingParams(max_new_tokens=30), 30, (), None))
        sched.step()  # the join: a prefill of the new prompt alone
        assert len(slots) == 3
        assert layer.keys.data_ptr() == ptr  # no new buffer, no copy of the running rows
        assert torch.equal(layer.keys[:2, :, :used], before)


def test_a_departure_moves_at_most_one_row_per_layer(models, monkeypatch):
    loaded = models("none")
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    sched = scheduler(loaded)
    slots = sched.slots
    assert slots is not None
    moves: list[tuple[int, int]] = []
    with torch.inference_mode():
        for i, n in enumerate([30, 3, 30, 30]):  # row 1 (the middle) leaves first
            sched.add(GenerationRequest(i, "lm", prompts[i], SamplingParams(max_new_tokens=n), n, (), None))
        sched.step()
        layer_cls = type(slots.cache.layers[0])
        move = layer_cls.move

        def counted(self, src, dst, used):
            moves.append((src, dst))
            return move(self, src, dst, used)

        monkeypatch.setattr(layer_cls, "move", counted)
        while len(slots) == 4:
            sched.step()
    assert len(slots) == 3
    assert moves == [(3, 1)] * len(slots.cache.layers)  # the last row filled the freed slot
    assert [s.rid for s in slots.seqs] == [0, 3, 2]


def test_kv_reservation_stays_within_the_budget(models):
    loaded = models("none")
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    budget = 8 * 64
    sched = scheduler(loaded, kv_cache_tokens=budget)
    order = [(0, 20), (0, 20), (1, 20), (2, 20), (3, 20)]
    seen_reserved = []
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    with torch.inference_mode():
        for step in range(200):
            for i, (at, n) in enumerate(order):
                if at == step:
                    sched.add(
                        GenerationRequest(i, "lm", prompts[i], SamplingParams(max_new_tokens=n), n, (), None)
                    )
            for rid, tok, _, _, _ in sched.step().tokens:
                got[rid].append(tok)
            assert sched.slots is not None
            seen_reserved.append(sched.slots.reserved_tokens)
            if not sched.has_work():
                break
    assert 0 < max(seen_reserved) <= budget
    for i, (_, n) in enumerate(order):
        assert got[i] == solo(loaded, prompts[i], n)


def test_models_the_slots_cannot_serve_say_why(tiny_models):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(str(tiny_models["lm"]), attn_implementation="eager")
    assert "sdpa" in (supports(eager) or "")
    sdpa = AutoModelForCausalLM.from_pretrained(str(tiny_models["lm"]), attn_implementation="sdpa")
    assert supports(sdpa) is None
    sdpa.config.sliding_window = 16
    assert "sliding_window" in (supports(sdpa) or "")


def test_a_long_prompt_prefills_in_chunks_between_decode_steps(models):
    """A prompt over prefill_chunk_tokens is prefilled a chunk at a time, the running rows
    decoding between chunks; everyone still equals solo generate()."""
    loaded = models("none")
    tok = loaded.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    long = tok(" ".join(PROMPTS) + " " + PROMPTS[3])["input_ids"][:70]
    lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device, max_context=loaded.max_context)
    sched = Scheduler(
        lm, max_concurrent=8, prefill_token_budget=4096, max_waiting_ms=0, prefill_chunk_tokens=16
    )
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    running_tokens_while_chunking = 0
    with torch.inference_mode():
        for i in range(2):
            sched.add(GenerationRequest(i, "lm", prompts[i], SamplingParams(max_new_tokens=40), 40, (), None))
        for step in range(300):
            if step == 3:
                sched.add(GenerationRequest(2, "lm", long, SamplingParams(max_new_tokens=20), 20, (), None))
            r = sched.step()
            assert not r.errors
            for rid, t, _, _, _ in r.tokens:
                got[rid].append(t)
                if rid != 2 and sched.chunking:
                    running_tokens_while_chunking += 1
            if not sched.has_work():
                break
    assert got[2] == solo(loaded, long, 20)
    for i in range(2):
        assert got[i] == solo(loaded, prompts[i], 40)
    # Chunks of 16: a decode step of both running rows after each chunk but the last.
    chunks = -(-len(long) // 16)
    assert chunks >= 3
    assert running_tokens_while_chunking == 2 * (chunks - 1)


def test_a_long_prompt_joins_when_the_running_rows_fill_every_allocated_slot(models):
    """The slots in use equal the slots allocated (8, the first allocation): the chunked
    prompt's parked row needs the batch to grow, and the growth copies only the rows that hold
    data (it raised INTERNAL 'expanded size 9 must match 8' when the parked row was counted)."""
    from bitserve.engine.worker.input_batch import FIRST_SLOTS

    loaded = models("none")
    tok = loaded.tokenizer
    prompts = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(FIRST_SLOTS)]
    long = tok(" ".join(PROMPTS) + " " + PROMPTS[3])["input_ids"][:50]
    lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device, max_context=loaded.max_context)
    sched = Scheduler(
        lm,
        max_concurrent=FIRST_SLOTS + 1,
        prefill_token_budget=4096,
        max_waiting_ms=0,
        prefill_chunk_tokens=16,
    )
    assert sched.slots is not None
    sched.slots.lazy = False  # the growth path (a GPU's; the CPU allocates the budget at once)
    got: dict[int, list[int]] = {i: [] for i in range(FIRST_SLOTS + 1)}
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            sched.add(GenerationRequest(i, "lm", p, SamplingParams(max_new_tokens=30), 30, (), None))
        for step in range(300):
            if step == 4:
                assert isinstance(sched.slots, SlotBatch) and sched.slots.slot_cap == len(sched.running)
                sched.add(
                    GenerationRequest(
                        FIRST_SLOTS, "lm", long, SamplingParams(max_new_tokens=10), 10, (), None
                    )
                )
            r = sched.step()
            assert not r.errors, r.errors
            for rid, t, _, _, _ in r.tokens:
                got[rid].append(t)
            if not sched.has_work():
                break
    assert got[FIRST_SLOTS] == solo(loaded, long, 10)
    for i, p in enumerate(prompts):
        assert got[i] == solo(loaded, p, 30)


@pytest.mark.parametrize("lazy", [False, True], ids=["growing", "lazy-budget"])
def test_columns_grow_once_to_what_the_rows_reserved_not_by_doubling(models, monkeypatch, lazy):
    """Rows whose answers outgrow the first column allocation: the batch grows once, to their
    columns + max_new_tokens, so no decode step later copies every row's K/V again (doubling
    did at 128 and 256 columns: 85-100 ms steps of 63 rows). The tiny model's context is 128
    columns, the first allocation's size: it is made 16 here so that doubling would grow."""
    from bitserve.engine.worker import input_batch

    monkeypatch.setattr(input_batch, "FIRST_COLUMNS", 16)
    loaded = models("none")
    n_new = 60
    assert loaded.max_context >= 16 + n_new + 16
    lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device, max_context=loaded.max_context)
    lm.eos = frozenset()
    sched = Scheduler(lm, max_concurrent=4, prefill_token_budget=4096, max_waiting_ms=0)
    assert sched.slots is not None
    sched.slots.lazy = lazy
    tok = loaded.tokenizer
    ptrs = set()
    with torch.inference_mode():
        for i in range(3):
            ids = tok(PROMPTS[i])["input_ids"]
            sched.add(GenerationRequest(i, "lm", ids, SamplingParams(max_new_tokens=n_new), n_new, (), None))
        while sched.has_work():
            assert not sched.step().errors
            if isinstance(sched.slots, SlotBatch) and sched.slots.n:
                ptrs.add(sched.slots.cache.layers[0].keys.data_ptr())
    assert len(ptrs) == 1  # one buffer for the whole run


def test_engine_stats_report_kv_tokens_to_the_gauge(models, tiny_models):
    from bitserve.engine.core import Core
    from bitserve.engine.workers import workers_for
    from bitserve.frontend.registry import stats_hook
    from bitserve.ipc import protocol as P
    from bitserve.metrics import Metrics

    loaded = models("none")
    settings = ModelSettings(name="lm", task="generate", path=str(tiny_models["lm"]), kv_cache_tokens=1000)
    sent: list[list] = []
    core = Core(workers_for(loaded, [settings]), sent.append)
    req = GenerationRequest(
        1, "lm", loaded.tokenizer(PROMPTS[0])["input_ids"], SamplingParams(max_new_tokens=5), 5
    )
    core.handle([P.GENERATE, 1, P.request_to_wire(req)])
    with torch.inference_mode():
        core.step()
        core.step()
    metrics = Metrics()
    hook = stats_hook(metrics, [settings])
    stats = [m[2] for m in sent if m[0] == P.TOKENS]
    kv = stats[-1]["kv"]
    assert 0 < kv["used"] <= kv["reserved"] <= 1000
    hook(stats[-1])
    labels = {"model": "lm", "task": "generate"}
    reg = metrics.registry
    assert reg.get_sample_value("bitserve_kv_cache_tokens", {**labels, "state": "reserved"}) == kv["reserved"]
    assert reg.get_sample_value("bitserve_kv_cache_tokens", {**labels, "state": "used"}) == kv["used"]


def test_a_short_prompt_padded_to_a_long_one_may_run_past_the_context(models):
    """In one prefill pass a short prompt is padded to the long one; its columns then end past
    the context by that padding (positions do not): the batch grows for it."""
    loaded = models("none")
    tok = loaded.tokenizer
    long = tok(" ".join(PROMPTS))["input_ids"][:60]
    short = tok("I love")["input_ids"]
    n_short = loaded.max_context - len(short) - 2
    got = run(scheduler(loaded), [long, short], [(0, 10), (0, n_short)])
    assert got[0] == solo(loaded, long, 10)
    assert got[1] == solo(loaded, short, n_short)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_n_completions_of_a_prompt_share_one_prefill_and_each_equals_its_solo_run(models, sampling):
    """The n completions of a prompt (the front sends n requests with the same ids, seeds
    seed+j) are prefilled once - one row in the join's pass; the others copy its KV - and then
    decode apart: each equals a solo run of its own request, token for token."""
    loaded = models("none")
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    n, steps = 4, 10

    def params(j: int) -> SamplingParams:
        if sampling == "greedy":
            return SamplingParams(max_new_tokens=steps)
        return SamplingParams(max_new_tokens=steps, temperature=1.0, top_k=50, seed=7 + j)

    # (rid, prompt index, completion j): prompt 0 n times and prompt 1 once, admitted together.
    reqs = [(j, 0, j) for j in range(n)] + [(n, 1, 0)]

    def drive(sched: Scheduler, which: list[tuple[int, int, int]]) -> dict[int, list[int]]:
        got: dict[int, list[int]] = {rid: [] for rid, _, _ in which}
        with torch.inference_mode():
            for rid, i, j in which:
                sched.add(GenerationRequest(rid, "lm", prompts[i], params(j), steps, (), None))
            for _ in range(100):
                r = sched.step()
                assert not r.errors, r.errors
                for rid, tok, *_ in r.tokens:
                    got[rid].append(tok)
                if not sched.has_work():
                    break
        return got

    sched = scheduler(loaded)
    joined: list[int] = []  # rows in each prefill pass
    real_join = sched.lm.join

    def spy(slots, seqs, extra=0):
        joined.append(len(seqs))
        return real_join(slots, seqs, extra)

    sched.lm.join = spy  # type: ignore[method-assign]
    got = drive(sched, reqs)
    assert joined == [2]  # one pass, one row per distinct prompt: 5 rows decode
    assert sched.stats.prefill_rows == 2 and sched.stats.max_running == n + 1
    for rid, i, j in reqs:
        assert got[rid] == drive(scheduler(loaded), [(rid, i, j)])[rid], (rid, sampling)
        assert len(got[rid]) == steps
    if sampling == "seeded":
        assert len({tuple(got[j]) for j in range(n)}) > 1  # the completions differ
    else:
        assert got[0] == solo(loaded, prompts[0], steps)
    assert sched.slots is not None and not sched.slots.held  # all left


def test_n_completions_of_a_long_prompt_share_its_chunked_prefill(models):
    """A prompt prefilled in chunks, asked for n completions: its chunks run once, the other
    completions join as copies of its row when it is complete; each equals its solo run."""
    loaded = models("none")
    long = loaded.tokenizer(" ".join(PROMPTS) + " " + PROMPTS[3])["input_ids"][:70]
    lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device, max_context=loaded.max_context)

    def make() -> Scheduler:
        return Scheduler(
            lm, max_concurrent=8, prefill_token_budget=4096, max_waiting_ms=0, prefill_chunk_tokens=16
        )

    def drive(sched: Scheduler, seeds: list[int]) -> dict[int, list[int]]:
        got: dict[int, list[int]] = {j: [] for j in range(len(seeds))}
        with torch.inference_mode():
            for j, seed in enumerate(seeds):
                p = SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed)
                sched.add(GenerationRequest(j, "lm", long, p, 8, (), None))
            for _ in range(100):
                r = sched.step()
                assert not r.errors, r.errors
                for rid, tok, *_ in r.tokens:
                    got[rid].append(tok)
                if not sched.has_work():
                    break
        return got

    sched = make()
    chunks: list[int] = []
    real = lm.chunk

    def spy(slots, seq, end):
        chunks.append(end)
        return real(slots, seq, end)

    lm.chunk = spy  # type: ignore[method-assign]
    got = drive(sched, [3, 4, 5])
    assert len(chunks) == -(-len(long) // 16) and sched.stats.prefill_rows == 1
    del lm.chunk
    for j, seed in enumerate([3, 4, 5]):
        assert got[j] == drive(make(), [seed])[0], j
    assert len({tuple(v) for v in got.values()}) > 1


def test_a_cancelled_lead_of_a_chunked_prompt_hands_its_completions_to_the_next(models):
    loaded = models("none")
    long = loaded.tokenizer(" ".join(PROMPTS))["input_ids"][:40]
    lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device, max_context=loaded.max_context)
    sched = Scheduler(
        lm, max_concurrent=8, prefill_token_budget=4096, max_waiting_ms=0, prefill_chunk_tokens=16
    )
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    with torch.inference_mode():
        for j in range(3):
            sched.add(GenerationRequest(j, "lm", long, SamplingParams(max_new_tokens=6), 6, (), None))
        sched.step()  # admitted; the lead's first chunk
        assert sched.slots is not None and sched.slots.partial is not None and sched.slots.partial.rid == 0
        sched.abort({0})
        for _ in range(60):
            r = sched.step()
            assert not r.errors, r.errors
            for rid, tok, *_ in r.tokens:
                got[rid].append(tok)
            if not sched.has_work():
                break
    assert got[0] == [] and got[1] == got[2] == solo(loaded, long, 6)
    assert sched.stats.prefill_rows == 1  # the new lead's prefill, shared by the other


def test_width_groups_cut_long_rows_apart():
    from bitserve.engine.worker.attention import width_groups

    assert width_groups([10, 12, 11]) is None  # even widths: one run
    assert width_groups([10]) is None
    # One long row in the middle: three runs, each as wide as its widest row.
    assert width_groups([10, 12, 2064, 11, 9]) == [(0, 2, 12), (2, 3, 2064), (3, 5, 11)]
    assert width_groups([2064, 10, 12]) == [(0, 1, 2064), (1, 3, 12)]
    # Many long rows scattered among short ones: more runs than pay, so one.
    assert width_groups([2000, 10] * 8 + [10] * 8) is None


def test_decode_attends_per_run_of_like_widths_and_equals_solo(models, monkeypatch):
    """A long prompt beside short rows: decode steps attend in runs (the short rows over their
    own columns, not the long row's) and every row still equals its solo generate()."""
    from bitserve.engine.worker import attention

    monkeypatch.setattr(attention, "LONG_MIN_COLUMNS", 8)  # the tiny model's context is short
    seen: list[list[tuple[int, int, int]]] = []
    real = attention.width_groups

    def spy(widths):
        g = real(widths)
        if g is not None:
            seen.append(g)
        return g

    monkeypatch.setattr(attention, "width_groups", spy)
    loaded = models("none")
    tok = loaded.tokenizer
    prompts = [tok(p)["input_ids"] for p in (PROMPTS[0], PROMPTS[2], PROMPTS[4])]
    long = tok(" ".join(PROMPTS) + " " + PROMPTS[3])["input_ids"][:60]
    order = [(0, 24), (0, 24), (3, 12), (1, 24)]
    got = run(scheduler(loaded), [prompts[0], prompts[1], long, prompts[2]], order)
    for i, (p, (_, n)) in enumerate(zip([prompts[0], prompts[1], long, prompts[2]], order, strict=True)):
        assert got[i] == solo(loaded, p, n), i
    assert seen, "no decode step attended in runs"
    assert any(len(g) >= 2 and max(w for _, _, w in g) > 2 * min(w for _, _, w in g) for g in seen)


def test_chunk_size_follows_the_decode_step_time(models):
    """A chunk beside running rows is sized so that its pass costs about one of their decode
    steps: a chunk that took twice a step halves the next, a cheap one doubles it (at most),
    within MIN_CHUNK_TOKENS..prefill_chunk_tokens; alone, a prompt takes whole chunks."""
    from bitserve.engine.sched import scheduler as S

    loaded = models("none")
    lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device, max_context=loaded.max_context)
    sched = Scheduler(
        lm, max_concurrent=8, prefill_token_budget=4096, max_waiting_ms=0, prefill_chunk_tokens=512
    )
    assert sched._chunk_size() == 512  # nothing running
    tok = loaded.tokenizer
    sched.add(
        GenerationRequest(
            0, "lm", tok(PROMPTS[0])["input_ids"], SamplingParams(max_new_tokens=30), 30, (), None
        )
    )
    with torch.inference_mode():
        sched.step()
    assert len(sched.running) == 1
    assert sched._chunk_size() == S.FIRST_CHUNK_TOKENS  # no pass timed yet
    sched._decode_s = 0.010
    sched._last_chunk = (128, 0.020)  # twice a decode step: half as many tokens
    assert sched._chunk_size() == 64
    sched._last_chunk = (128, 0.010)  # on target: the same
    assert sched._chunk_size() == 128
    sched._last_chunk = (128, 0.001)  # far under: doubled, not more
    assert sched._chunk_size() == 256
    sched._last_chunk = (400, 0.001)  # capped by prefill_chunk_tokens
    assert sched._chunk_size() == 512
    sched._last_chunk = (20, 1.0)  # a pass dearer than any target: the floor
    assert sched._chunk_size() == S.MIN_CHUNK_TOKENS


def _wide_lazy_scheduler(loaded) -> Scheduler:
    """64 slots over an 8,192-token context: the tiny model's 4 layers reserve 268 MB of lazily
    mapped K/V address space."""
    lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device, max_context=8192)
    sched = Scheduler(lm, max_concurrent=64, prefill_token_budget=4096, max_waiting_ms=0)
    assert sched.slots is not None and sched.slots.lazy
    return sched


def _rss() -> int:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_the_cpu_buffers_take_the_whole_budget_at_once_but_only_written_pages_are_resident(models):
    """On the CPU the K/V buffers are allocated once at the KV budget (every slot, every column)
    from lazily zeroed memory: short rows in a 64 x 8,193-column batch (the tiny model's 4
    layers: 268 MB of address space) leave the process's resident memory within a few MB of where it was, and
    the buffers never move while rows come and go."""
    loaded = models("none")
    sched = _wide_lazy_scheduler(loaded)
    tok = loaded.tokenizer

    before = _rss()
    ptrs = set()
    with torch.inference_mode():
        for i in range(3):
            ids = tok(PROMPTS[i])["input_ids"]
            sched.add(
                GenerationRequest(i, "lm", ids, SamplingParams(max_new_tokens=4 + 4 * i), 4 + 4 * i, (), None)
            )
            for _ in range(3):
                assert not sched.step().errors
                if sched.slots.cache is not None and sched.slots.cache.layers[0].keys is not None:
                    ptrs.add(sched.slots.cache.layers[0].keys.data_ptr())
        layer = sched.slots.cache.layers[0]
        virtual = sum(
            c.keys.numel() * c.keys.element_size() + c.values.numel() * c.values.element_size()
            for c in sched.slots.cache.layers
        )
        assert layer.keys.shape[0] == 64 and layer.keys.shape[2] == 8193
        grew = _rss() - before
        while sched.has_work():
            assert not sched.step().errors
    assert virtual > 256 * 2**20
    assert grew < 32 * 2**20, (grew, virtual)
    assert len(ptrs) == 1


def test_the_cpu_buffers_outlive_an_empty_batch_and_idle_releases_their_pages(models):
    """A request arriving at an empty batch writes into the buffers the last one used (mapping
    and faulting 64 x 8,193 columns per layer again cost a lone client ~20 ms a request), and
    `release_pages` hands their resident pages back: RSS falls by about what rows wrote, the
    buffers read as zeros again, and the next request still equals solo generate()."""
    loaded = models("none")
    sched = _wide_lazy_scheduler(loaded)
    tok = loaded.tokenizer

    def serve(rid: int, ids: list[int], n: int) -> list[int]:
        sched.add(GenerationRequest(rid, "lm", ids, SamplingParams(max_new_tokens=n), n, (), None))
        got = []
        while sched.has_work():
            for r, t, _, _, _ in sched.step().tokens:
                assert r == rid
                got.append(t)
        return got

    ids = tok(PROMPTS[3])["input_ids"]
    with torch.inference_mode():
        assert serve(0, ids, 8) == solo(loaded, ids, 8)
        cache = sched.slots.cache
        assert cache is not None, "the buffers went with the last row"
        keys = cache.layers[0].keys
        assert sched.slots.release_pages() == 0 or not sched.slots.held
        # 48 rows decoding together write 260 columns each: their pages become resident.
        for i in range(48):
            p = [10 + i] * 60
            sched.add(GenerationRequest(100 + i, "lm", p, SamplingParams(max_new_tokens=200), 200, (), None))
        while sched.has_work():
            assert not sched.step().errors
        assert sched.slots.cache is cache and cache.layers[0].keys is keys
        per_column = sum(c.keys[0, :, 0].numel() * c.keys.element_size() * 2 for c in cache.layers)
        written = 48 * 260 * per_column
        full = _rss()
        released = sched.slots.release_pages()
        after = _rss()
        assert released > 256 * 2**20  # every buffer's mapping
        assert full - after > written // 2, (full - after, written)
        assert not bool(keys[:48].any()), "released pages read as zeros"
        # The next request writes the same buffers again and is still right.
        assert serve(1, ids, 8) == solo(loaded, ids, 8)
        assert sched.slots.cache is cache and cache.layers[0].keys is keys
