"""Two processes under torchrun (gloo on CPU) match one process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import loss_rel_bound, max_logit


def child_pythonpath() -> str:
    """This process's import path, absolute: children run in another directory, and a relative
    PYTHONPATH there would import an installed copy of the code instead of the one under test."""
    return os.pathsep.join(os.path.abspath(p) for p in sys.path if p)


def _run(argv: list[str], cwd) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": child_pythonpath(),
    }
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _loss_rel(tiny_models, tmp_path, data_path, one) -> float:
    """tests/quantize/conftest.py:loss_rel_bound for the 1-process run `one` on `data_path`."""
    from transformers import AutoConfig

    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines()]
    zmax = max(max_logit(tiny_models["lm"], rows), max_logit(tmp_path / "one", rows))
    max_length = one["options"]["max_length"]
    targets = one["options"]["batch_size"] * one["options"]["grad_accum"] * max_length
    config = AutoConfig.from_pretrained(tiny_models["lm"])
    return loss_rel_bound(config, max_length, zmax, min(one["losses"]), targets)


@pytest.mark.extended  # two launched processes: ~30 s each
@pytest.mark.timeout(400)
def test_two_process_torchrun_matches_one_process(tiny_models, tmp_path, lm_data, record_property):
    common = [
        "finetune",
        "--model",
        str(tiny_models["lm"]),
        "--task",
        "generate",
        "--data",
        str(lm_data),
        "--max-steps",
        "4",
        "--lr",
        "1e-3",
        "--eval-split",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--precision",
        "fp32",
    ]
    _run(
        [
            sys.executable,
            "-m",
            "bitserve_quantize.cli",
            *common,
            "--batch-size",
            "4",
            "--output",
            str(tmp_path / "one"),
        ],
        tmp_path,
    )
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "bitserve_quantize.cli",
            *common,
            "--batch-size",
            "2",
            "--output",
            str(tmp_path / "two"),
        ],
        tmp_path,
    )
    one = json.loads((tmp_path / "one" / "finetune.json").read_text())
    two = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    # fp32 and equal token counts per rank: the averaged DDP gradient is the 1-process gradient,
    # summed in another order.
    rel = _loss_rel(tiny_models, tmp_path, lm_data, one)
    record_property("loss_rel", (max(abs(a - b) / b for a, b in zip(two["losses"], one["losses"])), rel))
    assert two["losses"] == pytest.approx(one["losses"], rel=rel)


@pytest.mark.extended
@pytest.mark.timeout(400)
def test_two_process_accelerate_launch_matches_one_process(tiny_models, tmp_path, lm_data, record_property):
    """`accelerate launch` sets the same RANK/WORLD_SIZE variables: same code, same result.
    (`--multi_gpu` selects accelerate's multi-process launcher; with no GPU our code picks gloo.)"""
    common = [
        "finetune",
        "--model",
        str(tiny_models["lm"]),
        "--task",
        "generate",
        "--data",
        str(lm_data),
        "--max-steps",
        "4",
        "--lr",
        "1e-3",
        "--eval-split",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--precision",
        "fp32",
    ]
    _run(
        [
            sys.executable,
            "-m",
            "bitserve_quantize.cli",
            *common,
            "--batch-size",
            "4",
            "--output",
            str(tmp_path / "one"),
        ],
        tmp_path,
    )
    _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "bitserve_quantize.cli",
            *common,
            "--batch-size",
            "2",
            "--output",
            str(tmp_path / "two"),
        ],
        tmp_path,
    )
    one = json.loads((tmp_path / "one" / "finetune.json").read_text())
    two = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    rel = _loss_rel(tiny_models, tmp_path, lm_data, one)
    record_property("loss_rel", (max(abs(a - b) / b for a, b in zip(two["losses"], one["losses"])), rel))
    assert two["losses"] == pytest.approx(one["losses"], rel=rel)
