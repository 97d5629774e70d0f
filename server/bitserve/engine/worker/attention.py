"""Decode attention of the persistent batch in width groups: no row attends over columns only
another row needs.

A decode step hands the model K/V of the batch's first `width = max(cols) + 1` columns, so
every row attends over as many columns as the longest row has: one 2,048-token prompt joining
63 short rows makes each of them read 2,048 columns (masked off, but computed) - on a small
model most of the step (bench.long_join: inter-token median 8-11 ms before the join,
48-68 ms after it). Rows sit in slots in join order, so the long ones are few and scattered;
`width_groups` cuts the rows into contiguous runs (the long rows apart from the short ones),
each with its own width, and `attention` runs SDPA once per run over just its columns.

It is transformers' own SDPA attention (`sdpa_attention_forward`) per run, registered under
its own name (`NAME`, with SDPA's mask function) so that a model the persistent batch serves
uses it; outside a grouped decode step - prefill, chunks, the copying batch, scoring, a
compiled graph - it is exactly SDPA (the same call with the same arguments).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

NAME = "bitserve_sdpa"

# A row is long when it needs more than LONG_FACTOR x the median row's columns (and at least
# LONG_MIN_COLUMNS more): only then does a separate run pay for its extra SDPA call.
LONG_FACTOR = 2.0
LONG_MIN_COLUMNS = 128
MAX_GROUPS = 8  # runs per step at most (more long rows than this: one run, as plain SDPA)

Groups = list[tuple[int, int, int]]  # (first row, end row, columns) per run, covering 0..n

_active = threading.local()
_registered = False


def width_groups(widths: list[int]) -> Groups | None:
    """Contiguous runs of rows, long rows apart from short ones, each with the columns its rows
    need (their widest), or None when one run over every row costs about as much."""
    n = len(widths)
    if n < 2:
        return None
    ordered = sorted(widths)
    median = ordered[n // 2]
    limit = max(median * LONG_FACTOR, median + LONG_MIN_COLUMNS)
    if ordered[-1] <= limit:
        return None
    groups: Groups = []
    start = 0
    for r in range(1, n + 1):
        if r == n or (widths[r] > limit) != (widths[start] > limit):
            groups.append((start, r, max(widths[start:r])))
            start = r
    if len(groups) > MAX_GROUPS:
        return None
    return groups


@contextmanager
def grouped(groups: Groups | None) -> Iterator[None]:
    """The model's forward inside this block attends per run of `groups` (None: as SDPA)."""
    _active.groups = groups
    try:
        yield
    finally:
        _active.groups = None


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if torch.compiler.is_compiling():
        # A compiled graph never sees the groups (nor guards on them). On the CPU its mask is
        # cut to the step's columns in use (a dynamic size): K/V are cut to match, so the graph
        # attends over those alone, not over every allocated column.
        if attention_mask is not None and attention_mask.shape[-1] < key.shape[-2]:
            w = attention_mask.shape[-1]
            key, value = key[:, :, :w], value[:, :, :w]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[no-any-return]
    groups: Groups | None = getattr(_active, "groups", None)
    if groups is None or query.shape[2] != 1 or query.shape[0] != groups[-1][1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[no-any-return]
    outs = []
    for r0, r1, w in groups:
        m = None if attention_mask is None else attention_mask[r0:r1, ..., :w]
        out, _ = sdpa_attention_forward(
            module, query[r0:r1], key[r0:r1, :, :w], value[r0:r1, :, :w], m, **kwargs
        )
        outs.append(out)
    return torch.cat(outs), None


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    _registered = True


def use(model: Any, on: bool = True) -> None:
    """`model` attends through `attention` (on) or plain SDPA (off). Its config must say SDPA
    (or this) already: the persistent batch only serves such models."""
    register()
    cfg = model.config
    want = NAME if on else "sdpa"
    if getattr(cfg, "_attn_implementation", None) in ("sdpa", NAME):
        cfg._attn_implementation_internal = want
