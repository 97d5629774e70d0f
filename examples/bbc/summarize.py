"""Collect the BBC example's manifests and quality reports into one Markdown table."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    w = Path(sys.argv[1] if len(sys.argv) > 1 else "bbc-run")
    print(
        "| run | peak RSS (train) | train time | test acc, unquantized | test acc, int8 | test acc, nf4 "
        "| macro-F1 (none / int8 / nf4) | weights MiB (none / int8 / nf4) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in ("full-bf16", "qlora"):
        ft = json.loads((w / run / "finetune.json").read_text())
        q = {}
        for mode in ("int8", "nf4"):
            doc = json.loads((w / "export" / f"{run}-{mode}" / "quality.json").read_text())
            for row in doc["results"]:
                q.setdefault(row["quantize"], row)
        acc = [100 * q[m]["accuracy"] for m in ("none", "int8", "nf4")]
        f1 = [100 * q[m]["macro_f1"] for m in ("none", "int8", "nf4")]
        mem = [q[m]["memory_bytes"] / 2**20 for m in ("none", "int8", "nf4")]
        print(
            f"| {run} | {ft['peak_memory_bytes'] / 2**20:.0f} MiB | {ft['seconds'] / 60:.1f} min "
            f"| {acc[0]:.2f} | {acc[1]:.2f} | {acc[2]:.2f} "
            f"| {' / '.join(f'{x:.2f}' for x in f1)} | {' / '.join(f'{x:.1f}' for x in mem)} |"
        )


if __name__ == "__main__":
    main()
