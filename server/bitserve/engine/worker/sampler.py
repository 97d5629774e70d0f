"""Per-row token choice: each row by its own parameters - the plan's per-row adjustments
(logit_bias, a constraint's bitmask) first, then transformers' processor order (repetition
penalty, temperature, top-k, top-p); logprobs are of the model's own distribution."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from bitserve.engine.sched.sequence import Sequence
from bitserve.engine.worker.logits import Adjust as RowAdjust


class Rows(Protocol):
    """What token choice needs of the rows it picks for: the running batch (`Batch`), or some
    rows of the persistent one (`input_batch.Rows`)."""

    seqs: list[Sequence]
    seen: torch.Tensor | None

    def plan(self) -> Plan: ...


# A per-row logits adjustment (a logit bias, a constrained-decoding bitmask, ...): given the
# logits of the rows that have it ([k, V], float) and those rows' indices, the adjusted logits.
Adjust = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Plan:
    """Per-batch sampling layout, recomputed only when the batch changes."""

    plain_greedy: bool  # argmax of raw logits for every row
    sample_rows: list[int]
    temps: torch.Tensor | None
    top_k: torch.Tensor | None  # 0: off
    top_p: torch.Tensor | None  # 1: off
    penalties: torch.Tensor | None  # [B, 1]
    logprobs: bool
    top_logprobs: int  # the most alternatives any row asks for (0: none)
    # Per-row logits adjustments, each with the rows it applies to (none: nothing to do).
    adjust: list[tuple[torch.Tensor, Adjust]] = field(default_factory=list)


def make_plan(seqs: list[Sequence], dev: torch.device) -> Plan:
    sample_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    penalized = any(s.penalty is not None for s in seqs)
    top_logprobs = max((s.params.top_logprobs for s in seqs), default=0)
    logprobs = top_logprobs > 0 or any(s.params.logprobs for s in seqs)
    temps = top_k = top_p = None
    if sample_rows:
        ps = [seqs[i].params for i in sample_rows]
        temps = torch.tensor([[p.temperature] for p in ps], device=dev)
        if any(p.top_k > 0 for p in ps):
            top_k = torch.tensor([p.top_k for p in ps], device=dev)
        if any(p.top_p < 1.0 for p in ps):
            top_p = torch.tensor([[p.top_p] for p in ps], device=dev)
    penalties = torch.tensor([[s.penalty or 1.0] for s in seqs], device=dev) if penalized else None
    return Plan(
        plain_greedy=not sample_rows and not penalized,
        sample_rows=sample_rows,
        temps=temps,
        top_k=top_k,
        top_p=top_p,
        penalties=penalties,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        adjust=_adjustments(seqs, dev),
    )


def _adjustments(seqs: list[Sequence], dev: torch.device) -> list[tuple[torch.Tensor, Adjust]]:
    """The rows with a logit_bias or a grammar, and one function adjusting just those rows
    (built once per membership); rows without either pay nothing."""
    rows = [i for i, s in enumerate(seqs) if s.guide is not None or s.params.logit_bias]
    if not rows:
        return []
    adj = RowAdjust([seqs[i] for i in rows])
    return [(torch.tensor(rows, device=dev), lambda x, _rows: adj.apply(x))]


Tops = list[list[list[float]]] | None  # per row, [[id, logprob], ...] best first (top_logprobs)


def adjust_logits(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """`x` with each per-row adjustment applied to the rows that have it, and only to them (in
    place: `x` is the step's own float copy of the logits, read by nothing else). When every row
    has it - a batch of constrained rows - the rows are adjusted where they are: no copy of the
    [B, V] logits out and back in (on a real vocabulary that copy costs more than the mask)."""
    for rows, fn in plan.adjust:
        if rows.shape[0] == x.shape[0]:
            x = fn(x, rows)
        else:
            x[rows] = fn(x[rows], rows)
    return x


def select_tokens(
    logits: torch.Tensor, batch: Rows
) -> tuple[torch.Tensor, list[int], list[float] | None, Tops]:
    """Next token per row, each by its own sampling parameters (the plan's per-row adjustments
    first - logit_bias, the grammar mask - then transformers' processor order: repetition
    penalty, temperature, top-k, top-p). Logprobs (and top alternatives) are of the model's
    own distribution. One device-to-host copy for ids and logprobs when some row wants them.
    `logits` is consumed: the adjustments write into it."""
    plan = batch.plan()
    # Adjustments write into the float logits: `logits` is consumed (the step's last use of it).
    logits = logits.float()
    lps = tops = None
    if plan.logprobs:
        lsm = torch.log_softmax(logits, -1)
        if plan.top_logprobs:
            top = lsm.topk(min(plan.top_logprobs, lsm.shape[1]), dim=-1)
            tops = [
                [[i, v] for i, v in zip(ids_, vals, strict=True)]
                for ids_, vals in zip(top.indices.tolist(), top.values.tolist(), strict=True)
            ]
    if plan.plain_greedy and not plan.adjust:
        ids = logits.argmax(-1)
    else:
        x = adjust_logits(logits, plan)
        if plan.penalties is not None and batch.seen is not None:
            pen = torch.where(x < 0, x * plan.penalties, x / plan.penalties)
            x = torch.where(batch.seen[:, : x.shape[1]], pen, x)
        # Every row samples: no argmax, no gather of the rows.
        every = len(plan.sample_rows) == x.shape[0] and plan.temps is not None
        greedy: torch.Tensor | None = None if every else x.argmax(-1)
        if plan.sample_rows and plan.temps is not None:
            rows = torch.tensor(plan.sample_rows, device=x.device)
            xs = warp(x if every else x[rows], plan.temps, plan.top_k, plan.top_p)
            cdf = xs.softmax(-1).cumsum(-1)
            u = (
                torch.tensor([[batch.seqs[i].rng.random()] for i in plan.sample_rows], device=x.device)
                * cdf[:, -1:]
            )
            picked = torch.searchsorted(cdf, u).clamp(max=xs.shape[1] - 1).squeeze(1)
            greedy = picked if greedy is None else greedy.index_copy(0, rows, picked)
        assert greedy is not None
        ids = greedy
    if plan.logprobs:
        # ids as float64 are exact (< 2**53): ids and logprobs cross to the host together.
        both = torch.stack([ids.double(), lsm.gather(1, ids[:, None]).squeeze(1).double()]).tolist()
        return ids, [int(t) for t in both[0]], both[1], tops
    return ids, ids.tolist(), lps, tops


def warp(
    x: torch.Tensor, temps: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Temperature, then top-k (0: off), then top-p (1: off), each row by its own value:
    the logits transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper
    give for that row (filtered entries are -inf)."""
    xs = x / temps
    if top_k is not None:
        k = top_k.clamp(max=xs.shape[1])
        kmax = int(k.max())
        vals = torch.topk(xs, kmax, dim=-1).values
        kth = vals.gather(1, (torch.where(k > 0, k, kmax) - 1)[:, None])
        kth = torch.where((k > 0)[:, None], kth, torch.full_like(kth, -float("inf")))
        xs = xs.masked_fill(xs < kth, -float("inf"))
    if top_p is not None:
        sorted_x, order = torch.sort(xs, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[:, -1] = False
        xs = xs.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return xs
