"""The model side of generation: prefill, one decode step, and label scoring. Owns no policy."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from bitserve.engine.sched.sequence import Sequence
from bitserve.engine.worker import attention
from bitserve.engine.worker import compiled as compiled_mod
from bitserve.engine.worker.batch import Batch, seen_of
from bitserve.engine.worker.input_batch import SlotBatch, supports
from bitserve.engine.worker.kv_cache import new_cache
from bitserve.engine.worker.lora import LoraBank, pass_index

# Label scoring copies the prompt's KV cache once per (prompt, label) row it scores; rows are
# scored in chunks so that at most this many cached prompt tokens exist at once (memory grows
# with the labels' tokens, not labels x prompt).
SCORE_CACHE_TOKENS = 4096


class CausalLM:
    """Forward passes of one loaded causal LM."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, *, max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer  # for compiling grammars against its vocabulary
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
        self.eos = frozenset(eos)
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        # transformers renamed `past_key_values` to `cache` (5.2x); speak whichever it knows.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # A decode step's mask is only the padding mask: with SDPA we hand the model the 4-D
        # [B, 1, 1, past] view of ours instead of letting it rebuild one from 2-D every step
        # (~10% of a step on a small model). Not for sliding-window or other attention kinds,
        # whose masks differ per layer or in format.
        cfg = model.config
        self._mask_4d = getattr(cfg, "_attn_implementation", None) in ("sdpa", attention.NAME) and not any(
            getattr(cfg, k, None) for k in ("sliding_window", "attention_chunk_size")
        )
        # Why the persistent batch cannot serve this model (None: it can).
        self.no_slots_reason = supports(model)
        if self.no_slots_reason is None:
            attention.use(model)  # SDPA, per run of rows of like width in a decode step
        self.max_context = max_context or int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 4096
        )
        # LoRA adapters applied per row on this base (None: this model serves none).
        self.lora: LoraBank | None = None
        # The persistent batch's compiled decode step (`compile_decode`); None: eager.
        self.compiled: compiled_mod.CompiledDecode | None = None

    def _forward(self, index: torch.Tensor | None, **kw: Any) -> Any:
        """The model on `kw`, each row through its adapter slot in `index` (None: the base)."""
        if self.lora is None:
            return self.model(**kw)
        self.lora.index = index
        try:
            return self.model(**kw)
        finally:
            self.lora.index = None

    def _rows_index(self, seqs: list[Sequence]) -> torch.Tensor | None:
        return pass_index([s.lora for s in seqs], self.device) if self.lora is not None else None

    def use_compiled(self, setting: str, quantization: str) -> str:
        """Compile the persistent batch's decode step per `setting` (auto | on | off) where the
        model allows it; says what was decided and why. Compiling happens at `warm_up`."""
        reason = self.no_slots_reason or compiled_mod.eligible(self.model, self.device, quantization)
        on, why = compiled_mod.resolve(setting, self.device, reason)
        if self.no_slots_reason is None:
            attention.use(self.model)  # compiled: SDPA over the mask's columns (attention.py)
        self.compiled = compiled_mod.CompiledDecode(self.model, self.device, self._cache_kw) if on else None
        return why

    def warm_up(self, batch: SlotBatch) -> None:
        """Compile every graph the decode step needs (CPU: one row and several; CUDA: each
        bucket up to the batch's slots) on throwaway rows, so no request pays for it."""
        if self.compiled is None:
            return
        if self.compiled.cuda:
            # A CUDA graph attends over every allocated column: no growth to reservations, and
            # no buffers at the whole budget. (The CPU's graph attends over the columns in use,
            # in the lazily mapped buffers at the whole budget: they never move.)
            batch.grow_to_reserved = False
            batch.lazy = False
        from bitserve.types import GenerationRequest, SamplingParams

        def rows(k: int) -> list[Sequence]:
            p = SamplingParams(max_new_tokens=4)
            return [
                Sequence(GenerationRequest(-1 - i, "", [1 + i % 8] * 4, p, 4, (), None)) for i in range(k)
            ]

        with torch.inference_mode():
            if self.compiled.cuda:
                batch.hold = True
                sizes = sorted(
                    {compiled_mod.bucket(k, batch.max_slots) for k in range(1, batch.max_slots + 1)}
                )
            else:
                # dynamo specialises size 1: one graph for it, one for any other count.
                sizes = [k for k in (1, 2) if k <= batch.max_slots]
            for k in sorted(sizes, reverse=True):
                if len(batch) > k:
                    batch.leave(list(range(k, len(batch))))
                if len(batch) < k:
                    self.join(batch, rows(k - len(batch)))
                for _ in range(3 if self.compiled.cuda else 1):  # CUDA graphs: warm, record, replay
                    self.compiled.decode(batch)
            batch.leave(list(range(len(batch))))

    def new_slots(self, max_slots: int, kv_tokens: int) -> SlotBatch:
        """An empty persistent batch for this model (`no_slots_reason` must be None)."""
        return SlotBatch(
            self.model,
            self.device,
            max_slots=max_slots,
            max_columns=self.max_context + 1,
            kv_tokens=kv_tokens,
            vocab=self.vocab,
        )

    # the persistent batch ----------------------------------------------------------------------
    def join(self, batch: SlotBatch, seqs: list[Sequence], extra: int = 0) -> torch.Tensor:
        """Prefill `seqs` into free slots of `batch` (keeping `extra` more ready for copies of
        their rows); their next-token logits, [m, V]."""
        return self._prefill_slots(batch, *batch.begin_join(seqs, extra))

    def chunk(self, batch: SlotBatch, seq: Sequence, end: int) -> torch.Tensor:
        """Prefill `seq`'s prompt up to column `end` (after the chunks before it) in the slot
        parked for it; the last position's logits, [1, V]."""
        return self._prefill_slots(batch, *batch.begin_chunk(seq, end))

    def _prefill_slots(
        self, batch: SlotBatch, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """The pass `begin_join`/`begin_chunk` set up; its last position's logits per row."""
        out = self._forward(
            batch.lora_index(),
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: batch.cache},
        )
        return out.logits[:, -1, :]

    def _decode_slots(self, batch: SlotBatch) -> torch.Tensor:
        # A step with adapter rows runs eager: the compiled graph is the base's alone.
        if self.compiled is not None and not batch.decode_has_lora():
            return self.compiled.decode(batch)
        input_ids, mask, position_ids = batch.begin_decode()
        with attention.grouped(batch.groups):
            out = self._forward(
                batch.lora_index(),
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_kw: batch.cache},
            )
        batch.end_decode()
        return out.logits[:, -1, :]

    # generation ------------------------------------------------------------------------------
    def prefill(self, seqs: list[Sequence]) -> tuple[Batch, torch.Tensor]:
        """A batch of `seqs` with their prompts in the cache, and each prompt's next-token logits."""
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
        cache = new_cache(self.model)
        out = self._forward(
            self._rows_index(seqs),
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        seen = None
        if any(s.penalty is not None for s in seqs):
            seen = seen_of(seqs, self.vocab, dev)
        batch = Batch(seqs, cache, mask, lengths, input_ids[:, -1], seen)
        return batch, out.logits[:, -1, :]

    def decode(self, batch: Batch | SlotBatch) -> torch.Tensor:
        """One step for every row: logits of the next token, [B, V]."""
        if isinstance(batch, SlotBatch):
            return self._decode_slots(batch)
        mask = batch.mask
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(batch), 1)], 1)
        out = self._forward(
            self._rows_index(batch.seqs),
            input_ids=batch.next_ids[:, None],
            attention_mask=mask[:, None, None, :] if mask is not None and self._mask_4d else mask,
            position_ids=batch.positions[:, None],
            use_cache=True,
            **{self._cache_kw: batch.cache},
        )
        batch.mask = mask
        batch.positions = batch.positions + 1
        return out.logits[:, -1, :]

    # label scoring ---------------------------------------------------------------------------
    def score(
        self,
        prompts: list[list[int]],
        continuations: list[list[list[int]]],
        slots: list[int] | None = None,
    ) -> list[list[float]]:
        """Per prompt, the summed log-probability of each of its continuations after it.

        One pass over the left-padded prompts fills a cache; each (prompt, continuation) row
        then reuses its prompt's cache, scored in chunks of at most SCORE_CACHE_TOKENS cached
        tokens, so a request with many labels costs label tokens, not labels x prompt.
        `slots`: each prompt's LoRA bank slot (resident; 0 or None: the base), applied per row
        in both passes, so prompts of different adapters share them.
        """
        index = None if self.lora is None or slots is None else pass_index(slots, self.device)
        dev = self.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(self.model)
        out = self._forward(
            index,
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        pairs = [(r, c) for r, conts in enumerate(continuations) for c in conts]
        totals: list[float] = []
        chunk = max(1, SCORE_CACHE_TOKENS // max(width, 1))
        for start in range(0, len(pairs), chunk):
            totals.extend(self._score_pairs(pairs[start : start + chunk], cache, first, mask, pos, index))
        result, k = [], 0
        for conts in continuations:
            result.append(totals[k : k + len(conts)])
            k += len(conts)
        return result

    def _score_pairs(
        self,
        pairs: list[tuple[int, list[int]]],
        cache: Any,
        first: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        slot_index: torch.Tensor | None = None,
    ) -> list[float]:
        dev = self.device
        index = torch.tensor([r for r, _ in pairs], device=dev)
        totals = first[index, torch.tensor([c[0] for _, c in pairs], device=dev)]
        width = max(len(c) for _, c in pairs)
        if width > 1:
            # This chunk's own copy of the prompt rows it needs (the shared cache stays intact).
            from transformers import DynamicCache

            rows = DynamicCache(config=self.model.config)
            src: Any
            dst: Any
            for src, dst in zip(cache.layers, rows.layers, strict=True):
                dst.device = src.keys.device
                dst.keys = src.keys.index_select(0, index)
                dst.values = src.values.index_select(0, index)
                dst.is_initialized = True
            cont = torch.full((len(pairs), width - 1), self.pad_id, dtype=torch.long)
            target = torch.zeros((len(pairs), width - 1), dtype=torch.long)
            valid = torch.zeros((len(pairs), width - 1), dtype=torch.bool)
            for i, (_, c) in enumerate(pairs):
                n = len(c) - 1
                if n:
                    cont[i, :n] = torch.tensor(c[:-1])
                    target[i, :n] = torch.tensor(c[1:])
                    valid[i, :n] = True
            cont, target, valid = cont.to(dev), target.to(dev), valid.to(dev)
            # Right padding after a continuation cannot affect its own (earlier) positions.
            cmask = torch.cat([mask[index], torch.ones_like(cont)], dim=1)
            cpos = pos[index, -1:] + 1 + torch.arange(width - 1, device=dev)
            logits = self._forward(
                None if slot_index is None else slot_index.index_select(0, index),
                input_ids=cont,
                attention_mask=cmask,
                position_ids=cpos,
                use_cache=True,
                **{self._cache_kw: rows},
            ).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            totals = totals + (tok_lp * valid).sum(dim=1)
        return totals.cpu().tolist()
