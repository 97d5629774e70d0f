"""Which backend serves a model entry: a task head, or an instruction LM (both processes ask)."""

from __future__ import annotations

import json
from pathlib import Path

from bitserve.settings import ModelSettings
from bitserve.types import Task

_CAUSAL_SUFFIXES = ("ForCausalLM",)


def resolve_backend(m: ModelSettings) -> str:
    """'auto' -> 'instruct' when a non-generate task points at a causal LM, else 'head'."""
    if m.backend != "auto":
        return m.backend
    if m.task == Task.GENERATE:
        return "head"
    p = Path(m.path)
    if m.gguf_file or p.suffix == ".gguf":
        return "instruct"  # GGUF files hold decoder-only LMs
    try:
        # config.json read as JSON: transformers' AutoConfig imports torch, which the front does not.
        archs = json.loads((p / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):  # unreadable config: let the loader report it precisely
        return "head"
    return "instruct" if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) else "head"
