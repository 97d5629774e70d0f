"""A running batch: sequences decoding together in one left-padded KV cache.

TGI's `Batch` idea: `filter` keeps some rows (dropping cache columns no kept row uses) and
`concatenate` joins batches (padding the shorter pasts on the left). Position ids come from each
row's own count of real tokens, so a row's logits do not depend on its neighbours' padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from bitserve.engine.sched.sequence import Sequence

if TYPE_CHECKING:
    from bitserve.engine.worker.sampler import Plan


class Batch:
    """Sequences decoding together: one left-padded KV cache and the tensors a step needs."""

    def __init__(
        self,
        seqs: list[Sequence],
        cache: Any,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        next_ids: torch.Tensor,
        seen: torch.Tensor | None,
    ):
        self.seqs = seqs
        self.cache = cache  # transformers DynamicCache; rows follow `seqs`
        self.mask = mask  # [B, past] bool, True for real tokens; None when no row is padded
        self.positions = positions  # [B] position id of the next input token
        self.next_ids = next_ids  # [B] the token each row feeds next
        self.seen = seen  # [B, V] bool, tokens seen per row (repetition penalty), or None
        self._plan: Plan | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def past(self) -> int:
        return int(self.cache.layers[0].keys.shape[-2]) if self.cache.layers else 0

    def plan(self) -> Plan:
        if self._plan is None:
            from bitserve.engine.worker.sampler import make_plan

            self._plan = make_plan(self.seqs, self.next_ids.device)
        return self._plan

    def filter(self, keep: list[int]) -> Batch | None:
        """Only rows `keep`; cache columns that no kept row uses are dropped."""
        if not keep:
            return None
        if len(keep) == len(self.seqs):
            return self
        dev = self.next_ids.device
        idx = torch.tensor(keep, device=dev)
        mask = self.mask.index_select(0, idx) if self.mask is not None else None
        trim = 0
        if mask is not None:
            used = mask.any(0)
            trim = int(used.int().argmax())  # first column some row uses
            mask = mask[:, trim:]
            if bool(mask.all()):
                mask = None
        for layer in self.cache.layers:
            select = getattr(layer, "select_rows", None)
            if select is not None and trim == 0:
                select(idx)
            else:
                layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
                layer.values = layer.values.index_select(0, idx)[:, :, trim:]
        return Batch(
            [self.seqs[i] for i in keep],
            self.cache,
            mask,
            self.positions.index_select(0, idx),
            self.next_ids.index_select(0, idx),
            self.seen.index_select(0, idx) if self.seen is not None else None,
        )

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """One batch of all rows; shorter pasts are padded on the left."""
        batches = [b for b in batches if b is not None and len(b)]
        if len(batches) == 1:
            return batches[0]
        pasts = [b.past for b in batches]
        past = max(pasts)
        first = batches[0]
        dev = first.next_ids.device
        for li, layer in enumerate(first.cache.layers):
            ks, vs = [], []
            for b, p in zip(batches, pasts, strict=True):
                k, v = b.cache.layers[li].keys, b.cache.layers[li].values
                if p < past:
                    k = torch.nn.functional.pad(k, (0, 0, past - p, 0))
                    v = torch.nn.functional.pad(v, (0, 0, past - p, 0))
                ks.append(k)
                vs.append(v)
            layer.keys = torch.cat(ks, 0)
            layer.values = torch.cat(vs, 0)
        if all(b.mask is None for b in batches) and all(p == past for p in pasts):
            mask = None
        else:
            masks = []
            for b, p in zip(batches, pasts, strict=True):
                m = b.mask if b.mask is not None else torch.ones(len(b), p, dtype=torch.bool, device=dev)
                if p < past:
                    m = torch.nn.functional.pad(m, (past - p, 0))
                masks.append(m)
            mask = torch.cat(masks, 0)
        seen = None
        widths = [b.seen.shape[1] for b in batches if b.seen is not None]
        if widths:
            seen = torch.cat(
                [b.seen if b.seen is not None else seen_of(b.seqs, widths[0], dev) for b in batches]
            )
        return Batch(
            [s for b in batches for s in b.seqs],
            first.cache,
            mask,
            torch.cat([b.positions for b in batches]),
            torch.cat([b.next_ids for b in batches]),
            seen,
        )


def seen_of(seqs: list[Sequence], vocab: int, device: torch.device) -> torch.Tensor:
    seen = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        ids = [t for t in s.prompt_ids + s.token_ids if t < vocab]
        if ids:
            seen[i, torch.tensor(ids, device=device)] = True
    return seen
