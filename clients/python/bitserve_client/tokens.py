"""Tokenize / Detokenize: request builders and the typed result, shared by both clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bitserve_proto.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class Tokens:
    """One text through the model's tokenizer."""

    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]  # [start, end) characters of `text` per id
    tokens: tuple[str, ...]  # the vocabulary entry of each id
    text: str  # what was tokenized (for messages: the rendered chat prompt)


def tokenize_request(
    texts: str | Sequence[str] | None,
    model: str | None,
    add_special_tokens: bool,
    messages: Sequence[Mapping[str, str] | tuple[str, str]] | None,
) -> tuple[pb.TokenizeRequest, bool]:
    single = isinstance(texts, str) or texts is None
    items = [texts] if isinstance(texts, str) else list(texts or [])
    pbm = []
    for m in messages or ():
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        pbm.append(pb.ChatMessage(role=role, content=content))
    req = pb.TokenizeRequest(
        texts=items, model=model or "", add_special_tokens=add_special_tokens, messages=pbm
    )
    return req, single


def tokens_of(resp: pb.TokenizeResponse, single: bool):
    out = [
        Tokens(tuple(r.ids), tuple((o.start, o.end) for o in r.offsets), tuple(r.tokens), r.text)
        for r in resp.results
    ]
    return out[0] if single else out


def detokenize_request(
    ids: Sequence[int], model: str | None, skip_special_tokens: bool
) -> pb.DetokenizeRequest:
    return pb.DetokenizeRequest(ids=list(ids), model=model or "", skip_special_tokens=skip_special_tokens)
