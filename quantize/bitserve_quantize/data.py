"""Data files -> validated records.

JSONL (one object per line) or CSV (a header row). Every record keeps the file and line it came
from, so a bad value is reported as `file:line: column 'x': what is wrong`. Which columns a
task needs is the task's business (`tasks.py`); this module reads, checks shape, and splits.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class Record:
    """One example: its fields, and where it came from."""

    fields: dict[str, Any]
    path: str
    line: int

    def get(self, column: str) -> Any:
        return self.fields.get(column)

    def text(self, column: str) -> str:
        """A required, non-empty string column."""
        if column not in self.fields or self.fields[column] is None:
            raise DataError(self.path, "missing column", line=self.line, column=column)
        value = self.fields[column]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and column == "label":
            value = str(value)
        if not isinstance(value, str):
            raise DataError(
                self.path, f"expected a string, got {type(value).__name__}", line=self.line, column=column
            )
        if not value.strip():
            raise DataError(self.path, "empty value", line=self.line, column=column)
        return value


@dataclass
class Dataset:
    """Records read from one file (or a split of one)."""

    path: str
    records: list[Record] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


def read(path: str | Path) -> Dataset:
    """Read a JSONL or CSV file; an empty file or a malformed line is a DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "no such file")
    suffix = p.suffix.lower()
    if suffix in CSV_SUFFIXES:
        records = list(_read_csv(p, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix in JSONL_SUFFIXES:
        records = list(_read_jsonl(p))
    else:
        raise DataError(p, f"unknown format {suffix!r}; use .jsonl or .csv")
    if not records:
        raise DataError(p, "no records (empty file)")
    return Dataset(str(p), records)


def _read_jsonl(p: Path) -> Iterable[Record]:
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(p, f"invalid JSON ({e.msg} at column {e.colno})", line=n) from None
            if not isinstance(obj, dict):
                raise DataError(p, f"expected a JSON object, got {type(obj).__name__}", line=n)
            yield Record(obj, str(p), n)


def _read_csv(p: Path, delimiter: str) -> Iterable[Record]:
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        for row in reader:
            # DictReader puts surplus cells under the None key; a short row has None values.
            if None in row:
                raise DataError(p, "more cells than header columns", line=reader.line_num)
            yield Record({k: v for k, v in row.items() if v is not None}, str(p), reader.line_num)


def require_columns(dataset: Dataset, alternatives: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """The column set (one of `alternatives`) the first record uses; every record must have it.

    A missing column is reported at the first record that lacks it.
    """
    first = dataset.records[0]
    chosen = next((alt for alt in alternatives if all(c in first.fields for c in alt)), None)
    if chosen is None:
        wanted = " or ".join("{" + ", ".join(repr(c) for c in alt) + "}" for alt in alternatives)
        missing = next(c for c in alternatives[0] if c not in first.fields)
        raise DataError(
            dataset.path,
            f"missing column (records need {wanted}; found {sorted(first.fields)})",
            line=first.line,
            column=missing,
        )
    for r in dataset.records:
        for c in chosen:
            r.text(c)
    return tuple(chosen)


def split(
    dataset: Dataset, fraction: float, seed: int, *, stratify: str | None = None
) -> tuple[Dataset, Dataset]:
    """A reproducible (train, held-out) split; the held-out part has at least one record.

    With `stratify` (a column, e.g. "label") each value is split on its own, so the held-out
    part has the data's class mix and a value seen once always stays in training (a class the
    model never trained on could not be scored).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval split must be in (0, 1), got {fraction}")
    if len(dataset) < 2:
        raise DataError(dataset.path, f"{len(dataset)} record(s): too few to hold out an eval split")
    rng = random.Random(seed)
    if stratify is None:
        groups = [list(range(len(dataset)))]
    else:
        by_value: dict[str, list[int]] = {}
        for i, r in enumerate(dataset.records):
            by_value.setdefault(r.text(stratify), []).append(i)
        groups = [by_value[v] for v in sorted(by_value)]
    held_idx: list[int] = []
    for group in groups:
        order = list(group)
        rng.shuffle(order)
        n_eval = round(len(order) * fraction)
        if stratify is not None:
            n_eval = min(n_eval, len(order) - 1)
        held_idx += order[:n_eval]
    if not held_idx:  # tiny data: hold out one record from the largest group that can spare it
        group = max(groups, key=len)
        held_idx = [group[rng.randrange(len(group))]]
    held = sorted(held_idx)
    chosen = set(held)
    kept = [i for i in range(len(dataset)) if i not in chosen]
    return (
        Dataset(dataset.path, [dataset.records[i] for i in kept]),
        Dataset(dataset.path + f" (held-out {fraction:g})", [dataset.records[i] for i in held]),
    )


def write_jsonl(dataset: Dataset, path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in dataset.records:
            f.write(json.dumps(r.fields, ensure_ascii=False) + "\n")


def sha256(*paths: str | Path | None) -> str:
    """Hash of the data files' bytes, for the manifest."""
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
