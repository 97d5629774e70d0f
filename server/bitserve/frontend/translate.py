"""Translation with encoder-decoder checkpoints (Marian, T5, M2M100/NLLB, mBART).

Each checkpoint family names languages its own way; a small strategy per family (keyed by the
config's model_type) turns (source_lang, target_lang) into what the model expects: a text
prefix (T5), a target token (multilingual Marian), or a forced first decoder token
(M2M100 / NLLB / mBART).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from bitserve.errors import InvalidArgument
from bitserve.frontend import adapters
from bitserve.frontend.base import BatchedEngine, TranslateEngine, encode, register
from bitserve.metrics import Metrics
from bitserve.models.loaded import LoadedModel
from bitserve.settings import ModelSettings
from bitserve.types import Translation

LANGUAGE_NAMES = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "ro": "Romanian",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "ru": "Russian",
    "zh": "Chinese",
    "ja": "Japanese",
    "ko": "Korean",
    "ar": "Arabic",
    "pl": "Polish",
    "sv": "Swedish",
}


@dataclass(frozen=True)
class Prepared:
    """How one (source, target) pair is fed to the model."""

    prefix: str = ""
    forced_bos_token_id: int | None = None
    src_lang: str | None = None


class LanguageStrategy:
    def prepare(self, tokenizer: Any, source: str | None, target: str | None) -> Prepared:
        if source or target:
            raise InvalidArgument(
                "source_lang/target_lang: this checkpoint translates one fixed language pair; "
                "leave them empty"
            )
        return Prepared()


class T5Strategy(LanguageStrategy):
    def prepare(self, tokenizer: Any, source: str | None, target: str | None) -> Prepared:
        if not source or not target:
            raise InvalidArgument(
                "source_lang and target_lang are required for T5-style models "
                f"(codes: {', '.join(sorted(LANGUAGE_NAMES))})"
            )
        names = []
        for field, code in (("source_lang", source), ("target_lang", target)):
            name = LANGUAGE_NAMES.get(code.lower())
            if name is None:
                raise InvalidArgument(
                    f"{field}: unknown language code {code!r}; known: {', '.join(sorted(LANGUAGE_NAMES))}"
                )
            names.append(name)
        return Prepared(prefix=f"translate {names[0]} to {names[1]}: ")


class MarianStrategy(LanguageStrategy):
    """Bilingual Marian checkpoints take no codes; multilingual-target ones take >>xx<<."""

    def prepare(self, tokenizer: Any, source: str | None, target: str | None) -> Prepared:
        codes = list(getattr(tokenizer, "supported_language_codes", []) or [])
        if not codes:
            return Prepared()  # a fixed pair: codes, if given, are informational
        if not target:
            raise InvalidArgument(f"target_lang is required for this checkpoint; one of {codes[:20]}")
        token = target if target.startswith(">>") else f">>{target}<<"
        if token not in codes:
            raise InvalidArgument(f"target_lang: {target!r} not supported; one of {codes[:20]}")
        return Prepared(prefix=token + " ")


class ForcedBosStrategy(LanguageStrategy):
    """M2M100 (`fr` -> `__fr__`), NLLB (`fra_Latn`), mBART-50 (`fr_XX`)."""

    def prepare(self, tokenizer: Any, source: str | None, target: str | None) -> Prepared:
        if not source or not target:
            raise InvalidArgument("source_lang and target_lang are required for this multilingual model")
        tok_id = None
        for cand in (target, f"__{target}__"):
            i = tokenizer.convert_tokens_to_ids(cand)
            if i is not None and i != tokenizer.unk_token_id:
                tok_id = i
                break
        if tok_id is None:
            raise InvalidArgument(
                f"target_lang: {target!r} is not a language code of this checkpoint "
                "(M2M100: 'fr'; NLLB: 'fra_Latn'; mBART-50: 'fr_XX')"
            )
        return Prepared(forced_bos_token_id=tok_id, src_lang=source)


STRATEGIES: dict[str, LanguageStrategy] = {
    "t5": T5Strategy(),
    "mt5": T5Strategy(),
    "marian": MarianStrategy(),
    "m2m_100": ForcedBosStrategy(),
    "nllb": ForcedBosStrategy(),
    "mbart": ForcedBosStrategy(),
}


@register
class Seq2SeqTranslateEngine(BatchedEngine, TranslateEngine):
    backend = "head"

    def __init__(self, settings: ModelSettings, loaded: LoadedModel, metrics: Metrics, core: Any):
        super().__init__(settings, loaded, metrics, core)
        self.strategy = STRATEGIES.get(loaded.config.model_type, LanguageStrategy())

    async def translate(
        self,
        texts: list[str],
        *,
        source_lang: str | None,
        target_lang: str | None,
        max_new_tokens: int | None,
        deadline: float | None,
        adapter: str = "",
    ) -> list[Translation]:
        adapters.refuse_on_head(self, adapter)
        tok = self.loaded.tokenizer
        prep = self.strategy.prepare(tok, source_lang, target_lang)
        n = self.resolve_max_new_tokens(max_new_tokens)
        with self._batcher.reserve(len(texts)) as room:  # a full queue refuses before tokenizing
            inputs = [prep.prefix + t for t in texts]
            ids = await self.off_loop(encode_from, tok, prep.src_lang, inputs)
            self.check_lengths(inputs, ids)
            items = [[i, prep.forced_bos_token_id, n] for i in ids]
            outs = await self._batcher.submit(items, deadline=deadline, room=room)
        self.metrics.generated_tokens.labels(self.name, self.task.value).inc(sum(k for _, k in outs))
        return [Translation(t) for t, _ in outs]


_SOURCE_LOCK = threading.Lock()


def encode_from(tokenizer: Any, src_lang: str | None, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` in source language `src_lang` (NLLB, M2M100, mBART: a language token
    the tokenizer adds). `src_lang` is state on the tokenizer, shared by every request (and by
    models on the same checkpoint): set and used under one lock, on the tokenization thread."""
    if src_lang is None or not hasattr(tokenizer, "src_lang"):
        return encode(tokenizer, texts)
    with _SOURCE_LOCK:
        tokenizer.src_lang = src_lang
        return encode(tokenizer, texts)
