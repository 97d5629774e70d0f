"""The compiled decode step (`compile_decode`): greedy output with compile on equals compile off
token for token whatever order rows join and leave in; the forward is captured whole (no graph
breaks); after warm-up no batch size, step or grown buffer compiles again; the setting's
decisions (auto, bitsandbytes eager)."""

from __future__ import annotations

import pytest
import torch

from bitserve.engine import workers
from bitserve.engine.worker import compiled
from bitserve.settings import ModelSettings
from tests.unit.engine.test_input_batch import ORDERS, PROMPTS, run, scheduler


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return workers.load(ModelSettings(name="lm", task="generate", path=str(tiny_models["lm"])))


# Three rows, then seven more: ten outgrow the first 8 slots, and the buffers regrow (16 slots)
# while rows run under the compiled graph.
TEN = [(0 if i < 3 else 2, 6 + i) for i in range(10)]


def _cases(loaded, names):
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    cases = [(name, prompts, ORDERS[name]) for name in names]
    return [*cases, ("ten-at-once-regrow", prompts * 2, TEN)]


def _check_compiled(loaded, sched, names):
    """Each case through `sched` (compiled, warmed up) equals an eager scheduler's tokens, and
    nothing compiles again while it runs."""
    for name, prompts, order in _cases(loaded, names):
        want = run(scheduler(loaded, max_concurrent=16), prompts, order)
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert run(sched, prompts, order) == want, name
    assert sched.slots is not None and not sched.slots.held


def test_compiled_decode_traces_equals_eager_and_never_recompiles(loaded):
    """dynamo alone (backend "eager": the same graph capture, guards and dynamic sizes as
    inductor, without compiling C++): the default run's check. Inductor is the slow test."""
    torch._dynamo.reset()
    sched = scheduler(loaded, max_concurrent=16)
    lm = sched.lm
    lm.compiled = compiled.CompiledDecode(lm.model, lm.device, lm._cache_kw, backend="eager")
    assert sched.slots is not None
    lm.warm_up(sched.slots)
    assert len(sched.slots) == 0 and not sched.slots.held  # warm-up rows gone
    # The compiled part is whole: no graph break (transformers' cache layer in "graph" mode
    # reads only tensors), and two graphs - one row, and any other count.
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2
    _check_compiled(loaded, sched, ["middle-leaves-joins-refill", "two-leave-at-once-then-join"])


@pytest.mark.slow
def test_inductor_compiled_decode_equals_eager_under_joins_and_departures(loaded, tmp_path):
    """compile_decode: on through the engine's own build (inductor C++, compiled at warm-up,
    minutes on a loaded 2-core machine): same tokens, no compile after warm-up."""
    import shutil

    path = tmp_path / "lm"  # its own copy of the weights: the eager reference stays untouched
    shutil.copytree(loaded.path, path)
    s = ModelSettings(
        name="lm", task="generate", path=str(path), compile_decode="on", max_concurrent_sequences=16
    )
    w = workers.workers_for(workers.load(s), [s])
    assert w.lm is not None and w.lm.compiled is not None and w.scheduler is not None
    _check_compiled(loaded, w.scheduler, list(ORDERS))


def test_compile_decode_setting_decides_per_device_and_quantization(loaded):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiled.eligible(loaded.model, cpu, "none") is None
    assert "int8" in (compiled.eligible(loaded.model, cpu, "int8") or "")
    assert "nf4" in (compiled.eligible(loaded.model, cpu, "nf4") or "")
    assert compiled.resolve("off", cpu, None)[0] is False
    assert compiled.resolve("on", cpu, None)[0] is True
    assert compiled.resolve("on", cpu, "int8 (bitsandbytes) layers run eager") == (
        False,
        "int8 (bitsandbytes) layers run eager",
    )
    for dev in (cpu, cuda):
        assert compiled.resolve("auto", dev, None)[0] is (dev.type in compiled.AUTO_ON)
    with pytest.raises(ValueError):
        ModelSettings(name="lm", task="generate", path="x", compile_decode="yes")


def test_off_and_ineligible_models_stay_eager(loaded):
    sched = scheduler(loaded)
    assert "off" in sched.lm.use_compiled("off", "none") and sched.lm.compiled is None
    assert "int8" in sched.lm.use_compiled("on", "int8") and sched.lm.compiled is None
    copying = scheduler(loaded, persistent=False)
    copying.lm.no_slots_reason = "persistent_batch is off"
    copying.lm.use_compiled("on", "none")
    assert copying.lm.compiled is None


def test_cuda_buckets_hold_the_rows_within_the_slots():
    assert [compiled.bucket(n, 64) for n in (1, 2, 3, 5, 9, 33, 64)] == [1, 2, 4, 8, 16, 48, 64]
    assert compiled.bucket(40, 40) == 40  # capped by the slots
    assert compiled.bucket(1000, 1024) == 1000  # past the last bucket: the rows themselves


def test_a_compile_that_fails_at_warm_up_leaves_the_engine_eager(loaded, monkeypatch):
    """No C++ compiler (the runtime image has none), or any other compile error: the engine
    logs it and serves eager instead of failing to start."""

    def broken(self, batch):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled.CompiledDecode, "decode", broken)
    s = ModelSettings(name="lm", task="generate", path=str(loaded.path), compile_decode="on")
    w = workers.workers_for(loaded, [s])
    assert w.lm is not None and w.lm.compiled is None and w.scheduler is not None
    assert w.info()["compiled_decode"] is False
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    order = ORDERS["middle-leaves-joins-refill"]
    assert run(w.scheduler, prompts, order) == run(scheduler(loaded), prompts, order)


@pytest.mark.slow
def test_the_cuda_path_padding_rows_to_buckets_equals_eager(loaded):
    """The CUDA graphs path's row logic, run on CPU through dynamo alone: rows padded up to a
    bucket, buffers held at full size, padding rows writing the scratch column - including a
    long prompt prefilled in chunks in the slot the padding rows pass over (about a minute:
    a graph per bucket)."""
    from bitserve.engine.sched.scheduler import Scheduler

    torch._dynamo.reset()
    sched = scheduler(loaded, max_concurrent=16)
    lm = sched.lm
    cd = compiled.CompiledDecode(lm.model, lm.device, lm._cache_kw, backend="eager")
    cd.cuda = True  # pad to buckets, hold the buffers, mark static addresses
    lm.compiled = cd
    assert sched.slots is not None
    lm.warm_up(sched.slots)
    assert sched.slots.hold and sched.slots.slot_cap == 16
    for name, prompts, order in _cases(loaded, list(ORDERS)):
        assert run(sched, prompts, order) == run(scheduler(loaded, max_concurrent=16), prompts, order), name
    # A chunked prompt parked in slot n while 3 rows decode padded to 4.
    tok = loaded.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]] + [tok(" ".join(PROMPTS))["input_ids"][:60]]
    order = [(0, 30), (0, 30), (0, 30), (2, 10)]

    def chunked() -> Scheduler:
        s = Scheduler(
            lm, max_concurrent=16, prefill_token_budget=4096, max_waiting_ms=0, prefill_chunk_tokens=16
        )
        s.slots = sched.slots  # the held, warmed-up batch
        return s

    want = run(scheduler(loaded, max_concurrent=16), prompts, order)
    assert run(chunked(), prompts, order) == want
