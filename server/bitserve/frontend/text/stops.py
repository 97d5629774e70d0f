"""Stop strings, found in the detokenized text as it grows."""

from __future__ import annotations

from collections.abc import Sequence


def stop_hold(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in `text[start:]` (as an index into `text`), or -1."""
    cut = -1
    for stop in stops:
        j = text.find(stop, start)
        if j >= 0 and (cut < 0 or j < cut):
            cut = j
    return cut
