"""Gradient accumulation and processes split one batch, never change it: on rows of different
lengths (token-weighted means), every split trains exactly like one big batch."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bitserve_quantize.train import finetune

from .conftest import options, write_jsonl
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


def test_accumulation_equals_one_big_batch(tiny_models, tmp_path, varlen_data):
    common = dict(max_steps=4, lr=5e-3, precision="fp32")
    runs = {}
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{batch}a{accum}"
        runs[(batch, accum)] = finetune(
            options(
                tiny_models["lm"], "generate", varlen_data, out, batch_size=batch, grad_accum=accum, **common
            )
        )
    one = runs[(4, 1)]
    for key, res in runs.items():
        assert res.losses == pytest.approx(one.losses, rel=1e-5), key
    # The weights after four steps agree too, not only the logged losses.
    from safetensors.torch import load_file

    ref = load_file(str(tmp_path / "b4a1" / "model.safetensors"))
    for name in ("b2a2", "b1a4"):
        got = load_file(str(tmp_path / name / "model.safetensors"))
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert worst < 1e-5, (name, worst)
    # The data's rows differ in length: a plain mean of micro-batch means would not match.
    lengths = {len(r["completion"]) for r in ROWS}
    assert len(lengths) > 4 and torch.isfinite(torch.tensor(one.losses)).all()


@pytest.mark.timeout(400)
def test_two_processes_by_accumulation_match_one_process(tiny_models, tmp_path, varlen_data):
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
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
