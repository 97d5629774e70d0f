"""Classify, sentiment and translate with an instruction-tuned causal LM (backend: instruct).

Classification and sentiment do not generate: they score each candidate label as the
assistant's answer to a chat-template prompt. A label's score is the log-likelihood of its
tokens (and the end-of-turn token, so "sport" and "sports" differ), minus the same
log-likelihood after a content-free prompt (text "N/A") - the model's prior for that label,
which otherwise favours short or frequent labels. A softmax over the labels turns the scores
into probabilities that sum to 1. The prompt is run once per text and its KV cache shared by
all of that text's labels. Everything is deterministic.

Translation prompts for the translation only and decodes greedily, stopping at the end of the
turn or of the first line, and strips the chatter small models add (quotes, "Translation:").
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgument
from ..loading import LoadedModel
from ..metrics import Metrics
from ..settings import ModelSettings
from ..types import LabelScore, SentimentResult, Translation
from .base import BatchedEngine, ClassifyEngine, SentimentEngine, TranslateEngine, register
from .translate import LANGUAGE_NAMES

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


class _InstructEngine(BatchedEngine):
    """Shared part: chat-template prompts on an AutoModelForCausalLM, one batcher."""

    backend = "instruct"

    def __init__(self, settings: ModelSettings, loaded: LoadedModel, metrics: Metrics):
        super().__init__(settings, loaded, metrics)
        tok = loaded.tokenizer
        self._pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)

    @classmethod
    def auto_class(cls) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def chat_ids(self, system: str, user: str) -> list[int]:
        """Token ids of a prompt that ends where the assistant's answer begins."""
        tok = self.loaded.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        # No chat template (a base model): a plain instruction format.
        return list(tok(f"{system}\n\n{user}\n\nAnswer: ")["input_ids"])

    def checked(self, prompts: list[list[int]], reserve: int = 0) -> list[list[int]]:
        limit = self.max_input_tokens - reserve
        for i, p in enumerate(prompts):
            if len(p) > limit:
                raise InvalidArgument(
                    f"texts[{i}] makes a {len(p)}-token prompt; model {self.name!r} accepts at "
                    f"most {limit} prompt tokens"
                )
        return prompts

    def left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s) :] = torch.tensor(s)
                mask[i, width - len(s) :] = 1
        return ids.to(self.loaded.device), mask.to(self.loaded.device)


# label scoring --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ScoreItem:
    prompt: tuple[int, ...]
    prior_prompt: tuple[int, ...]  # the same prompt with a content-free text
    labels: tuple[tuple[int, ...], ...]  # each label's answer tokens, end-of-turn included


class _LabelScorer(_InstructEngine):
    """Probabilities over candidate labels from the label answers' calibrated likelihoods."""

    _PRIOR_CACHE_SIZE = 256

    def __init__(self, settings: ModelSettings, loaded: LoadedModel, metrics: Metrics):
        super().__init__(settings, loaded, metrics)
        # Priors depend only on (prompt, labels): computed once, reused by later batches.
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
    ) -> list[list[float]]:
        lids = self.label_ids(labels)
        reserve = max(len(x) for x in lids)
        items = [_ScoreItem(tuple(p), tuple(prior_prompt), lids) for p in self.checked(prompts, reserve)]
        return await self._batcher.submit(items, deadline=deadline)

    @torch.inference_mode()
    def run_batch(self, batch: list[_ScoreItem]) -> list[list[float]]:
        need = []
        for it in batch:
            key = (it.prior_prompt, it.labels)
            if key not in self._priors and key not in need:
                need.append(key)
        rows = [(it.prompt, it.labels) for it in batch] + need
        scores = self._loglik(rows)
        for key, s in zip(need, scores[len(batch) :]):
            self._priors[key] = s
            if len(self._priors) > self._PRIOR_CACHE_SIZE:
                self._priors.popitem(last=False)
        out = []
        for it, s in zip(batch, scores):
            prior = self._priors[(it.prior_prompt, it.labels)]
            cal = torch.tensor(s) - torch.tensor(prior)
            out.append(torch.softmax(cal, dim=0).tolist())
        return out

    def _loglik(self, rows: list[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]]) -> list[list[float]]:
        """Per row, the summed log-probability of each continuation after the prompt.

        One forward pass over the left-padded prompts fills a KV cache; it is then repeated
        once per (prompt, continuation) pair and one more pass scores all continuations.
        """
        model = self.loaded.model
        dev = self.loaded.device
        ids, mask = self.left_pad([list(p) for p, _ in rows])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # next-token dist per prompt
        pairs = [(r, c) for r, (_, conts) in enumerate(rows) for c in conts]
        index = torch.tensor([r for r, _ in pairs], device=dev)
        width = max(len(c) for _, c in pairs)
        totals = first[index, torch.tensor([c[0] for _, c in pairs], device=dev)]
        if width > 1:
            # transformers 5.x renames past_key_values to cache; accept either.
            name = "cache" if "cache" in out else "past_key_values"
            cache = out[name]
            cache.reorder_cache(index)  # one cache row per (prompt, continuation) pair
            cont = torch.full((len(pairs), width - 1), self._pad_id, dtype=torch.long)
            for i, (_, c) in enumerate(pairs):
                cont[i, : len(c) - 1] = torch.tensor(c[:-1])
            cont = cont.to(dev)
            # Right padding after the continuation cannot affect its own (earlier) positions.
            cmask = torch.cat([mask[index], torch.ones_like(cont)], dim=1)
            cpos = pos[index, -1:] + 1 + torch.arange(width - 1, device=dev)
            logp = torch.log_softmax(
                model(
                    input_ids=cont, attention_mask=cmask, position_ids=cpos, **{name: cache}
                ).logits.float(),
                dim=-1,
            )
            target = torch.zeros((len(pairs), width - 1), dtype=torch.long, device=dev)
            valid = torch.zeros((len(pairs), width - 1), dtype=torch.bool, device=dev)
            for i, (_, c) in enumerate(pairs):
                target[i, : len(c) - 1] = torch.tensor(c[1:])
                valid[i, : len(c) - 1] = True
            tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            totals = totals + (tok_lp * valid).sum(dim=1)
        flat = totals.cpu().tolist()
        result, k = [], 0
        for _, conts in rows:
            result.append(flat[k : k + len(conts)])
            k += len(conts)
        return result


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
    ) -> list[list[LabelScore]]:
        labels = list(candidate_labels or self.settings.labels)
        if len(labels) < 2:
            raise InvalidArgument(
                f"candidate_labels: model {self.name!r} has no default labels; give at least two "
                "candidate_labels"
                if not labels
                else "candidate_labels: give at least two labels to choose between"
            )
        prompts = [self.chat_ids(CLASSIFY_SYSTEM, classify_prompt(t, labels)) for t in texts]
        prior = self.chat_ids(CLASSIFY_SYSTEM, classify_prompt(CONTENT_FREE, labels))
        k = len(labels) if not top_k else min(top_k, len(labels))
        out = []
        for probs in await self.label_probs(prompts, prior, labels, deadline):
            ranked = sorted(zip(labels, probs), key=lambda x: -x[1])[:k]
            out.append([LabelScore(label, float(p)) for label, p in ranked])
        return out


