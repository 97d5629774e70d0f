"""Sequence-classification heads (classify, sentiment): batched forward -> probabilities."""

from __future__ import annotations

from typing import Any

import torch

from bitserve.models.loading import LoadedModel


class HeadScoreRunner:
    """Engine-process half: batched forward through the classification head -> probabilities."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        cfg = loaded.config
        self.multi_label = getattr(cfg, "problem_type", None) == "multi_label_classification"
        tok = loaded.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        self.bank: Any = None  # the engine's LoraBank for this classifier's adapters, if any

    def run_batch(self, batch: list[list[int]], slots: list[int] | None = None) -> list[list[float]]:
        """Probabilities per text; `slots`: each text's adapter slot in `bank` (0: the base)."""
        lm = self.loaded
        tok = lm.tokenizer
        ids, mask = pad_batch(batch, tok.pad_token_id, left=tok.padding_side == "left")
        enc = {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)}
        if self.bank is not None and slots is not None and any(slots):
            self.bank.index = torch.tensor(slots, dtype=torch.long, device=lm.device)
            try:
                logits = lm.model(**enc).logits.float()
            finally:
                self.bank.index = None
        else:
            logits = lm.model(**enc).logits.float()
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return probs.cpu().tolist()


def pad_batch(
    batch: list[list[int]], pad_id: int, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `batch` padded to its longest row, as the tokenizer's
    `pad` gives them, in two tensor constructions instead of its per-row Python."""
    width = max(map(len, batch), default=0)
    pads = [width - len(row) for row in batch]
    if left:
        ids = [[pad_id] * n + row for n, row in zip(pads, batch, strict=True)]
        mask = [[0] * n + [1] * (width - n) for n in pads]
    else:
        ids = [row + [pad_id] * n for n, row in zip(pads, batch, strict=True)]
        mask = [[1] * (width - n) + [0] * n for n in pads]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
