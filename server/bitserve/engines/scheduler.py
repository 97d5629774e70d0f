"""Continuous batching for causal LMs: a TGI-style `Batch` and an iteration-level scheduler.

The running batch holds every decoding sequence in one left-padded KV cache. Between decode
steps the scheduler admits waiting requests: their prompts are prefilled together as a new
`Batch` (which yields their first token) and `Batch.concatenate` joins it to the running one,
padding the shorter past on the left. A sequence that finishes, is cancelled or runs past its
deadline leaves at the next step through `Batch.filter`, which also drops cache columns that
no remaining row uses. Position ids come from each row's own count of real tokens, so a row's
logits do not depend on how much padding its neighbours force on it.

All forward passes run in one worker thread per model; results go back to the asyncio loop
with `loop.call_soon_threadsafe`, one call per step. Nothing here knows about gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DeadlineExceeded, ResourceExhausted, Unavailable
from ..types import FinishReason, Generation, SamplingParams, StreamChunk, TokenLogprob

log = logging.getLogger(__name__)

Emit = Callable[[Any], None]  # called on the event loop with a StreamChunk, Generation or error

# Rough cost of one streamed message to the server (conversion, gRPC write, task switches,
# waking the loop and handing it the GIL: ~0.25 ms measured on 2 CPU cores), and the share of
# the loop's time that streaming may take; they set the token grouping (64 streams: a message
# every ~60 ms). A stream sends at most every STREAM_MIN_GROUP_S even alone: on a small fast
# model a message per token (~1 ms apart) cost a single stream 30% of its latency, 2 ms groups
# cost 5-10%; no reader sees 2 ms.
STREAM_MESSAGE_COST_S = 240e-6
STREAM_LOOP_SHARE = 0.25
STREAM_MIN_GROUP_S = 0.002
# A nearly full batch admits newcomers once 1/JOIN_GROUP_DIVISOR of its slots are free, or
# after MAX_DEFER_STEPS decode steps (TGI's waiting_served_ratio / max_waiting_tokens idea).
JOIN_GROUP_DIVISOR = 4
MAX_DEFER_STEPS = 16
# The fixed cost of one forward pass, in padded prompt tokens: admitted prompts are prefilled
# in passes of similar lengths when the padding saved is worth more passes. On CPU a pass costs
# ~1 ms of Python, ~150 padded tokens of a small model; on a GPU the launch overhead buys
# thousands (rough: it only has to keep a GPU from splitting where padding is cheap).
PREFILL_PASS_TOKENS = {"cpu": 256}
PREFILL_PASS_TOKENS_DEFAULT = 8192


# incremental detokenization --------------------------------------------------------------------
class _OffsetDecoder:
    """Text of a growing token list, piece by piece (TGI's prefix/read offsets).

    A piece is released only when it decodes cleanly, so a multi-byte character split across
    tokens is never emitted half-way; pieces concatenate to the decode of all tokens.
    """

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


class _StreamDecoder:
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
        return lambda: _StreamDecoder(tokenizer, stream_cls)
    return lambda: _OffsetDecoder(tokenizer)


def _stop_hold(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


# one request -----------------------------------------------------------------------------------
class Sequence_:
    """The generation state of one prompt. Mutated only by the worker thread, except
    `cancelled`, which the event loop sets when the caller goes away."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        *,
        deadline: float | None,
        emit: Emit,
        stream: bool,
    ):
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.deadline = deadline
        self.emit = emit
        self.stream = stream
        self.arrived = time.monotonic()
        self.cancelled = False
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish: FinishReason | None = None
        self.last_token_at = 0.0
        # Text is built as we go only where someone needs it early: streams and stop strings.
        self.incremental = stream or bool(params.stop)
        self.decoder: Any = None
        self.text = ""  # with `incremental`: text so far (after any stop cut)
        self.sent = 0  # with `stream`: characters of `text` already handed out
        self.unsent_text = ""  # with `stream`: handed out but not yet sent (grouping)
        self.unsent_tokens: list[TokenLogprob] = []
        self.last_sent = 0.0
        self.rng = random.Random(params.seed if params.seed is not None else random.getrandbits(64))
        self.penalty = params.repetition_penalty if params.repetition_penalty != 1.0 else None
        self.stop_max = max((len(s) for s in params.stop), default=0)