@register
class InstructSentimentEngine(_LabelScorer, SentimentEngine):
    async def sentiment(self, texts: list[str], *, deadline: float | None) -> list[SentimentResult]:
        prompts = [self.chat_ids(SENTIMENT_SYSTEM, sentiment_prompt(t)) for t in texts]
        prior = self.chat_ids(SENTIMENT_SYSTEM, sentiment_prompt(CONTENT_FREE))
        out = []
        for probs in await self.label_probs(prompts, prior, SENTIMENT_LABELS, deadline):
            best = max(range(len(probs)), key=lambda i: probs[i])
            label = SENTIMENT_LABELS[best]
            out.append(SentimentResult(label, float(probs[best]), label))
        return out


# translation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TranslateItem:
    prompt: tuple[int, ...]
    max_new_tokens: int
    multiline: bool  # the source has several lines: do not stop at the first newline


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
class InstructTranslateEngine(_InstructEngine, TranslateEngine):
    def __init__(self, settings: ModelSettings, loaded: LoadedModel, metrics: Metrics):
        super().__init__(settings, loaded, metrics)
        tok = loaded.tokenizer
        self._stop_ids = sorted(
            {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int)}
            - {tok.unk_token_id}
        )
        # Tokens that start a new line end a one-line translation: stop decoding there.
        self._newline_ids = sorted(
            i for t, i in tok.get_vocab().items() if "\n" in tok.convert_tokens_to_string([t])
        )

    async def translate(
        self,
        texts: list[str],
        *,
        source_lang: str | None,
        target_lang: str | None,
        max_new_tokens: int | None,
        deadline: float | None,
    ) -> list[Translation]:
        target = self._language("target_lang", target_lang)
        if target is None:
            raise InvalidArgument(
                f"target_lang is required for model {self.name!r} (codes: {', '.join(sorted(LANGUAGE_NAMES))})"
            )
        source = self._language("source_lang", source_lang)
        n = self.resolve_max_new_tokens(max_new_tokens)
        prompts = self.checked(
            [self.chat_ids(TRANSLATE_SYSTEM, translate_prompt(t, source, target)) for t in texts], n
        )
        items = [_TranslateItem(tuple(p), n, "\n" in t.strip()) for p, t in zip(prompts, texts)]
        return [Translation(t) for t in await self._batcher.submit(items, deadline=deadline)]

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

    @torch.inference_mode()
    def run_batch(self, batch: list[_TranslateItem]) -> list[str]:
        lm = self.loaded
        out: list[str] = [""] * len(batch)
        # A multi-line source must not stop at a newline: decode those apart.
        for multiline in (False, True):
            idx = [i for i, it in enumerate(batch) if it.multiline == multiline]
            if not idx:
                continue
            ids, mask = self.left_pad([list(batch[i].prompt) for i in idx])
            n = max(batch[i].max_new_tokens for i in idx)
            stops = self._stop_ids + ([] if multiline else self._newline_ids)
            seqs = lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=self._pad_id,
            )[:, ids.shape[1] :]
            generated = 0
            for row, i in enumerate(idx):
                toks = seqs[row, : batch[i].max_new_tokens].tolist()
                cut = next((k for k, t in enumerate(toks) if t in stops), len(toks))
                generated += cut
                text = lm.tokenizer.decode(toks[:cut], skip_special_tokens=True)
                out[i] = clean_translation(text, multiline)
            self.metrics.generated_tokens.labels(self.name, self.task.value).inc(generated)
        return out
