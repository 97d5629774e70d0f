"""Sequence-classification heads (classify, sentiment): batched forward -> probabilities."""

from __future__ import annotations

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

    def run_batch(self, batch: list[list[int]]) -> list[list[float]]:
        lm = self.loaded
        enc = lm.tokenizer.pad({"input_ids": batch}, return_tensors="pt")
        enc = {k: v.to(lm.device) for k, v in enc.items()}
        logits = lm.model(**enc).logits.float()
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return probs.cpu().tolist()
