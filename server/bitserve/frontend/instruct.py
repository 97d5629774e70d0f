"""Classify, sentiment and translate with an instruction-tuned causal LM (backend: instruct).

Classification and sentiment do not generate: they score each candidate label as the
assistant's answer to a chat-template prompt. A label's score is the log-likelihood of its
tokens (and the end-of-turn token, so "sport" and "sports" differ), minus the same
log-likelihood after a content-free prompt (text "N/A") - the model's prior for that label,
which otherwise favours short or frequent labels. A softmax over the labels turns the scores
into probabilities that sum to 1. The prompt is run once per text and its KV cache shared by
all of that text's labels (in chunks, so memory grows with the labels' tokens). Everything is
deterministic.

Translation prompts for the translation only and decodes greedily on the engine's continuous
batching scheduler, stopping at the end of the turn or of the first line, and strips the
chatter small models add (quotes, "Translation:").

Both run in the engine process that owns the causal LM's weights; this module is the front half.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
from dataclasses import dataclass
from typing import Any

from bitserve.errors import InvalidArgument
from bitserve.frontend import adapters, chat
from bitserve.frontend.base import BatchedEngine, ClassifyEngine, SentimentEngine, TranslateEngine, register
from bitserve.frontend.batching import Room
from bitserve.frontend.generate import GenerationFront
from bitserve.frontend.translate import LANGUAGE_NAMES
from bitserve.ipc import protocol
from bitserve.metrics import Metrics
from bitserve.models.loaded import LoadedModel
from bitserve.settings import ModelSettings
from bitserve.types import LabelScore, SamplingParams, SentimentResult, Translation

# Prompts chosen on the eval sets in bitserve/data (see examples/eval_adapters.py): with a
# 135M model, short prompts that end on the question score best; "N/A" calibrates best.
CLASSIFY_SYSTEM = "You are a precise text classifier."
SENTIMENT_SYSTEM = "You classify the sentiment of texts as positive or negative."
TRANSLATE_SYSTEM = "You are a professional translator."
CONTENT_FREE = "N/A"
SENTIMENT_LABELS = ("positive", "negative")


def classify_prompt(text: str, labels: list[str] | tuple[str, ...]) -> str:
    return f"Categories: {', '.join(labels)}.\n\nText: {text}\n\nWhat is the category of this text?"


def sentiment_prompt(text: str) -> str:
    return f"Text: {text}\nSentiment:"


def translate_prompt(text: str, source: str | None, target: str) -> str:
    src = f"{source} " if source else ""
    return f"Translate the following {src}text to {target}. Reply with the translation only.\n\n{text}"


class _InstructEngine:
    """Shared part: chat-template prompts on an AutoModelForCausalLM, one batcher."""

    backend = "instruct"
    uses_scheduler = True
    # Provided by the Engine this mixes into.
    loaded: LoadedModel
    name: str
    max_input_tokens: int

    async def chat_prompts(self, system: str, users: list[str]) -> list[list[int]]:
        """`chat_ids` for each user text, off the event loop (templates and tokenizing)."""
        return await self.off_loop(lambda: [self.chat_ids(system, u) for u in users])  # type: ignore[attr-defined]

    def chat_ids(self, system: str, user: str) -> list[int]:
        """Token ids of a prompt that ends where the assistant's answer begins. The caller's
        text stays text: special-token text in it is never a special token (no forged turns)."""
        tok = self.loaded.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [chat.ChatMessage("system", system), chat.ChatMessage("user", user)]
            return chat.prompt_ids(tok, messages, self.name, add_special_tokens=False)
        # No chat template (a base model): a plain instruction format, BOS as encoding adds it.
        body = chat.plain_encoder(tok)(f"{system}\n\n{user}\n\nAnswer: ")
        return chat.with_added_special_tokens(tok, body)

    def checked(self, prompts: list[list[int]], reserve: int = 0) -> list[list[int]]:
        limit = self.max_input_tokens - reserve
        for i, p in enumerate(prompts):
            if len(p) > limit:
                raise InvalidArgument(
                    f"texts[{i}] makes a {len(p)}-token prompt; model {self.name!r} accepts at "
                    f"most {limit} prompt tokens"
                )
        return prompts


# label scoring --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ScoreItem:
    prompt: tuple[int, ...]
    prior_prompt: tuple[int, ...]  # the same prompt with a content-free text
    labels: tuple[tuple[int, ...], ...]  # each label's answer tokens, end-of-turn included
    adapter: str = ""  # the LoRA adapter it is scored through ("": the base)


class _LabelScorer(_InstructEngine, BatchedEngine):
    """Probabilities over candidate labels from the label answers' calibrated likelihoods."""

    _PRIOR_CACHE_SIZE = 256

    def __init__(self, settings: ModelSettings, loaded: LoadedModel, metrics: Metrics, core: Any):
        super().__init__(settings, loaded, metrics, core)
        # The base model's priors depend only on (prompt, labels): computed once, reused by
        # later batches. An adapter's are computed in each batch that needs them (one row per
        # adapter and label set): a name may be unloaded and loaded again with other weights.
        self._priors: collections.OrderedDict[tuple[Any, ...], list[float]] = collections.OrderedDict()

    def label_ids(self, labels: list[str] | tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        tok = self.loaded.tokenizer
        end = () if tok.eos_token_id is None else (tok.eos_token_id,)
        return tuple(tuple(tok(lab, add_special_tokens=False)["input_ids"]) + end for lab in labels)

    async def label_probs(
        self,
        prompts: list[list[int]],
        prior_prompt: list[int],
        labels: list[str] | tuple[str, ...],
        deadline: float | None,
        room: Room | None = None,
        adapter: str = "",
    ) -> list[list[float]]:
        lids = self.label_ids(labels)
        reserve = max(len(x) for x in lids)
        items = [
            _ScoreItem(tuple(p), tuple(prior_prompt), lids, adapter) for p in self.checked(prompts, reserve)
        ]
        results = await self._batcher.submit(items, deadline=deadline, room=room)
        for r in results:
            if isinstance(r, BaseException):  # this request's adapter, not the batch's
                raise r
        return results

    async def process_batch(self, batch: list[_ScoreItem]) -> list[list[float] | BaseException]:
        need: list[tuple[Any, ...]] = []
        for it in batch:
            key = (it.prior_prompt, it.labels, it.adapter)
            if (it.adapter or key not in self._priors) and key not in need:
                need.append(key)
        rows = [(it.prompt, it.labels, it.adapter) for it in batch] + need
        scores = await self.core.call(
            protocol.SCORE,
            [list(p) for p, _, _ in rows],
            [[list(c) for c in conts] for _, conts, _ in rows],
            self.name,
            [a for _, _, a in rows],
        )
        priors = {}
        for key, sc in zip(need, scores[len(batch) :], strict=True):
            priors[key] = sc
            if not key[2] and not isinstance(sc, str):
                self._priors[key] = sc
                if len(self._priors) > self._PRIOR_CACHE_SIZE:
                    self._priors.popitem(last=False)
        out: list[list[float] | BaseException] = []
        for it, sc in zip(batch, scores, strict=False):
            key = (it.prior_prompt, it.labels, it.adapter)
            prior = priors[key] if key in priors else self._priors[key]
            if isinstance(sc, str):
                out.append(adapters.row_error(self, sc, it.adapter))
            elif isinstance(prior, str):
                out.append(adapters.row_error(self, prior, it.adapter))
            else:
                out.append(_softmax([a - b for a, b in zip(sc, prior, strict=True)]))
        return out


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    total = sum(e)
    return [v / total for v in e]


@register
class InstructClassifyEngine(_LabelScorer, ClassifyEngine):
    @property
    def labels(self) -> list[str]:
        return list(self.settings.labels)

    async def classify(
        self,
        texts: list[str],
        *,
        top_k: int | None,
        candidate_labels: list[str],
        deadline: float | None,
        adapter: str = "",
    ) -> list[list[LabelScore]]:
        adapter = adapters.resolve(self.settings, adapter)
        labels = list(candidate_labels or self.settings.labels)
        if len(labels) < 2:
            raise InvalidArgument(
                f"candidate_labels: model {self.name!r} has no default labels; give at least two "
                "candidate_labels"
                if not labels
                else "candidate_labels: give at least two labels to choose between"
            )
        k = len(labels) if not top_k else min(top_k, len(labels))
        out = []
        with self._batcher.reserve(len(texts)) as room:  # a full queue refuses before templating
            *prompts, prior = await self.chat_prompts(
                CLASSIFY_SYSTEM, [classify_prompt(t, labels) for t in [*texts, CONTENT_FREE]]
            )
            scores = await self.label_probs(prompts, prior, labels, deadline, room, adapter)
        for probs in scores:
            ranked = sorted(zip(labels, probs), key=lambda x: -x[1])[:k]
            out.append([LabelScore(label, float(p)) for label, p in ranked])
        return out


@register
class InstructSentimentEngine(_LabelScorer, SentimentEngine):
    async def sentiment(
        self, texts: list[str], *, deadline: float | None, adapter: str = ""
    ) -> list[SentimentResult]:
        adapter = adapters.resolve(self.settings, adapter)
        with self._batcher.reserve(len(texts)) as room:  # a full queue refuses before templating
            *prompts, prior = await self.chat_prompts(
                SENTIMENT_SYSTEM, [sentiment_prompt(t) for t in [*texts, CONTENT_FREE]]
            )
            scores = await self.label_probs(prompts, prior, SENTIMENT_LABELS, deadline, room, adapter)
        out = []
        for probs in scores:
            best = max(range(len(probs)), key=lambda i: probs[i])
            label = SENTIMENT_LABELS[best]
            out.append(SentimentResult(label, float(probs[best]), label))
        return out


# translation ----------------------------------------------------------------------------------
_CHATTER = re.compile(
    r"^\s*(?:(?:here is |here's )?(?:the )?(?:\w+ )?translation(?: in \w+)?\s*(?:is)?\s*[:\-]\s*)",
    re.IGNORECASE,
)
_QUOTES = "\"'«»“”„‘’`"


def clean_translation(text: str, multiline: bool) -> str:
    """The translation alone: no "Translation:" lead-in, no wrapping quotes, one line if the source was."""
    text = text.strip()
    text = _CHATTER.sub("", text, count=1).strip()
    if not multiline:
        text = text.split("\n", 1)[0].strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


@register
class InstructTranslateEngine(_InstructEngine, GenerationFront, TranslateEngine):
    def __init__(self, settings: ModelSettings, loaded: LoadedModel, metrics: Metrics, core: Any):
        super().__init__(settings, loaded, metrics, core)
        tok = loaded.tokenizer
        self._stop_ids = tuple(
            sorted(
                {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int)}
                - {tok.unk_token_id}
            )
        )
        # Tokens that start a new line end a one-line translation: stop decoding there.
        self._newline_ids = tuple(
            sorted(i for t, i in tok.get_vocab().items() if "\n" in tok.convert_tokens_to_string([t]))
        )

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
        target = self._language("target_lang", target_lang)
        if target is None:
            raise InvalidArgument(
                f"target_lang is required for model {self.name!r} (codes: {', '.join(sorted(LANGUAGE_NAMES))})"
            )
        source = self._language("source_lang", source_lang)
        n = self.resolve_max_new_tokens(max_new_tokens)
        with self.reserve(len(texts)) as room:  # a full engine refuses before templating
            prompts = self.checked(
                await self.chat_prompts(
                    TRANSLATE_SYSTEM, [translate_prompt(t, source, target) for t in texts]
                ),
                n,
            )
            self.check_context(prompts, n)
            # Through the request's adapter (or the model's default_adapter), as generate runs.
            greedy = SamplingParams(max_new_tokens=n, adapter=adapters.resolve(self.settings, adapter))
            # A multi-line source must not stop at a newline: its rows get the end-of-turn stops only.
            one_line = [i for i, t in enumerate(texts) if "\n" not in t.strip()]
            multi = [i for i, t in enumerate(texts) if "\n" in t.strip()]
            groups = [
                (idx, stops, multiline)
                for idx, stops, multiline in (
                    (one_line, self._stop_ids + self._newline_ids, False),
                    (multi, self._stop_ids, True),
                )
                if idx
            ]
            results = await asyncio.gather(
                *(
                    self.run_all([prompts[i] for i in idx], greedy, n, deadline, stops, room=room)
                    for idx, stops, _ in groups
                )
            )
        out = [""] * len(texts)
        for (idx, _, multiline), gens in zip(groups, results, strict=True):
            for i, g in zip(idx, gens, strict=True):
                out[i] = clean_translation(g.text, multiline)
        return [Translation(t) for t in out]

    @staticmethod
    def _language(field: str, code: str | None) -> str | None:
        if not code:
            return None
        name = LANGUAGE_NAMES.get(code.lower())
        if name is None:
            if code.lower() in (n.lower() for n in LANGUAGE_NAMES.values()):
                return code.capitalize()
            raise InvalidArgument(
                f"{field}: unknown language code {code!r}; known: {', '.join(sorted(LANGUAGE_NAMES))}"
            )
        return name
