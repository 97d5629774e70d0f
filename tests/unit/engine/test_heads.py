"""The encoder heads' batch padding equals the tokenizer's own `pad`, tensor for tensor."""

from __future__ import annotations

import pytest
import torch

from bitserve.engine.heads.classifier import pad_batch


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_equals_the_tokenizers_pad(tiny_models, side):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["topics"])
    tok.padding_side = side
    texts = ["hello", "the quick brown fox jumps over the lazy dog", "a b", "sports news today"]
    batch = [tok(t)["input_ids"] for t in texts]
    ref = tok.pad({"input_ids": batch}, return_tensors="pt")
    ids, mask = pad_batch(batch, tok.pad_token_id, left=side == "left")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert set(ref) == {"input_ids", "attention_mask"}  # nothing else the head's forward would get


def test_pad_batch_of_equal_rows_adds_nothing():
    ids, mask = pad_batch([[5, 6], [7, 8]], 0)
    assert ids.tolist() == [[5, 6], [7, 8]] and mask.tolist() == [[1, 1], [1, 1]]
