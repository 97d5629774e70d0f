"""`quantize report/export` options beyond the mode: compute dtype, double quant, modules kept
unquantized; a checkpoint exported with them is served with them."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

from bitserve.models.loading import load_checkpoint
from bitserve_quantize import tasks
from bitserve_quantize.cli import main
from bitserve_quantize.errors import OptionError
from bitserve_quantize.export import ExportOptions, export
from bitserve_quantize.report import QuantOptions, ReportOptions, load, report

SKIP = "model.layers.0.mlp.down_proj"


def _layers(model) -> dict[str, object]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_load_applies_each_option(tiny_models):
    task = tasks.get("generate")
    path = str(tiny_models["lm"])
    default = load(path, task, "nf4", "cpu", QuantOptions()).model
    custom = load(
        path, task, "nf4", "cpu", QuantOptions(compute_dtype="bf16", double_quant=False, skip_modules=(SKIP,))
    ).model
    d, c = _layers(default), _layers(custom)
    assert SKIP in d and SKIP not in c and set(d) - set(c) == {SKIP}
    assert type(custom.get_submodule(SKIP)) is torch.nn.Linear
    assert {m.compute_dtype for m in d.values()} == {torch.float32}
    assert {m.compute_dtype for m in c.values()} == {torch.bfloat16}
    assert all(m.weight.quant_state.nested for m in d.values())
    assert not any(m.weight.quant_state.nested for m in c.values())


def test_report_rows_record_their_options(tiny_models, tmp_path, lm_data):
    doc = report(
        ReportOptions(
            model=str(tiny_models["lm"]),
            data=str(lm_data),
            modes=("nf4",),
            output=str(tmp_path / "r"),
            device="cpu",
            chart=False,
            skip_modules=(SKIP,),
        )
    )
    plain = report(
        ReportOptions(
            model=str(tiny_models["lm"]),
            data=str(lm_data),
            modes=("nf4",),
            output=str(tmp_path / "p"),
            device="cpu",
            chart=False,
        )
    )
    row, base = doc["results"][0], plain["results"][0]
    assert row["skip_modules"] == [SKIP] and "skip_modules" not in base
    # One 64x128 fp32 weight instead of 4-bit: 4 bytes vs ~0.5 byte per value (+ scales).
    assert row["memory_bytes"] - base["memory_bytes"] > 64 * 128 * 3


def test_export_saves_the_options_the_server_then_uses(tiny_models, tmp_path, lm_data):
    out = tmp_path / "exp"
    manifest = export(
        ExportOptions(
            model=str(tiny_models["lm"]),
            output=str(out),
            quantize="nf4",
            data=str(lm_data),
            device="cpu",
            skip_modules=(SKIP,),
            double_quant=False,
        )
    )
    assert manifest["quantize_options"] == {
        "compute_dtype": "auto",
        "double_quant": False,
        "skip_modules": [SKIP],
    }
    served = load_checkpoint(str(out), AutoModelForCausalLM, device="cpu").model
    assert SKIP not in _layers(served) and _layers(served)
    assert not any(m.weight.quant_state.nested for m in _layers(served).values())
    # A saved quantized checkpoint cannot be re-reported with other options: said, not ignored.
    with pytest.raises(OptionError, match="its quantization options are fixed"):
        report(ReportOptions(model=str(out), data=str(lm_data), device="cpu", skip_modules=(SKIP,)))


def test_cli_flags(tiny_models, tmp_path, lm_data, capsys):
    rc = main(
        [
            "report",
            "--model",
            str(tiny_models["lm"]),
            "--data",
            str(lm_data),
            "--quantize",
            "nf4",
            "--compute-dtype",
            "bf16",
            "--no-double-quant",
            "--skip-modules",
            f"{SKIP}, model.layers.1.mlp.down_proj",
            "--output",
            str(tmp_path / "r"),
            "--no-chart",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    row = json.loads((tmp_path / "r" / "quality.json").read_text())["results"][0]
    assert row["compute_dtype"] == "bf16" and row["double_quant"] is False
    assert row["skip_modules"] == [SKIP, "model.layers.1.mlp.down_proj"]
    with pytest.raises(SystemExit):
        main(["report", "--model", "m", "--data", "d", "--compute-dtype", "int3"])
    assert "--compute-dtype: invalid choice: 'int3'" in capsys.readouterr().err
