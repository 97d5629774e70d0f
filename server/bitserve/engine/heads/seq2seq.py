"""Encoder-decoder translation heads: `generate` on batches grouped by decoding options."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from bitserve.models.loading import LoadedModel


class Seq2SeqRunner:
    """Engine-process half: `generate` on batches of [input_ids, forced_bos_token_id,
    max_new_tokens] items, grouped by their decoding options -> [text, generated tokens]."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    def run_batch(self, batch: list[list[Any]]) -> list[list[Any]]:
        lm = self.loaded
        groups: dict[tuple[int | None, int], list[int]] = defaultdict(list)
        for i, (_, forced, n) in enumerate(batch):
            groups[(forced, n)].append(i)
        out: list[list[Any]] = [["", 0]] * len(batch)
        pad = lm.tokenizer.pad_token_id
        for (forced, n), idx in groups.items():
            enc = lm.tokenizer.pad({"input_ids": [list(batch[i][0]) for i in idx]}, return_tensors="pt")
            enc = {k: v.to(lm.device) for k, v in enc.items()}
            kwargs: dict[str, Any] = {"max_new_tokens": n}
            if forced is not None:
                kwargs["forced_bos_token_id"] = forced
            seqs = lm.model.generate(**enc, **kwargs)
            texts = lm.tokenizer.batch_decode(seqs, skip_special_tokens=True)
            for row, (i, t) in enumerate(zip(idx, texts, strict=True)):
                out[i] = [t.strip(), int((seqs[row, 1:] != pad).sum())]
        return out
