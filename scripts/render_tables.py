"""Regenerate the markdown tables in README.md and docs/*.md from bench/results/*.json.

A table lives between marker comments naming its file:

    <!-- table: bench/results/generation-cpu-unary.json -->
    ...generated: the table and a line saying where it comes from...
    <!-- /table -->

    python scripts/render_tables.py           # rewrite the blocks in place
    python scripts/render_tables.py --check   # exit 1, naming each stale block, if any differs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (?P<src>[^ ]+?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


def documents(root: Path | None = None) -> list[Path]:
    root = root or ROOT
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return fmt.format(value)
    return str(value).replace("|", "\\|")


def _machine(m: dict[str, Any]) -> str:
    parts = [f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"]
    if m.get("load_average"):
        parts.append("load average " + "/".join(f"{x:g}" for x in m["load_average"]) + " (1/5/15 min)")
    parts.append(f"torch {m.get('torch', '?')}")
    parts.append(f"GPU {m['gpu']}" if m.get("gpu") else "no GPU")
    return ", ".join(parts)


def _revision(rev: str) -> str:
    """A short commit id; "-dirty" kept (the run's code differed from that commit)."""
    return rev[:12] + ("-dirty" if rev.endswith("-dirty") else "")


def render(data: dict[str, Any], src: str) -> str:
    """The markdown for one results file: table, then its provenance."""
    cols = data["columns"]
    lines = [
        "| " + " | ".join(c["title"] for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in data["rows"]:
        lines.append("| " + " | ".join(_cell(row[c["key"]], c.get("format", "{}")) for c in cols) + " |")
    lines.append("")
    lines.append(
        f"Generated from `{src}` by `python scripts/render_tables.py`: `{data['command']}` at "
        f"{_revision(data['git_revision'])}, {data['date'][:10]}; {_machine(data['machine'])}."
    )
    lines.extend(f"{n}" if n.startswith("- ") else f"- {n}" for n in data.get("notes", []))
    return "\n".join(lines) + "\n"


def rendered(text: str, root: Path | None = None) -> tuple[str, list[str]]:
    """`text` with every block regenerated, and the sources of the blocks that changed."""
    root = root or ROOT
    changed: list[str] = []

    def sub(m: re.Match[str]) -> str:
        src = m.group("src")
        if not (root / src).is_file():
            changed.append(f"{src} (missing)")
            return m.group(0)
        body = render(json.loads((root / src).read_text()), src)
        if body != m.group("body"):
            changed.append(src)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(sub, text), changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = p.parse_args(argv)
    stale = []
    for doc in documents():
        text = doc.read_text()
        new, changed = rendered(text)
        rel = doc.relative_to(ROOT)
        stale.extend(f"{rel}: table from {src} differs from what the file renders" for src in changed)
        if changed and not args.check:
            doc.write_text(new)
    for line in stale:
        print(line, file=sys.stderr if args.check else sys.stdout)
    if args.check and stale:
        print("run: python scripts/render_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
