"""Classification and sentiment on a checkpoint's own sequence-classification head."""

from __future__ import annotations

import re
from typing import Any

from bitserve.errors import ConfigError, InvalidArgument
from bitserve.frontend import adapters
from bitserve.frontend.base import BatchedEngine, ClassifyEngine, SentimentEngine, register
from bitserve.ipc import protocol
from bitserve.metrics import Metrics
from bitserve.models.loaded import LoadedModel
from bitserve.settings import ModelSettings
from bitserve.types import LabelScore, SentimentResult


class _HeadScorer(BatchedEngine):
    """Shared part: batched forward through AutoModelForSequenceClassification -> label scores.
    LoRA adapters apply per row (the engine's head bank: LoRA on the encoder and each adapter's
    own classifier, peft's `modules_to_save`)."""

    serves_adapters = True

    def __init__(self, settings: ModelSettings, loaded: LoadedModel, metrics: Metrics, core: Any):
        super().__init__(settings, loaded, metrics, core)
        cfg = loaded.config
        self._labels = [str(cfg.id2label[i]) for i in range(cfg.num_labels)]
        self.multi_label = getattr(cfg, "problem_type", None) == "multi_label_classification"
        tok = loaded.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    async def scores(self, texts: list[str], deadline: float | None, adapter: str = "") -> list[list[float]]:
        adapter = adapters.resolve(self.settings, adapter)
        with self._batcher.reserve(len(texts)) as room:  # a full queue refuses before tokenizing
            ids = await self.tokenize_checked(texts)
            results = await self._batcher.submit([(i, adapter) for i in ids], deadline=deadline, room=room)
        for r in results:
            if isinstance(r, BaseException):  # this request's adapter, not the batch's
                raise r
        return results

    async def process_batch(self, batch: list[Any]) -> list[Any]:
        ids = [list(i) for i, _ in batch]
        names = [a for _, a in batch]
        if not any(names):
            return list(await self.core.call(protocol.BATCH, self.name, ids))
        got = await self.core.call(protocol.BATCH, self.name, ids, names)
        return [
            adapters.row_error(self, r, a) if isinstance(r, str) else r
            for r, a in zip(got, names, strict=True)
        ]


@register
class HeadClassifyEngine(_HeadScorer, ClassifyEngine):
    backend = "head"

    async def classify(
        self,
        texts: list[str],
        *,
        top_k: int | None,
        candidate_labels: list[str],
        deadline: float | None,
        adapter: str = "",
    ) -> list[list[LabelScore]]:
        if candidate_labels:
            raise InvalidArgument(
                f"candidate_labels: model {self.name!r} has a fixed label set {self._labels}; "
                "zero-shot labels need an instruction model (backend: instruct)"
            )
        k = len(self._labels) if not top_k else min(top_k, len(self._labels))
        out = []
        for probs in await self.scores(texts, deadline, adapter):
            ranked = sorted(zip(self._labels, probs), key=lambda x: -x[1])[:k]
            out.append([LabelScore(label, float(p)) for label, p in ranked])
        return out


_SENTIMENTS = ("positive", "negative", "neutral")


def normalize_sentiment_label(raw: str) -> str | None:
    """Map a checkpoint's label name onto positive / negative / neutral, or None."""
    s = raw.strip().lower()
    for norm, keys in (
        ("positive", ("pos", "good", "happy", "joy")),
        ("negative", ("neg", "bad", "sad", "anger")),
        ("neutral", ("neu", "mixed")),
    ):
        if any(s.startswith(k) or s == k for k in keys):
            return norm
    m = re.fullmatch(r"([1-5])\s*stars?", s)  # review-star checkpoints (1-5 stars)
    if m:
        n = int(m.group(1))
        return "negative" if n <= 2 else "neutral" if n == 3 else "positive"
    return None


@register
class HeadSentimentEngine(_HeadScorer, SentimentEngine):
    backend = "head"

    def __init__(self, settings: ModelSettings, loaded: LoadedModel, metrics: Metrics, core: Any):
        super().__init__(settings, loaded, metrics, core)
        mapped = {raw: normalize_sentiment_label(raw) for raw in self._labels}
        bad = [raw for raw, norm in mapped.items() if norm is None]
        if bad or "positive" not in mapped.values() or "negative" not in mapped.values():
            raise ConfigError(
                f"model {self.name!r}: cannot map labels {self._labels} to positive/negative/"
                f"neutral (unmapped: {bad or 'need both a positive and a negative label'}); "
                "set id2label in the checkpoint's config.json to names like POSITIVE/NEGATIVE"
            )
        self._norm = [mapped[raw] for raw in self._labels]

    async def sentiment(
        self, texts: list[str], *, deadline: float | None, adapter: str = ""
    ) -> list[SentimentResult]:
        out = []
        for probs in await self.scores(texts, deadline, adapter):
            totals: dict[str, float] = {}
            for norm, p in zip(self._norm, probs):
                totals[norm or ""] = totals.get(norm or "", 0.0) + p
            best = max(totals, key=lambda k: totals[k])
            raw_i = max((i for i, n in enumerate(self._norm) if n == best), key=lambda i: probs[i])
            out.append(SentimentResult(best, float(totals[best]), self._labels[raw_i]))
        return out
