"""Gradient accumulation and processes split one batch, never change it: on rows of different
lengths (token-weighted means), every split trains exactly like one big batch."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoConfig

from bitserve_quantize.train import finetune

from ..numeric import gamma, matmul_path
from .conftest import loss_rel_bound, max_logit, options, write_jsonl
from .test_torchrun import _run

ROWS = [
    {"prompt": "Hello world, this is", "completion": " a tiny model."},
    {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog, once upon a time."},
    {"prompt": "I love", "completion": " this movie, it was great and wonderful."},
    {"prompt": "The team won the football match", "completion": " today."},
    {"prompt": "Stock markets fell", "completion": " as the bank raised interest rates."},
    {"prompt": "The new phone", "completion": " has a faster chip."},
    {"prompt": "Parliament", "completion": " voted on the new election law today."},
    {"prompt": "Once upon a time there was", "completion": " a model."},
]


@pytest.fixture
def varlen_data(tmp_path):
    return write_jsonl(tmp_path / "varlen.jsonl", ROWS)


@pytest.mark.numeric
def test_accumulation_equals_one_big_batch(tiny_models, tmp_path, varlen_data, record_property, monkeypatch):
    # Plain SGD instead of AdamW: the weights then read out the summed gradients linearly.
    # Adam divides each element by its own gradient's magnitude, so an element whose gradient
    # cancels to near 0 moves by +-lr on rounding alone, in any split; no float bound covers
    # that, and the accumulation under test happens before the optimizer either way.
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    steps, lr, max_grad_norm = 4, 0.1, 1.0
    common = dict(max_steps=steps, lr=lr, precision="fp32", max_grad_norm=max_grad_norm)
    runs = {}
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{batch}a{accum}"
        runs[(batch, accum)] = finetune(
            options(
                tiny_models["lm"], "generate", varlen_data, out, batch_size=batch, grad_accum=accum, **common
            )
        )
    config = AutoConfig.from_pretrained(tiny_models["lm"])
    max_length = options(tiny_models["lm"], "generate", varlen_data, tmp_path).max_length
    # Every split sums the same per-token terms in another order. Forward and backward are 2 x 13
    # matmuls deep (2 layers x 6, lm_head), plus the sum over the step's targets (<= 4 x 32
    # tokens): with K the longest reduction, each run's gradient is within (2*13 + 1)*gamma_K of
    # the exact one, relative to the gradient's scale; two runs differ by twice that.
    depth, k = matmul_path(config, max_length)
    rel = 2 * (2 * depth + 1) * gamma(max(k, 4 * max_length))
    # The losses: tests/quantize/conftest.py:loss_rel_bound.
    zmax = max(max_logit(tiny_models["lm"], ROWS), max_logit(tmp_path / "b4a1", ROWS))
    one = runs[(4, 1)]
    loss_rel = loss_rel_bound(config, max_length, zmax, min(one.losses), 4 * max_length)
    for key, res in runs.items():
        worst = max(abs(a - b) / b for a, b in zip(res.losses, one.losses))
        record_property(f"loss_rel_{key}", (worst, loss_rel))
        assert worst < loss_rel, (key, worst, loss_rel)
    # The weights after four steps agree too, not only the logged losses. Clipped to a total
    # norm of max_grad_norm, no gradient element exceeds it: each step moves an element by at
    # most lr * max_grad_norm, and the steps' gradient errors add up.
    from safetensors.torch import load_file

    bound = rel * steps * lr * max_grad_norm
    ref = load_file(str(tmp_path / "b4a1" / "model.safetensors"))
    base = load_file(str(tiny_models["lm"] / "model.safetensors"))
    for name in ("b2a2", "b1a4"):
        got = load_file(str(tmp_path / name / "model.safetensors"))
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        record_property(f"worst_{name}", (worst, bound))
        assert worst < bound, (name, worst, bound)
    # Training moved the weights by far more than the bound: the comparison can fail.
    moved = max((ref[k] - base[k]).abs().max().item() for k in ref if k in base)
    assert moved > 100 * bound, (moved, bound)
    # The data's rows differ in length: a plain mean of micro-batch means would not match.
    lengths = {len(r["completion"]) for r in ROWS}
    assert len(lengths) > 4 and torch.isfinite(torch.tensor(one.losses)).all()


@pytest.mark.timeout(400)
def test_two_processes_by_accumulation_match_one_process(tiny_models, tmp_path, varlen_data, record_property):
    common = [
        "finetune",
        "--model",
        str(tiny_models["lm"]),
        "--task",
        "generate",
        "--data",
        str(varlen_data),
        "--max-steps",
        "3",
        "--lr",
        "5e-3",
        "--eval-split",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--precision",
        "fp32",
    ]
    cli = [sys.executable, "-m", "bitserve_quantize.cli", *common]
    _run([*cli, "--batch-size", "4", "--output", str(tmp_path / "one")], tmp_path)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    _run(
        [
            *launch,
            "-m",
            "bitserve_quantize.cli",
            *common,
            "--batch-size",
            "1",
            "--grad-accum",
            "2",
            "--output",
            str(tmp_path / "two"),
        ],
        tmp_path,
    )
    one = json.loads((tmp_path / "one" / "finetune.json").read_text())
    two = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert two["world_size"] == 2 and two["options"]["grad_accum"] == 2
    config = AutoConfig.from_pretrained(tiny_models["lm"])
    zmax = max(max_logit(tiny_models["lm"], ROWS), max_logit(tmp_path / "one", ROWS))
    targets = 4 * one["options"]["max_length"]
    rel = loss_rel_bound(config, one["options"]["max_length"], zmax, min(one["losses"]), targets)
    record_property("loss_rel", (max(abs(a - b) / b for a, b in zip(two["losses"], one["losses"])), rel))
    assert two["losses"] == pytest.approx(one["losses"], rel=rel)
