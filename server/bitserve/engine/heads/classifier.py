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
        enc = lm.tokenizer.pad({"input_ids": batch}, return_tensors="pt")
        enc = {k: v.to(lm.device) for k, v in enc.items()}
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
