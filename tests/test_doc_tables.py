"""Published numbers come from committed files: every table between `<!-- table: FILE -->`
markers in README.md and docs/*.md is exactly what scripts/render_tables.py renders from FILE."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scripts import render_tables

ROOT = Path(__file__).resolve().parents[1]
DOCS = render_tables.documents(ROOT)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_doc_tables_equal_what_their_result_files_render(doc):
    text = doc.read_text()
    opened = re.findall(r"<!-- table: ", text)
    assert len(opened) == len(render_tables.BLOCK.findall(text)), f"{doc.name}: a table marker is not closed"
    _, stale = render_tables.rendered(text, ROOT)
    assert stale == [], f"{doc.name}: stale tables {stale}; run python scripts/render_tables.py"


def test_every_result_file_says_how_and_where_it_was_measured():
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert files, "bench/results/ holds the files the docs' tables come from"
    for f in files:
        data = json.loads(f.read_text())
        assert data["command"].startswith("python "), f.name
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", data["git_revision"]), f.name
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["date"]), f.name
        m = data["machine"]
        assert m["cpu"] and m["cores"] >= 1 and m["torch"] and "gpu" in m, f.name
        keys = [c["key"] for c in data["columns"]]
        assert data["rows"] and all(set(keys) <= row.keys() for row in data["rows"]), f.name


def _results_file(tmp_path: Path, rows: list[dict]) -> str:
    data = {
        "command": "python -m bench.x --n 2",
        "git_revision": "a" * 40,
        "date": "2026-11-29T06:00:00Z",
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "load_average": [0.5, 0, 0],
            "torch": "2.13.0",
            "gpu": None,
        },
        "columns": [
            {"key": "name", "title": "name", "format": "{}"},
            {"key": "tps", "title": "tok/s", "format": "{:.0f}"},
            {"key": "ratio", "title": "x", "format": "{:.2f}"},
        ],
        "rows": rows,
        "notes": ["median of 3 rounds"],
    }
    (tmp_path / "bench").mkdir(exist_ok=True)
    (tmp_path / "bench" / "r.json").write_text(json.dumps(data))
    return "bench/r.json"


def test_render_formats_cells_and_names_the_source(tmp_path):
    src = _results_file(tmp_path, [{"name": "a|b", "tps": 1234.6, "ratio": None}])
    doc = f"intro\n<!-- table: {src} -->\nold\n<!-- /table -->\nafter\n"
    new, stale = render_tables.rendered(doc, tmp_path)
    assert stale == [src]
    assert new == (
        "intro\n<!-- table: bench/r.json -->\n"
        "| name | tok/s | x |\n|---|---|---|\n| a\\|b | 1235 | - |\n\n"
        "Generated from `bench/r.json` by `python scripts/render_tables.py`: `python -m bench.x --n 2` "
        "at aaaaaaaaaaaa, 2026-11-29; Test CPU, 2 cores, load average 0.5/0/0 (1/5/15 min), torch 2.13.0, "
        "no GPU.\n"
        "- median of 3 rounds\n<!-- /table -->\nafter\n"
    )
    assert render_tables.rendered(new, tmp_path) == (new, [])


def test_check_fails_when_a_number_in_the_doc_is_edited_by_hand(tmp_path, monkeypatch, capsys):
    src = _results_file(tmp_path, [{"name": "a", "tps": 1000.0, "ratio": 1.5}])
    (tmp_path / "docs").mkdir()
    good, _ = render_tables.rendered(f"<!-- table: {src} -->\n<!-- /table -->\n", tmp_path)
    (tmp_path / "README.md").write_text(good)
    (tmp_path / "docs" / "x.md").write_text(good.replace("| 1000 |", "| 1100 |"))
    monkeypatch.setattr(render_tables, "ROOT", tmp_path)
    assert render_tables.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/x.md: table from bench/r.json differs" in err and "README.md" not in err
    assert render_tables.main([]) == 0  # rewrites docs/x.md from the file
    assert (tmp_path / "docs" / "x.md").read_text() == good
    assert render_tables.main(["--check"]) == 0
