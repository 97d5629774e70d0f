"""Typed errors for the `quantize` tool.

Everything below the CLI raises one of these; `cli.main` turns it into a single line on stderr
and a non-zero exit. Data errors name the file, line and column so the fix is obvious.
"""

from __future__ import annotations

from pathlib import Path


class QuantizeError(Exception):
    """Base class: a problem the user can fix (bad input, bad options), reported as one line."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class OptionError(QuantizeError):
    """Options that contradict each other or the checkpoint."""

    exit_code = 2


class DataError(QuantizeError):
    """A data file is unreadable, empty, or has a bad record."""

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        column: str | None = None,
    ):
        where = str(path)
        if line is not None:
            where += f":{line}"
        if column is not None:
            where += f": column {column!r}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.column = column


class TaskMismatch(QuantizeError):
    """The requested task is not what the checkpoint was built for."""


class CheckpointError(QuantizeError):
    """A checkpoint (or a training checkpoint to resume from) is missing or unusable."""
