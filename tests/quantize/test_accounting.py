"""What a fine-tune records about itself: parameter counts, memory, precision, LR steps; and how
the report times a model."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from bitserve_quantize import tasks, train
from bitserve_quantize.train import build_model, finetune

from .conftest import options, topic_rows, write_jsonl


def test_qlora_total_parameters_count_4bit_weights_unpacked(tiny_models, tmp_path):
    d = write_jsonl(tmp_path / "d.jsonl", topic_rows(8))
    kw = dict(max_steps=1, lr=5e-3)
    lora = finetune(options(tiny_models["topics"], "classify", d, tmp_path / "l", method="lora", **kw))
    qlora = finetune(options(tiny_models["topics"], "classify", d, tmp_path / "q", method="qlora", **kw))
    # Same base, same adapters: the same logical parameter count, whatever the storage.
    assert qlora.total_parameters == lora.total_parameters
    assert qlora.trainable_parameters == lora.trainable_parameters
    saved = json.loads((tmp_path / "q" / "finetune.json").read_text())
    assert saved["total_parameters"] == lora.total_parameters


def test_training_peak_is_read_before_eval_and_eval_memory_apart(tiny_models, tmp_path, monkeypatch):
    events: list[str] = []
    readings = iter(range(1000, 10**6, 1000))

    def fake_peak(device):
        events.append("peak")
        return next(readings)

    real_evaluate = tasks.ClassifyTask.evaluate

    def evaluate(self, *a, **k):
        events.append("eval")
        return real_evaluate(self, *a, **k)

    monkeypatch.setattr(train, "peak_memory", fake_peak)
    monkeypatch.setattr(tasks.ClassifyTask, "evaluate", evaluate)
    d = write_jsonl(tmp_path / "d.jsonl", topic_rows(12))
    res = finetune(
        options(tiny_models["topics"], "classify", d, tmp_path / "o", max_steps=1, eval_split=0.25)
    )
    first_eval = events.index("eval")
    before = events[:first_eval].count("peak")
    assert before >= 1, events
    # The training peak is the last reading taken before eval; eval's is a later one.
    assert res.peak_memory_bytes == 1000 * before
    assert res.eval_peak_memory_bytes > res.peak_memory_bytes
    manifest = json.loads((tmp_path / "o" / "finetune.json").read_text())
    assert manifest["peak_memory_bytes"] == res.peak_memory_bytes
    assert manifest["eval_peak_memory_bytes"] == res.eval_peak_memory_bytes


def test_qlora_fp32_computes_in_fp32(tiny_models, tmp_path):
    import bitsandbytes as bnb

    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        opts = options(tiny_models["topics"], "classify", tmp_path / "x", tmp_path / "o", method="qlora")
        opts.precision = precision
        model = build_model(opts, tasks.get("classify"), ["business", "sports", "tech"], torch.device("cpu"))
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and {m.compute_dtype for m in layers} == {dtype}, precision


def test_scheduler_does_not_step_when_the_scaler_skips(tiny_models, tmp_path, monkeypatch):
    import transformers

    made = {}
    real_get_scheduler = transformers.get_scheduler

    def capture(*a, **k):
        made["scheduler"] = real_get_scheduler(*a, **k)
        return made["scheduler"]

    real_init = torch.amp.GradScaler.__init__

    def huge_scale(self, *a, **k):  # the first steps overflow fp16 gradients and are skipped
        real_init(self, *a, **{**k, "init_scale": 2.0**30})

    monkeypatch.setattr(transformers, "get_scheduler", capture)
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", huge_scale)
    d = write_jsonl(tmp_path / "d.jsonl", topic_rows(8))
    res = finetune(
        options(
            tiny_models["topics"],
            "classify",
            d,
            tmp_path / "o",
            precision="fp16",
            max_steps=20,
            schedule="linear",
        )
    )
    assert 0 < res.skipped_steps < 20
    # One scheduler step per optimizer step taken: a skipped step must not advance the LR.
    assert made["scheduler"].last_epoch == 20 - res.skipped_steps
    assert json.loads((tmp_path / "o" / "finetune.json").read_text())["skipped_steps"] == res.skipped_steps


def _timed_events(monkeypatch, task):
    """Record tokenizer calls, forward passes and timer reads, in order."""
    events: list[str] = []
    real_clock = tasks.time.perf_counter

    def clock():
        events.append("clock")
        return real_clock()

    monkeypatch.setattr(tasks.time, "perf_counter", clock)
    return events


def test_report_warms_up_and_times_no_tokenization(tiny_models, tmp_path, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM

    from bitserve.models.loading import load_tokenizer
    from bitserve_quantize import data

    task = tasks.get("translate")
    events = _timed_events(monkeypatch, task)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_models["t5"])).eval()
    tok = load_tokenizer(str(tiny_models["t5"]))

    class Tok:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *a, **k):
            events.append("tokenize")
            return tok(*a, **k)

    real_generate = model.generate

    def generate(*a, **k):
        events.append("forward")
        return real_generate(*a, **k)

    model.generate = generate
    rows = [{"source": f"translate English to French: the cat {i}.", "target": "le chat."} for i in range(6)]
    ds = data.read(write_jsonl(tmp_path / "mt.jsonl", rows))
    task.evaluate(model, Tok(), ds, batch_size=2, max_length=8, autocast=contextlib.nullcontext)
    start, stop = events.index("clock"), len(events) - 1 - events[::-1].index("clock")
    timed = events[start:stop]
    assert "tokenize" not in timed, events
    assert timed.count("forward") == 3, events  # every batch timed once
    assert "forward" in events[:start], "no untimed warm-up pass before the timer"


@pytest.mark.parametrize("name", ["classify", "generate"])
def test_classify_and_generate_eval_warm_up_before_timing(tiny_models, tmp_path, monkeypatch, name):
    from bitserve.models.loading import load_checkpoint, load_tokenizer
    from bitserve_quantize import data

    task = tasks.get(name)
    events = _timed_events(monkeypatch, task)
    path = tiny_models["topics" if name == "classify" else "lm"]
    model = load_checkpoint(str(path), task.auto_class, device="cpu").model
    model.register_forward_pre_hook(lambda *a: events.append("forward"))
    tok = task.prepare_tokenizer(load_tokenizer(str(path)))
    tok.padding_side = "right"
    rows = topic_rows(6) if name == "classify" else [{"text": r["text"]} for r in topic_rows(6)]
    ds = data.read(write_jsonl(tmp_path / "d.jsonl", rows))
    task.evaluate(model, tok, ds, batch_size=2, max_length=16, autocast=contextlib.nullcontext)
    start = events.index("clock")
    assert "forward" in events[:start] and events[start:].count("forward") == 3, events


_CPU = torch.device("cpu")
_linux_peak = pytest.mark.skipif(
    train._proc_status_bytes("VmHWM") is None or not train.reset_peak_memory(_CPU),
    reason="needs Linux's VmHWM and /proc/self/clear_refs",
)


@_linux_peak
def test_cpu_peak_window_counts_what_is_allocated_after_the_reset_only():
    mib = 2**20
    size = 256 * mib
    before = torch.ones(size // 4)  # 256 MiB, every page written: resident
    del before  # freed (an mmap'd block goes back to the kernel at once)
    lifetime = train.peak_memory(_CPU)
    assert train.reset_peak_memory(_CPU)
    start = train.peak_memory(_CPU)
    rss = train.resident_memory()
    # After the reset the high-water mark is the current RSS: the freed 256 MiB no longer count.
    assert start <= lifetime - size + 32 * mib, (start, lifetime)
    assert abs(start - rss) <= 32 * mib, (start, rss)
    held = torch.ones(size // 4)
    peak = train.peak_memory(_CPU)
    # A block written after the reset raises the peak by about its size (slack: other threads'
    # small allocations and page-table rounding).
    assert size - 16 * mib <= peak - start <= size + 32 * mib, (peak - start) / mib
    del held


def test_cpu_peak_falls_back_to_the_lifetime_peak_without_proc(monkeypatch):
    import resource

    monkeypatch.setattr(train, "_proc_status_bytes", lambda field: None)
    assert train.peak_memory(_CPU) == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert train.peak_memory_kind(_CPU, True).startswith("process-lifetime peak RSS")


@_linux_peak
def test_finetune_records_the_training_window_peak_and_how_it_was_measured(tiny_models, tmp_path):
    d = write_jsonl(tmp_path / "d.jsonl", topic_rows(8))
    res = finetune(options(tiny_models["topics"], "classify", d, tmp_path / "o", max_steps=1))
    assert res.peak_memory_kind.startswith("peak RSS during training (VmHWM reset")
    assert res.train_start_memory_bytes is not None
    # The window starts at the training RSS: its peak is at least that (nothing is counted twice).
    assert res.peak_memory_bytes >= res.train_start_memory_bytes
    saved = json.loads((tmp_path / "o" / "finetune.json").read_text())
    assert saved["peak_memory_kind"] == res.peak_memory_kind
    assert saved["train_start_memory_bytes"] == res.train_start_memory_bytes