@dataclass
class _Plan:
    """Per-batch sampling layout, recomputed only when the batch changes."""

    plain_greedy: bool  # argmax of raw logits for every row
    sample_rows: list[int]
    temps: torch.Tensor | None
    top_k: torch.Tensor | None  # 0: off
    top_p: torch.Tensor | None  # 1: off
    penalties: torch.Tensor | None  # [B, 1]
    logprobs: bool
    streams: int  # rows that stream


class Batch:
    """Sequences decoding together: one left-padded KV cache and the tensors a step needs."""

    def __init__(
        self,
        seqs: list[Sequence_],
        cache: Any,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        next_ids: torch.Tensor,
        seen: torch.Tensor | None,
    ):
        self.seqs = seqs
        self.cache = cache  # transformers DynamicCache; rows follow `seqs`
        self.mask = mask  # [B, past] bool, True for real tokens; None when no row is padded
        self.positions = positions  # [B] position id of the next input token
        self.next_ids = next_ids  # [B] the token each row feeds next
        self.seen = seen  # [B, V] bool, tokens seen per row (repetition penalty), or None
        self._plan: _Plan | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def past(self) -> int:
        return int(self.cache.layers[0].keys.shape[-2]) if self.cache.layers else 0

    def plan(self) -> _Plan:
        if self._plan is None:
            self._plan = _make_plan(self.seqs, self.next_ids.device)
        return self._plan

    def filter(self, keep: list[int]) -> Batch | None:
        """Only rows `keep`; cache columns that no kept row uses are dropped."""
        if not keep:
            return None
        if len(keep) == len(self.seqs):
            return self
        dev = self.next_ids.device
        idx = torch.tensor(keep, device=dev)
        mask = self.mask.index_select(0, idx) if self.mask is not None else None
        trim = 0
        if mask is not None:
            used = mask.any(0)
            trim = int(used.int().argmax())  # first column some row uses
            mask = mask[:, trim:]
            if bool(mask.all()):
                mask = None
        for layer in self.cache.layers:
            select = getattr(layer, "select_rows", None)
            if select is not None and trim == 0:
                select(idx)
            else:
                layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
                layer.values = layer.values.index_select(0, idx)[:, :, trim:]
        return Batch(
            [self.seqs[i] for i in keep],
            self.cache,
            mask,
            self.positions.index_select(0, idx),
            self.next_ids.index_select(0, idx),
            self.seen.index_select(0, idx) if self.seen is not None else None,
        )

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """One batch of all rows; shorter pasts are padded on the left."""
        batches = [b for b in batches if b is not None and len(b)]
        if len(batches) == 1:
            return batches[0]
        pasts = [b.past for b in batches]
        past = max(pasts)
        first = batches[0]
        dev = first.next_ids.device
        for li, layer in enumerate(first.cache.layers):
            ks, vs = [], []
            for b, p in zip(batches, pasts, strict=True):
                k, v = b.cache.layers[li].keys, b.cache.layers[li].values
                if p < past:
                    k = torch.nn.functional.pad(k, (0, 0, past - p, 0))
                    v = torch.nn.functional.pad(v, (0, 0, past - p, 0))
                ks.append(k)
                vs.append(v)
            layer.keys = torch.cat(ks, 0)
            layer.values = torch.cat(vs, 0)
        if all(b.mask is None for b in batches) and all(p == past for p in pasts):
            mask = None
        else:
            masks = []
            for b, p in zip(batches, pasts, strict=True):
                m = b.mask if b.mask is not None else torch.ones(len(b), p, dtype=torch.bool, device=dev)
                if p < past:
                    m = torch.nn.functional.pad(m, (past - p, 0))
                masks.append(m)
            mask = torch.cat(masks, 0)
        seen = None
        widths = [b.seen.shape[1] for b in batches if b.seen is not None]
        if widths:
            seen = torch.cat(
                [b.seen if b.seen is not None else _seen_of(b.seqs, widths[0], dev) for b in batches]
            )
        return Batch(
            [s for b in batches for s in b.seqs],
            first.cache,
            mask,
            torch.cat([b.positions for b in batches]),
            torch.cat([b.next_ids for b in batches]),
            seen,
        )


