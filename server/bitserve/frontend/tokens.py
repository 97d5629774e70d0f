"""Tokenize / Detokenize with a model's own tokenizer (front side; no engine process work)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bitserve.errors import FailedPrecondition, InvalidArgument
from bitserve.types import Tokenized


def tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[Tokenized]:
    """Ids, character offsets and token spellings, as `tokenizer(texts)` gives them (the ids
    are the ones Generate sends to the model: `frontend.base.encode` takes the same path)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and backend.padding is None and backend.truncation is None:
        # The Rust backend reports offsets in characters, as the transformers wrapper does.
        encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [
            Tokenized(t, tuple(e.ids), tuple((int(a), int(b)) for a, b in e.offsets), tuple(e.tokens))
            for t, e in zip(texts, encodings)
        ]
    if not getattr(tokenizer, "is_fast", False):
        raise FailedPrecondition(
            "Tokenize needs a fast (Rust) tokenizer for character offsets; this checkpoint has a slow one"
        )
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return [
        Tokenized(
            t,
            tuple(ids),
            tuple((int(a), int(b)) for a, b in offsets),
            tuple(tokenizer.convert_ids_to_tokens(ids)),
        )
        for t, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"])
    ]


def detokenize(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool) -> str:
    """The text of `ids`; INVALID_ARGUMENT naming the first id outside the vocabulary."""
    vocab = len(tokenizer)
    for i, t in enumerate(ids):
        if t >= vocab:
            raise InvalidArgument(f"ids[{i}] is {t}; the model's vocabulary has ids 0..{vocab - 1}")
    return str(tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))
