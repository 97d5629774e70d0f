"""Committed benchmark results: one JSON file per published table, in bench/results/.

Each file holds the command that produced it, the git revision, the date, the machine (CPU model,
cores, load, torch and GPU) and the table itself as typed columns and raw rows, so that
`scripts/render_tables.py` can regenerate the markdown tables in README.md and docs/*.md and a
test can check that the docs still say what the files say.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


def column(key: str, title: str, fmt: str = "{}") -> dict[str, str]:
    """A table column: `key` in each row, its header, and a str.format spec for numbers."""
    return {"key": key, "title": title, "format": fmt}


def git_revision() -> str:
    """HEAD's commit, with "-dirty" when tracked code differs from it (results and docs aside)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!*.md"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare a number with their own run."""
    import torch

    facts: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for pkg in ("transformers", "bitsandbytes"):
        try:
            facts[pkg] = __import__(pkg).__version__
        except ImportError:
            facts[pkg] = None
    return facts


def command_line(module: str | None = None, argv: Sequence[str] | None = None) -> str:
    """How this process was started, as a user would type it."""
    args = list(sys.argv[1:] if argv is None else argv)
    head = f"python -m {module}" if module else f"python {Path(sys.argv[0]).resolve().relative_to(ROOT)}"
    return " ".join([head, *(shlex.quote(a) for a in args)])


def write(
    name: str,
    *,
    command: str,
    columns: list[dict[str, str]],
    rows: list[dict[str, Any]],
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    started: float | None = None,
) -> Path:
    """Write bench/results/NAME.json and return its path."""
    keys = {c["key"] for c in columns}
    for i, row in enumerate(rows):
        missing = keys - row.keys()
        if missing:
            raise ValueError(f"row {i} lacks {sorted(missing)}")
    now = datetime.datetime.now(datetime.UTC)
    data = {
        "command": command,
        "git_revision": git_revision(),
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": None if started is None else round(now.timestamp() - started, 1),
        "machine": machine(),
        "columns": columns,
        "rows": rows,
        "notes": list(notes),
        **(extra or {}),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return path