def _seen_of(seqs: list[Sequence_], vocab: int, device: torch.device) -> torch.Tensor:
    seen = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        ids = [t for t in s.prompt_ids + s.token_ids if t < vocab]
        if ids:
            seen[i, torch.tensor(ids, device=device)] = True
    return seen


def _make_plan(seqs: list[Sequence_], dev: torch.device) -> _Plan:
    sample_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    penalized = any(s.penalty is not None for s in seqs)
    logprobs = any(s.params.logprobs for s in seqs)
    temps = top_k = top_p = None
    if sample_rows:
        ps = [seqs[i].params for i in sample_rows]
        temps = torch.tensor([[p.temperature] for p in ps], device=dev)
        if any(p.top_k > 0 for p in ps):
            top_k = torch.tensor([p.top_k for p in ps], device=dev)
        if any(p.top_p < 1.0 for p in ps):
            top_p = torch.tensor([[p.top_p] for p in ps], device=dev)
    penalties = torch.tensor([[s.penalty or 1.0] for s in seqs], device=dev) if penalized else None
    return _Plan(
        plain_greedy=not sample_rows and not penalized,
        sample_rows=sample_rows,
        temps=temps,
        top_k=top_k,
        top_p=top_p,
        penalties=penalties,
        logprobs=logprobs,
        streams=sum(s.stream for s in seqs),
    )


def select_tokens(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, list[int], list[float] | None]:
    """Next token per row, each by its own sampling parameters (transformers' processor order:
    repetition penalty, temperature, top-k, top-p). Logprobs are of the model's distribution."""
    plan = batch.plan()
    logits = logits.float()
    lps = None
    if plan.logprobs:
        lsm = torch.log_softmax(logits, -1)
    if plan.plain_greedy:
        ids = logits.argmax(-1)
    else:
        x = logits
        if plan.penalties is not None and batch.seen is not None:
            pen = torch.where(x < 0, x * plan.penalties, x / plan.penalties)
            x = torch.where(batch.seen[:, : x.shape[1]], pen, x)
        ids = x.argmax(-1)
        if plan.sample_rows and plan.temps is not None:
            rows = torch.tensor(plan.sample_rows, device=x.device)
            xs = x.index_select(0, rows) / plan.temps
            if plan.top_k is not None:
                k = plan.top_k.clamp(max=xs.shape[1])
                kmax = int(k.max())
                vals = torch.topk(xs, kmax, dim=-1).values
                kth = vals.gather(1, (torch.where(k > 0, k, kmax) - 1)[:, None])
                kth = torch.where((k > 0)[:, None], kth, torch.full_like(kth, -float("inf")))
                xs = xs.masked_fill(xs < kth, -float("inf"))
            if plan.top_p is not None:
                sorted_x, order = torch.sort(xs, descending=False)
                cum = sorted_x.softmax(-1).cumsum(-1)
                remove = cum <= (1 - plan.top_p)
                remove[:, -1] = False
                xs = xs.masked_fill(remove.scatter(1, order, remove), -float("inf"))
            cdf = xs.softmax(-1).cumsum(-1)
            u = (
                torch.tensor([[batch.seqs[i].rng.random()] for i in plan.sample_rows], device=x.device)
                * cdf[:, -1:]
            )
            picked = torch.searchsorted(cdf, u).clamp(max=xs.shape[1] - 1).squeeze(1)
            ids = ids.index_copy(0, rows, picked)
    if plan.logprobs:
        lps = lsm.gather(1, ids[:, None]).squeeze(1).tolist()
    return ids, ids.tolist(), lps


