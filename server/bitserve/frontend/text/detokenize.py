"""Incremental detokenization: the text of a growing token list, piece by piece.

A piece is released only when it decodes cleanly, so a multi-byte character split across tokens
is never emitted half-way; the pieces concatenate to the decode of all the tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class OffsetDecoder:
    """By decoding windows of ids (TGI's prefix/read offsets): works for any tokenizer."""

    __slots__ = ("tok", "ids", "prefix", "read")

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


class StreamDecoder:
    """The same, in Rust (`tokenizers.decoders.DecodeStream`): ~10x cheaper per token."""

    __slots__ = ("tok", "stream", "ctx", "tail")

    def __init__(self, tokenizer: Any, stream_cls: Any):
        self.tok = tokenizer
        self.stream = stream_cls(skip_special_tokens=True)
        self.ctx: list[int] = []  # the tokens of the last released piece (context for flush)
        self.tail: list[int] = []  # tokens not released yet

    def step(self, token_id: int) -> str:
        self.tail.append(token_id)
        piece = self.stream.step(self.tok._tokenizer, token_id)
        if piece is None:
            return ""
        self.ctx, self.tail = self.tail, []
        return piece

    def flush(self) -> str:
        """What `decode` gives for the unreleased tail (an incomplete character as U+FFFD)."""
        if not self.tail:
            return ""
        before = self.tok.decode(self.ctx, skip_special_tokens=True)
        text = self.tok.decode(self.ctx + self.tail, skip_special_tokens=True)
        self.ctx, self.tail = self.ctx + self.tail, []
        return text[len(before) :]


def decoder_factory(tokenizer: Any) -> Callable[[], Any]:
    """Fast tokenizers without space clean-up stream in Rust; anything else by offsets."""
    stream_cls: Any = None
    try:
        from tokenizers.decoders import DecodeStream as stream_cls
    except ImportError:  # pragma: no cover - old tokenizers
        pass
    raw = getattr(tokenizer, "_tokenizer", None)
    if (
        stream_cls is not None
        and raw is not None
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
    ):
        return lambda: StreamDecoder(tokenizer, stream_cls)
    return lambda: OffsetDecoder(tokenizer)