def length_groups(seqs: list[Sequence_], pass_tokens: int) -> list[list[Sequence_]]:
    """`seqs` split into prefill passes of similar prompt lengths, minimising padded tokens
    plus `pass_tokens` per pass (a pass pads every prompt to its longest one: prompts of
    4..51 tokens in one pass are two thirds padding)."""
    lengths = [len(s.prompt_ids) for s in seqs]
    if len(seqs) < 2 or len(seqs) * max(lengths) - sum(lengths) <= pass_tokens:
        return [seqs]
    order = sorted(range(len(seqs)), key=lengths.__getitem__)
    sizes = [lengths[i] for i in order]
    # best[j]: cost of the j shortest prompts; a pass takes sorted prompts i..j-1.
    best = [0] + [0] * len(order)
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        longest = sizes[j - 1]
        best[j], cut[j] = min((best[i] + pass_tokens + (j - i) * longest, i) for i in range(j))
    groups: list[list[Sequence_]] = []
    j = len(order)
    while j > 0:
        groups.append([seqs[k] for k in order[cut[j] : j]])
        j = cut[j]
    return groups[::-1]


# the model side ------------------------------------------------------------------------------
def _DynamicLayer() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


_GROW_LAYER: type | None = None


def _grow_layer_class() -> type:
    """transformers' `DynamicLayer` with headroom: `update` writes the new step into spare
    columns instead of concatenating (which copies the whole cache, every layer, every step).
    `keys`/`values` stay the live `[B, H, past, D]` views, so `Batch.filter`/`concatenate` and
    the attention code see an ordinary cache; they replace them with exact-size tensors, and
    the next update allocates headroom again."""
    global _GROW_LAYER
    if _GROW_LAYER is None:

        class _GrowingLayer(_DynamicLayer()):  # type: ignore[misc]
            keys: torch.Tensor
            values: torch.Tensor
            _kbuf: torch.Tensor | None = None
            _vbuf: torch.Tensor | None = None

            def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
                keys, values = getattr(self, "keys", None), getattr(self, "values", None)
                if keys is None or values is None or not keys.numel():
                    # The first update (the prefill) is transformers' own, whatever its
                    # initialisation looks like in this version; the next one adds headroom.
                    return super().update(key_states, value_states, *args, **kwargs)
                n = keys.shape[-2]
                end = n + key_states.shape[-2]
                kb, vb = self._kbuf, self._vbuf
                if (
                    kb is None
                    or vb is None
                    or end > kb.shape[-2]
                    or kb.shape[:2] != key_states.shape[:2]
                    or keys.data_ptr() != kb.data_ptr()
                    or values.data_ptr() != vb.data_ptr()
                ):
                    # The tensors were replaced (prefill, filter, concatenate) or the room is
                    # used up: new buffers with headroom, the past copied once.
                    cap = end + max(64, end // 4)
                    b, h, _, d = key_states.shape
                    kb = key_states.new_empty(b, h, cap, d)
                    vb = value_states.new_empty(b, h, cap, value_states.shape[-1])
                    if n:
                        kb[:, :, :n].copy_(keys)
                        vb[:, :, :n].copy_(values)
                    self._kbuf, self._vbuf = kb, vb
                kb[:, :, n:end].copy_(key_states)
                vb[:, :, n:end].copy_(value_states)
                self.keys, self.values = kb[:, :, :end], vb[:, :, :end]
                return self.keys, self.values

            def select_rows(self, idx: torch.Tensor) -> None:
                """Keep rows `idx` with their headroom: one copy, and the next update still
                writes in place (a plain index_select would make it copy the cache again)."""
                kb, vb, n = self._kbuf, self._vbuf, self.keys.shape[-2]
                if kb is None or vb is None or self.keys.data_ptr() != kb.data_ptr():
                    self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
                    return
                self._kbuf, self._vbuf = kb.index_select(0, idx), vb.index_select(0, idx)
                self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

        _GROW_LAYER = _GrowingLayer
    return _GROW_LAYER


class CausalLM:
    """Prefill and decode for one loaded causal LM; owns no scheduling."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device):
        self.model = model
        self.device = device
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        eos: set[int] = set()
        gc = getattr(model, "generation_config", None)
        for v in (getattr(gc, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(v, int):
                eos.add(v)
            elif isinstance(v, (list, tuple)):
                eos.update(int(x) for x in v)
        self.eos = eos
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        # transformers renamed `past_key_values` to `cache` (5.2x); speak whichever it knows.
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # A decode step's mask is only the padding mask: with SDPA we hand the model the 4-D
        # [B, 1, 1, past] view of ours instead of letting it rebuild one from 2-D every step
        # (~10% of a step on a small model). Not for sliding-window or other attention kinds,
        # whose masks differ per layer or in format.
        cfg = model.config
        self._mask_4d = getattr(cfg, "_attn_implementation", None) == "sdpa" and not any(
            getattr(cfg, k, None) for k in ("sliding_window", "attention_chunk_size")
        )

    def _cache(self) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in cache.layers:
            # Only plain full-attention layers grow in place; sliding-window (or other) layers
            # keep their own update rule.
            if type(layer) is _DynamicLayer():
                layer.__class__ = _grow_layer_class()
        return cache

    def prefill(self, seqs: list[Sequence_]) -> tuple[Batch, torch.Tensor]:
        """A batch of `seqs` with their prompts in the cache, and the logits of each prompt's
        last position."""
        dev = self.device
        longest = max(len(s.prompt_ids) for s in seqs)
        rows = [[self.pad_id] * (longest - len(s.prompt_ids)) + s.prompt_ids for s in seqs]
        input_ids = torch.tensor(rows, device=dev)
        lengths = torch.tensor([len(s.prompt_ids) for s in seqs], device=dev)
        mask = None
        if any(len(s.prompt_ids) != longest for s in seqs):
            mask = torch.arange(longest, device=dev)[None, :] >= (longest - lengths)[:, None]
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(longest, device=dev).expand(len(seqs), -1)
        cache = self._cache()
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        seen = None
        if any(s.penalty is not None for s in seqs):
            seen = _seen_of(seqs, self.vocab, dev)
        batch = Batch(seqs, cache, mask, lengths, input_ids[:, -1], seen)
        return batch, out.logits[:, -1, :]

    def decode(self, batch: Batch) -> torch.Tensor:
        """One step for every row: logits of the next token, [B, V]."""
        mask = batch.mask
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(batch), 1)], 1)
        out = self.model(
            input_ids=batch.next_ids[:, None],
            attention_mask=mask[:, None, None, :] if mask is not None and self._mask_4d else mask,
            position_ids=batch.positions[:, None],
            use_cache=True,
            **{self._cache_kw: batch.cache},
        )
        batch.mask = mask
        batch.positions = batch.positions + 1
        return out.logits[:, -1, :]


# the scheduler -------------------------------------------------------------------------------
@dataclass
class SchedulerStats:
    steps: int = 0
    prefills: int = 0
    max_running: int = 0
    batch_sizes: collections.Counter[int] | None = None


class Scheduler:
    """Admits requests into the running batch between decode steps; one worker thread."""

    def __init__(
        self,
        lm: CausalLM,
        tokenizer: Any,
        *,
        max_concurrent: int,
        prefill_token_budget: int,
        max_waiting_ms: float,
        max_queue_size: int,
        name: str = "generate",
        observer: Any = None,
    ):
        self.lm = lm
        self.max_concurrent = max_concurrent
        self.prefill_budget = prefill_token_budget
        self.max_waiting = max_waiting_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.name = name
        self.obs = observer or _NoObserver()
        # Decoding happens in the worker while the loop may be encoding: a fast tokenizer
        # object must not be used from two threads at once ("Already borrowed"), so the worker
        # decodes with its own copy.
        self._decode_tok = copy.deepcopy(tokenizer)
        self._new_decoder = decoder_factory(self._decode_tok)
        self._waiting: collections.deque[Sequence_] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._done: asyncio.Event | None = None
        self.running = 0
        self._yield_gil = lm.device.type == "cuda"
        self._deferred = 0  # decode steps a waiting request was held back (see _should_join)
        self.batch: Batch | None = None  # the running batch, for introspection only
        self.stats = SchedulerStats(batch_sizes=collections.Counter())

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"generate-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Refuse new requests; finish every accepted one; end the worker."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None and self._done is not None:
            await self._done.wait()
            self._thread = None

    @property
    def depth(self) -> int:
        return len(self._waiting)

    # requests (event loop) -------------------------------------------------------------------
    def submit(self, seqs: list[Sequence_]) -> None:
        with self._cv:
            if self._closing or self._thread is None:
                raise Unavailable(f"model {self.name!r} is not serving (shutting down or not started)")
            if len(self._waiting) + len(seqs) > self.max_queue_size:
                raise ResourceExhausted(
                    f"model {self.name!r} generation queue is full ({len(self._waiting)} waiting, "
                    f"limit {self.max_queue_size}); retry later"
                )
            self._waiting.extend(seqs)
            self.obs.queue_depth(len(self._waiting))
            self._cv.notify()

    # worker thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._serve()
        except BaseException:  # pragma: no cover - _serve handles model errors itself
            log.exception("generation worker for %s died", self.name)
        finally:
            with self._cv:
                self._closing = True
                left = list(self._waiting)
                self._waiting.clear()
            if left:
                self._send([(s.emit, Unavailable(f"model {self.name!r} stopped")) for s in left])
            assert self._loop is not None and self._done is not None
            self._loop.call_soon_threadsafe(self._done.set)

    def _admit(self, running: int) -> list[Sequence_]:
        """Waiting sequences that fit now (slots, prefill budget); expired ones are answered."""
        out: list[Sequence_] = []
        longest = 0
        now = time.monotonic()
        while self._waiting and running + len(out) < self.max_concurrent:
            s = self._waiting[0]
            if s.cancelled:
                self._waiting.popleft()
                continue
            if s.deadline is not None and now >= s.deadline:
                self._waiting.popleft()
                self._send(
                    [(s.emit, DeadlineExceeded("deadline expired while queued; the model was not run"))]
                )
                continue
            n = max(longest, len(s.prompt_ids)) * (len(out) + 1)
            if out and n > self.prefill_budget:
                break
            longest = max(longest, len(s.prompt_ids))
            out.append(self._waiting.popleft())
        if out:
            self.obs.queue_depth(len(self._waiting))
            for s in out:
                self.obs.queue_wait(now - s.arrived)
        return out

    def _serve(self) -> None:
        batch: Batch | None = None
        while True:
            with self._cv:
                while not self._waiting and batch is None:
                    if self._closing:
                        return
                    self._cv.wait()
                if batch is None and self.max_waiting > 0 and not self._closing:
                    # Idle: let a few more arrive so that they share one prefill.
                    until = self._waiting[0].arrived + self.max_waiting
                    while len(self._waiting) < self.max_concurrent and not self._closing:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                if batch is None:
                    new = self._admit(0)
                else:
                    new = self._admit(len(batch)) if self._should_join(batch) else []
            if new:
                try:
                    joined = self._prefill(new)
                except Exception as e:
                    log.exception("prefill of %d sequences failed in %s", len(new), self.name)
                    self._send([(s.emit, e) for s in new])
                    joined = None
                if joined is not None:
                    batch = Batch.concatenate([batch, joined]) if batch is not None else joined
            if batch is None:
                self._set_running(0)
                continue
            running = batch
            try:
                self._set_running(len(running))
                batch = self._decode(running)
            except Exception as e:
                log.exception("decode step of %d sequences failed in %s", len(running), self.name)
                self._send([(s.emit, e) for s in running.seqs])
                batch = None
            if batch is None:
                self._set_running(0)
            self.batch = batch
            if self._yield_gil:
                # On CUDA the worker is almost pure Python (kernel launches hold the GIL):
                # hand the event loop (gRPC writes, new requests) a turn once per step. Not on
                # CPU, where ops release the GIL anyway and a busy loop would delay the step.
                time.sleep(0)

    def _should_join(self, batch: Batch) -> bool:
        """Whether waiting requests join the running batch now. Each join costs a prefill
        pass and a copy of the cache, paid by every running row: a nearly full batch waits
        until a few slots are free (or a few steps have passed) and admits them together -
        unless no running row is due to finish (by its max_new_tokens) before that wait
        would end, as when a wave of equal requests has just started: waiting would only
        leave the slots empty."""
        if not self._waiting:
            return False
        free = self.max_concurrent - len(batch)
        if free <= 0:
            return False
        join = free >= max(1, self.max_concurrent // JOIN_GROUP_DIVISOR) or self._deferred >= MAX_DEFER_STEPS
        if not join:
            horizon = MAX_DEFER_STEPS - self._deferred
            join = all(s.max_new_tokens - len(s.token_ids) > horizon for s in batch.seqs)
        if join:
            self._deferred = 0
            return True
        self._deferred += 1
        return False

    def _set_running(self, n: int) -> None:
        if n != self.running:
            self.running = n
            self.obs.running(n)
            self.stats.max_running = max(self.stats.max_running, n)

    def _prefill(self, seqs: list[Sequence_]) -> Batch | None:
        pass_tokens = PREFILL_PASS_TOKENS.get(self.lm.device.type, PREFILL_PASS_TOKENS_DEFAULT)
        parts = [self.lm.prefill(group) for group in length_groups(seqs, pass_tokens)]
        self.stats.prefills += len(parts)
        self.obs.prompt_tokens(sum(len(s.prompt_ids) for s in seqs))
        if len(parts) == 1:
            batch, logits = parts[0]
        else:
            # Rows (and so logits) in the order of the parts, as concatenate lays them out.
            batch = Batch.concatenate([b for b, _ in parts])
            logits = torch.cat([lg for _, lg in parts])
        return self._advance(batch, logits, first=True)

    def _decode(self, batch: Batch) -> Batch | None:
        logits = self.lm.decode(batch)
        self.stats.steps += 1
        self.stats.batch_sizes[len(batch)] += 1  # type: ignore[index]
        self.obs.step(len(batch))
        return self._advance(batch, logits, first=False)

    def _advance(self, batch: Batch, logits: torch.Tensor, *, first: bool) -> Batch | None:
        """Append one token per row; answer and drop finished, cancelled and expired rows."""
        ids_t, ids, lps = select_tokens(logits, batch)
        now = time.monotonic()
        events: list[tuple[Emit, Any]] = []
        keep: list[int] = []
        eos = self.lm.eos
        # Rows decoded together share one inter-token time: count them per distinct value.
        itl: dict[float, int] = {}
        # Every streamed message costs the event loop (and so the GIL the worker needs) tens
        # of microseconds: with many streams, tokens go out in small groups instead, keeping
        # the loop's share of a step bounded. One stream still gets every token at once.
        group_s = max(STREAM_MIN_GROUP_S, STREAM_MESSAGE_COST_S * batch.plan().streams / STREAM_LOOP_SHARE)
        ttft: list[float] = []
        for i, (s, t) in enumerate(zip(batch.seqs, ids, strict=True)):
            if s.cancelled:
                continue
            if first:
                ttft.append(now - s.arrived)
            else:
                itl[s.last_token_at] = itl.get(s.last_token_at, 0) + 1
            s.last_token_at = now
            s.token_ids.append(t)
            lp = None
            if s.params.logprobs and lps is not None:
                lp = TokenLogprob(t, self._decode_tok.decode([t]), lps[i])
                s.logprobs.append(lp)
            piece = ""
            if t in eos:
                s.finish = FinishReason.EOS
            elif s.incremental:
                piece = self._text_step(s, t)
            if s.finish is None and len(s.token_ids) >= s.max_new_tokens:
                s.finish = FinishReason.LENGTH
            if s.finish is None and s.deadline is not None and now >= s.deadline:
                events.append((s.emit, DeadlineExceeded("deadline expired during generation")))
                continue
            if s.finish is not None:
                events.append((s.emit, self._final(s, lp)))
                continue
            if s.stream:
                s.unsent_text += piece
                if lp is not None:
                    s.unsent_tokens.append(lp)
                # A message per token (or group) even when its text is held back (a partial
                # character, a possible stop string): the client sees progress, and TTFT is real.
                if now - s.last_sent >= group_s:
                    events.append((s.emit, StreamChunk(s.unsent_text, tuple(s.unsent_tokens))))
                    s.unsent_text, s.unsent_tokens, s.last_sent = "", [], now
            keep.append(i)
        self.obs.tokens(len(ids), ttft, [(now - t, n) for t, n in itl.items()])
        out = batch.filter(keep)
        if out is not None:
            if out is batch:
                out.next_ids = ids_t
            else:
                out.next_ids = ids_t.index_select(0, torch.tensor(keep, device=ids_t.device))
            if out.seen is not None:
                out.seen[torch.arange(len(out), device=out.seen.device), out.next_ids] = True
        if not first:
            # Callers see the running count that includes their leaving.
            self._set_running(len(out) if out is not None else 0)
        if events:
            self._send(events)
        return out

    def _text_step(self, s: Sequence_, token: int) -> str:
        """New streamable text of `s` after `token`; sets finish=STOP on a stop string."""
        if s.decoder is None:
            s.decoder = self._new_decoder()
        piece = s.decoder.step(token)
        if not piece:
            return ""
        start = max(0, len(s.text) - s.stop_max + 1)
        s.text += piece
        if s.params.stop:
            cut = -1
            for stop in s.params.stop:
                j = s.text.find(stop, start)
                if j >= 0 and (cut < 0 or j < cut):
                    cut = j
            if cut >= 0:
                s.text = s.text[:cut]
                s.finish = FinishReason.STOP
                return ""  # the final message carries the rest
        if not s.stream:
            return ""
        end = len(s.text) - (_stop_hold(s.text, s.params.stop) if s.params.stop else 0)
        if end <= s.sent:
            return ""
        out = s.text[s.sent : end]
        s.sent = end
        return out

    def _final(self, s: Sequence_, lp: TokenLogprob | None) -> Any:
        ids = s.token_ids[:-1] if s.finish is FinishReason.EOS else s.token_ids
        if s.incremental:
            if s.finish is not FinishReason.STOP and s.decoder is not None:
                s.text += s.decoder.flush()
            text = s.text
        else:
            text = self._decode_tok.decode(ids, skip_special_tokens=True)
        gen = Generation(
            text=text,
            generated_tokens=len(s.token_ids),
            finish_reason=s.finish or FinishReason.LENGTH,
            prompt_tokens=len(s.prompt_ids),
            logprobs=list(s.logprobs),
        )
        if s.stream:
            tokens = (*s.unsent_tokens, lp) if lp is not None else tuple(s.unsent_tokens)
            return StreamChunk(text=s.unsent_text + text[s.sent :], tokens=tokens, final=gen)
        return gen

    def _send(self, events: list[tuple[Emit, Any]]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_dispatch, events)


def _dispatch(events: list[tuple[Emit, Any]]) -> None:
    for emit, payload in events:
        try:
            emit(payload)
        except Exception:  # pragma: no cover - a consumer's bug must not stop the others
            log.exception("delivering a generation event failed")


class _NoObserver:
    def queue_depth(self, n: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def running(self, n: int) -> None: ...
    def step(self, n: int) -> None: ...
    def prompt_tokens(self, n: int) -> None: ...
    def tokens(self, n: int, ttft: list[float], itl: list[tuple[float, int]]) -> None: ...
