"""The persistent batch: fixed slots whose KV, mask, positions and next ids live in preallocated
tensors written in place (vLLM v1's `InputBatch`, gpt-fast's `[B, H, S, D]` caches).

Rows are dense: running rows occupy slots `0..n-1`. Per layer, K and V are
`[slot_capacity, kv_heads, column_capacity, head_dim]` in the compute dtype; a row's tokens sit in
its slot's columns `0..cols[r]-1` (columns left of a left-padded prefill's real tokens are dead,
masked off), and the next decode step writes column `cols[r]`. The attention mask is a
preallocated `[slots, columns]` bool buffer; a decode step sets one column per row and hands the
model a 4-D view of its first `max(cols) + 1` columns, so attention reads only the columns in use.

A join prefills only the new prompts, straight into free slots (`n..n+m-1`): the running rows
are never copied. A leaving row's slot is refilled by the last row (one row moved per layer,
only its used columns), so the batch stays dense. Capacity grows rarely (doubling, bounded by
the model's context and the KV-token budget). On a GPU the buffers go when the batch empties; on
the CPU they are mapped once and kept (a request arriving at an empty batch would otherwise pay
for mapping and faulting them again), and `release_pages` hands their resident pages back when
the engine has been idle a while.

It plugs into transformers as a `Cache` whose layers answer `update(key, value)`: every SDPA
causal LM (GPT-2, Llama, Qwen2, Mistral without a sliding window, ...) and bitsandbytes layers
run unchanged. `supports(model)` says whether a model can be served this way.
"""

from __future__ import annotations

import math
import mmap
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bitserve.engine.sched.sequence import Sequence
from bitserve.engine.worker import attention

if TYPE_CHECKING:
    from bitserve.engine.worker.sampler import Plan

# The first allocation: slots and columns for a small batch; both double when outgrown.
FIRST_SLOTS = 8
FIRST_COLUMNS = 128
# numpy dtypes of each element size, for lazily zeroed buffers viewed as any torch dtype
# (all-zero bits are 0.0 in float32, bfloat16 and float16 alike).
_NP_BY_SIZE = {4: np.float32, 2: np.uint16, 1: np.uint8}


def supports(model: Any) -> str | None:
    """None when the persistent batch can serve `model`, else why not (it then keeps the
    copying `Batch` path): SDPA attention over full (not sliding or chunked) attention layers."""
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", attention.NAME):
        return f"attention implementation {impl!r} (the persistent batch needs sdpa)"
    for k in ("sliding_window", "attention_chunk_size"):
        if getattr(cfg, k, None):
            return f"{k} is set"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))} (only full attention is served in slots)"
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "cross attention"
    return None


def _cache_base() -> type:
    from transformers.cache_utils import Cache

    return Cache


def _layer_base() -> type:
    from transformers.cache_utils import CacheLayerMixin

    return CacheLayerMixin


_CLASSES: tuple[type, type] | None = None


def _classes() -> tuple[type, type]:
    """transformers' cache classes are imported lazily (the engine imports this module early)."""
    global _CLASSES
    if _CLASSES is None:

        class SlotLayer(_layer_base()):  # type: ignore[misc]
            """One layer's K and V in slots; what `update` writes and returns is the batch's
            current pass (`SlotBatch.mode`)."""

            is_sliding = False

            def __init__(self, batch: SlotBatch):
                super().__init__()
                self.batch = batch

            def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
                b = self.batch
                h, d, dv = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
                self.keys = b.zeros((b.slot_cap, h, b.col_cap, d), key_states)
                self.values = b.zeros((b.slot_cap, h, b.col_cap, dv), value_states)
                self.device = key_states.device
                self.is_initialized = True

            def update(
                self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
            ) -> tuple[torch.Tensor, torch.Tensor]:
                if not self.is_initialized or self.keys is None:
                    self.lazy_initialization(key_states, value_states)
                k, v, b = self.keys, self.values, self.batch
                if b.mode == "graph":
                    # The compiled decode step: shapes come from the tensors alone (rows from
                    # the input, every column of the buffers, the mask hiding unused ones), so
                    # one graph serves every batch size and step.
                    n = key_states.shape[0]
                    rows, cols = b.row_index[:n], b.cols_dev[:n]
                    k[rows, :, cols] = key_states[:, :, 0]
                    v[rows, :, cols] = value_states[:, :, 0]
                    return k[:n], v[:n]
                if b.mode == "decode":
                    # One new column per row, each at its own `cols[r]`.
                    n = b.n
                    rows, cols = b.row_index[:n], b.cols_dev[:n]
                    k[rows, :, cols] = key_states[:, :, 0]
                    v[rows, :, cols] = value_states[:, :, 0]
                    w = b.width
                    return k[:n, :, :w], v[:n, :, :w]
                # prefill of rows [r0, r1) at columns [c0, c1)
                r0, r1, c0, c1 = b.span
                k[r0:r1, :, c0:c1] = key_states
                v[r0:r1, :, c0:c1] = value_states
                return k[r0:r1, :, :c1], v[r0:r1, :, :c1]

            def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
                return self.get_seq_length() + query_length, 0

            def get_seq_length(self) -> int:
                b = self.batch
                return b.width - 1 if b.mode == "decode" else b.span[2]

            def get_max_length(self) -> int:
                return -1

            def regrow(self, slots: int, cols: int, n: int, used: int) -> None:
                if self.keys is None:
                    return
                k, v, b = self.keys, self.values, self.batch
                nk = b.zeros((slots, k.shape[1], cols, k.shape[3]), k)
                nv = b.zeros((slots, v.shape[1], cols, v.shape[3]), v)
                nk[:n, :, :used] = k[:n, :, :used]
                nv[:n, :, :used] = v[:n, :, :used]
                self.keys, self.values = nk, nv

            def copy_rows(self, src: torch.Tensor, dst0: int, used: int) -> None:
                """Slots `dst0..` get rows `src`' first `used` columns (a join's copies)."""
                if self.keys is not None:
                    m = src.shape[0]
                    self.keys[dst0 : dst0 + m, :, :used] = self.keys[src, :, :used]
                    self.values[dst0 : dst0 + m, :, :used] = self.values[src, :, :used]

            def move(self, src: int, dst: int, used: int) -> None:
                if self.keys is not None:
                    self.keys[dst, :, :used] = self.keys[src, :, :used]
                    self.values[dst, :, :used] = self.values[src, :, :used]

        class SlotCache(_cache_base()):  # type: ignore[misc]
            def __init__(self, batch: SlotBatch, num_layers: int):
                super().__init__(layers=[SlotLayer(batch) for _ in range(num_layers)])

        _CLASSES = (SlotLayer, SlotCache)
    return _CLASSES


class Rows:
    """Some rows of a batch, as the sampler sees them: their sequences, repetition-penalty state
    and sampling plan."""

    def __init__(self, seqs: list[Sequence], seen: torch.Tensor | None, plan: Plan | None = None):
        self.seqs = seqs
        self.seen = seen
        self._plan = plan

    def __len__(self) -> int:
        return len(self.seqs)

    def plan(self) -> Plan:
        if self._plan is None:
            from bitserve.engine.worker.sampler import make_plan

            self._plan = make_plan(
                self.seqs, self.seen.device if self.seen is not None else torch.device("cpu")
            )
        return self._plan


class SlotBatch:
    """The running rows in slots. Only the engine's loop touches it."""

    def __init__(
        self,
        model: Any,
        device: torch.device,
        *,
        max_slots: int,
        max_columns: int,
        kv_tokens: int,
        vocab: int,
    ):
        self.model = model
        self.device = device
        self.max_slots = max_slots
        self.max_columns = max_columns
        self.kv_tokens = kv_tokens  # bound on slot_cap x col_cap
        self.vocab = vocab
        self.num_layers = _num_layers(model)
        self.seqs: list[Sequence] = []
        self.cols: list[int] = []  # per row: next column to write (host)
        self.mode = "decode"
        self.span = (0, 0, 0, 0)
        self.width = 0
        self.groups: attention.Groups | None = None
        self.slot_cap = self.col_cap = 0
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        # Per slot, on the device: index, next column, next position id, next input token.
        self.row_index: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self.cols_dev: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self.positions: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self.next_ids: torch.Tensor = torch.zeros(0, dtype=torch.long)
        # Per slot, the row's LoRA adapter slot (0: the base), and whether any row has one -
        # both refreshed only when membership changes, like the sampling plan.
        self.lora: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self._any_lora: bool | None = None
        self._plan: Plan | None = None
        # A long prompt being prefilled in chunks, parked in slot `n` (outside the decode rows),
        # and how many of its columns are written.
        self.partial: Sequence | None = None
        self.partial_done = 0
        # Keep the buffers at their full size, allocated once and never freed (CUDA graphs
        # replay fixed shapes and addresses: see compiled.py).
        self.hold = False
        # When the columns must grow, grow them to what the rows have reserved (their columns +
        # max_new_tokens left; admission kept that within the KV budget) instead of doubling:
        # a growth copies every row, and it is cheapest early (few columns used). Off where the
        # step attends over every allocated column (the compiled graph).
        self.grow_to_reserved = True
        # On the CPU the K/V buffers are allocated once at the whole budget (every slot, every
        # column the KV budget allows) as lazily zeroed memory (`zeros`): only the pages rows
        # write become resident, and no join ever waits for a growth that copies every row
        # (bench.long_join, under load: with the growth, its window's longest gaps were 0.4-0.5 s;
        # without, 0.05-0.12 s). A GPU has
        # no lazy pages: there the buffers grow as above. Off where the step attends over every
        # allocated column (the compiled graph).
        self.lazy = device.type == "cpu"
        self._alloc_small()

    def zeros(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A zero tensor of `like`'s dtype and device. Lazy on the CPU: an anonymous mapping of
        the kernel's zero pages, resident once written (torch's own zeros write every byte; a
        calloc may be served from the heap and cleared byte by byte)."""
        if not self.lazy or like.device.type != "cpu" or like.element_size() not in _NP_BY_SIZE:
            return like.new_zeros(shape)
        count = math.prod(shape)
        nbytes = count * like.element_size()
        if nbytes == 0:
            return like.new_zeros(shape)
        # Private and anonymous: zero pages until written, freed (not kept as shared memory)
        # when released.
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arr = np.frombuffer(buf, dtype=_NP_BY_SIZE[like.element_size()], count=count).reshape(shape)
        self._maps.append(buf)
        return torch.from_numpy(arr).view(like.dtype)

    def release_pages(self) -> int:
        """An empty batch's lazily mapped buffers give their resident pages back (they read as
        zeros again, as when first mapped); the mappings stay, so the next join writes in place.
        Returns the bytes of mappings advised (0 when rows are held or nothing is mapped)."""
        if self.held or not self._maps or not hasattr(mmap, "MADV_DONTNEED"):
            return 0
        done = 0
        for buf in self._maps:
            buf.madvise(mmap.MADV_DONTNEED)
            done += len(buf)
        return done

    @property
    def held(self) -> int:
        """Slots holding data: the decode rows and a parked partial prefill."""
        return self.n + (self.partial is not None)

    def _alloc_small(self) -> None:
        self._maps: list[mmap.mmap] = []  # the lazy buffers' mappings (release_pages)
        self.slot_cap = self.col_cap = 0
        self.cache = None
        self.mask = None
        self.seen: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def n(self) -> int:
        return len(self.seqs)

    # what the gauges report -------------------------------------------------------------------
    @property
    def reserved_tokens(self) -> int:
        return self.slot_cap * self.col_cap if self.cache is not None else 0

    @property
    def used_tokens(self) -> int:
        return sum(self.cols)

    # capacity ----------------------------------------------------------------------------------
    def _reserved(self, extra: int = 0) -> int:
        """The most columns a row will hold when it ends: its columns + its tokens left (and
        `extra`, a joining group's own need)."""
        if not self.grow_to_reserved:
            return 0
        need = [
            c + max(0, s.max_new_tokens - len(s.token_ids))
            for c, s in zip(self.cols, self.seqs, strict=False)
        ]
        return min(max([*need, extra], default=0), self.max_columns)

    def _ensure(self, slots: int, cols: int, reserve: int = 0) -> None:
        """Room for `slots` rows of `cols` columns: grown by doubling (or to `reserve` columns
        when that is more), bounded."""
        if self.cache is not None and slots <= self.slot_cap and cols <= self.col_cap:
            return
        if slots > self.max_slots:
            raise ValueError(f"{slots} rows exceed the batch's {self.max_slots} slots")
        new_cols = self.col_cap
        if cols > new_cols:
            cols_wanted = max(cols, reserve)
            # Doubling stops at the context, unless a row needs more: a short prompt padded to a
            # long one in its prefill pass ends past the context by that padding.
            new_cols = min(max(2 * self.col_cap, FIRST_COLUMNS, cols_wanted), max(self.max_columns, cols))
        new_slots = self.slot_cap
        if slots > new_slots:
            new_slots = min(max(2 * self.slot_cap, FIRST_SLOTS, slots), self.max_slots)
        if self.lazy and self.cache is None:
            new_slots = max(new_slots, self.max_slots)
            new_cols = max(new_cols, min(self.max_columns, self.kv_tokens // max(self.max_slots, 1)))
        if self.hold:
            new_slots = self.max_slots
            new_cols = max(cols, min(self.max_columns, self.kv_tokens // max(new_slots, 1)))
        # The KV-token budget bounds the rectangle; admission keeps what is needed within it.
        if new_slots * new_cols > self.kv_tokens:
            new_cols = max(cols, min(new_cols, self.kv_tokens // max(new_slots, 1)))
        if new_slots * new_cols > self.kv_tokens:
            new_slots = max(slots, min(new_slots, self.kv_tokens // max(new_cols, 1)))
        n, used = self.held, max([*self.cols, self.partial_done], default=0)
        dev = self.device
        if self.cache is None:
            _, cache_cls = _classes()
            self.slot_cap, self.col_cap = new_slots, new_cols
            self.cache = cache_cls(self, self.num_layers)
        else:
            self._maps = []  # the old buffers' mappings go with them
            for layer in self.cache.layers:
                layer.regrow(new_slots, new_cols, n, used)
            self.slot_cap, self.col_cap = new_slots, new_cols
        mask = torch.zeros(new_slots, new_cols, dtype=torch.bool, device=dev)
        if self.mask is not None and n:
            mask[:n, :used] = self.mask[:n, :used]
        self.mask = mask
        self.row_index = torch.arange(new_slots, device=dev)
        cols_dev = torch.zeros(new_slots, dtype=torch.long, device=dev)
        positions = torch.zeros(new_slots, dtype=torch.long, device=dev)
        next_ids = torch.zeros(new_slots, dtype=torch.long, device=dev)
        lora = torch.zeros(new_slots, dtype=torch.long, device=dev)
        if n:
            cols_dev[:n] = self.cols_dev[:n]
            positions[:n] = self.positions[:n]
            next_ids[:n] = self.next_ids[:n]
            lora[:n] = self.lora[:n]
        self.cols_dev, self.positions, self.next_ids, self.lora = cols_dev, positions, next_ids, lora
        if self.seen is not None:
            seen = torch.zeros(new_slots, self.seen.shape[1], dtype=torch.bool, device=dev)
            seen[:n] = self.seen[:n]
            self.seen = seen

    # LoRA view ---------------------------------------------------------------------------------
    def decode_has_lora(self) -> bool:
        """Whether some decode row has an adapter (recomputed when membership changes)."""
        if self._any_lora is None:
            self._any_lora = any(s.lora for s in self.seqs)
        return self._any_lora

    def lora_index(self) -> torch.Tensor | None:
        """The adapter slot of each row of the pass being set up (None: no row has one)."""
        r0, r1 = (0, self.n) if self.mode == "decode" else self.span[:2]
        if self.mode == "decode":
            if not self.decode_has_lora():
                return None
        elif not any(s.lora for s in self._span_seqs(r0, r1)):
            return None
        return self.lora[r0:r1]

    def _span_seqs(self, r0: int, r1: int) -> list[Sequence]:
        if self.partial is not None and r0 == self.n:
            return [self.partial]
        return self.seqs[r0:r1]

    # sampling view -----------------------------------------------------------------------------
    def plan(self) -> Plan:
        if self._plan is None:
            from bitserve.engine.worker.sampler import make_plan

            self._plan = make_plan(self.seqs, self.device)
        return self._plan

    def rows(self, start: int = 0) -> Rows:
        """Rows `start..n-1` for the sampler (all of them: the batch's own cached plan)."""
        seen = self.seen[start : self.n] if self.seen is not None else None
        if start == 0:
            return Rows(self.seqs, seen, self.plan())
        return Rows(self.seqs[start:], seen)

    # a join ------------------------------------------------------------------------------------
    def begin_chunk(self, seq: Sequence, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next chunk of `seq`'s prompt (columns `partial_done..end`) in slot `n`, attending
        to the chunks before it; returns the pass's input ids, 4-D mask and position ids."""
        assert self.partial is None or self.partial is seq
        if self.partial is None:
            # Grow first: the parked row holds no data yet, so growth copies only the n rows.
            self.partial_done = 0
            # Columns for its whole answer too: a long row that outgrows the rectangle a few
            # tokens after joining would copy every row's K/V once more (a 2,048-token join:
            # one 270 ms step of 16 rows here).
            want = len(seq.prompt_ids) + max(1, seq.max_new_tokens)
            self._ensure(self.n + 1, min(want, max(self.max_columns, len(seq.prompt_ids) + 1)))
            self.partial = seq
        assert self.mask is not None
        r, c0, dev = self.n, self.partial_done, self.device
        if c0 == 0:
            self.mask[r].zero_()
            self.lora[r] = seq.lora
        self.mask[r, c0:end] = True
        ids = torch.tensor([seq.prompt_ids[c0:end]], device=dev)
        mask4 = torch.ones(end - c0, end, dtype=torch.bool, device=dev).tril(diagonal=c0)[None, None]
        self.mode = "prefill"
        self.span = (r, r + 1, c0, end)
        self.partial_done = end
        return ids, mask4, torch.arange(c0, end, device=dev)[None]

    def end_chunk(self) -> bool:
        """After a chunk's pass: True when the prompt is complete and its row has joined."""
        seq = self.partial
        assert seq is not None
        length = len(seq.prompt_ids)
        if self.partial_done < length:
            return False
        r = self.n
        self.cols_dev[r] = length
        self.positions[r] = length
        self.partial, self.partial_done = None, 0
        if seq.penalty is not None or self.seen is not None:
            self._seen_rows(r, [seq])
        self.seqs.append(seq)
        self.cols.append(length)
        self._plan = None
        self._any_lora = None
        return True

    def drop_partial(self) -> None:
        self.partial, self.partial_done = None, 0
        if not self.seqs:
            self._emptied()

    def _emptied(self) -> None:
        """No row is left: a GPU's buffers go back until the next join; held buffers (CUDA
        graphs) and the CPU's lazy mappings stay (`release_pages` trims the latter)."""
        if not self.hold and not self.lazy:
            self._alloc_small()

    def begin_join(
        self, seqs: list[Sequence], extra: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Put `seqs` in the free slots `n..n+m-1`, left-padded to their longest prompt; returns
        the prefill's input ids, its 4-D mask and its position ids. `extra`: slots to keep
        ready after them for copies of these rows (`copy_rows`)."""
        assert self.partial is None, "no join while a prompt is prefilled in chunks"
        n0, m = self.n, len(seqs)
        longest = max(len(s.prompt_ids) for s in seqs)
        own = longest + max(s.max_new_tokens for s in seqs)
        self._ensure(n0 + m + extra, longest + 1, reserve=self._reserved(own))
        assert self.mask is not None
        dev = self.device
        lengths = torch.tensor([len(s.prompt_ids) for s in seqs], device=dev)
        real = torch.arange(longest, device=dev)[None, :] >= (longest - lengths)[:, None]
        self.mask[n0 : n0 + m].zero_()
        self.mask[n0 : n0 + m, :longest] = real
        pad = 0
        rows = [[pad] * (longest - len(s.prompt_ids)) + s.prompt_ids for s in seqs]
        input_ids = torch.tensor(rows, device=dev)
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=dev).tril()
        mask4 = (causal[None, :, :] & real[:, None, :])[:, None]
        # A padding query row attends to nothing; SDPA would give NaN there: let it see itself.
        mask4 = mask4 | torch.eye(longest, dtype=torch.bool, device=dev)[None, None]
        self.cols_dev[n0 : n0 + m] = longest
        self.positions[n0 : n0 + m] = lengths
        if any(s.lora for s in seqs):
            self.lora[n0 : n0 + m] = torch.tensor([s.lora for s in seqs], device=dev)
        else:
            self.lora[n0 : n0 + m] = 0
        if any(s.penalty is not None for s in seqs) or (self.seen is not None):
            self._seen_rows(n0, seqs)
        self.mode = "prefill"
        self.span = (n0, n0 + m, 0, longest)
        self.seqs.extend(seqs)
        self.cols.extend([longest] * m)
        self._plan = None
        self._any_lora = None
        return input_ids, mask4, position_ids

    def copy_rows(self, src: list[int], seqs: list[Sequence]) -> None:
        """Join `seqs` in slots `n..` as copies of rows `src` (each the row of the same prompt,
        just prefilled): its KV, mask, columns and position, so the prompt is prefilled once for
        all of them (the n completions of a prompt). They then decode as rows of their own."""
        assert self.partial is None, "no join while a prompt is prefilled in chunks"
        if not seqs:
            return
        n0, m = self.n, len(seqs)
        self._ensure(n0 + m, max(self.cols[r] for r in src) + 1)
        assert self.mask is not None
        idx = torch.tensor(src, device=self.device)
        used = max(self.cols[r] for r in src)
        for layer in self.cache.layers:
            layer.copy_rows(idx, n0, used)
        self.mask[n0 : n0 + m] = self.mask[idx]
        self.cols_dev[n0 : n0 + m] = self.cols_dev[idx]
        self.positions[n0 : n0 + m] = self.positions[idx]
        self.lora[n0 : n0 + m] = self.lora[idx]  # the same adapter (copies share its prompt key)
        self._any_lora = None
        if any(s.penalty is not None for s in seqs) or (self.seen is not None):
            self._seen_rows(n0, seqs)
        self.seqs.extend(seqs)
        self.cols.extend(self.cols[r] for r in src)
        self._plan = None

    def _seen_rows(self, n0: int, seqs: list[Sequence]) -> None:
        if self.seen is None:
            self.seen = torch.zeros(self.slot_cap, self.vocab, dtype=torch.bool, device=self.device)
        self.seen[n0 : n0 + len(seqs)] = False
        for i, s in enumerate(seqs):
            ids = [t for t in s.prompt_ids + s.token_ids if t < self.vocab]
            if ids:
                self.seen[n0 + i, torch.tensor(ids, device=self.device)] = True

    # a decode step -----------------------------------------------------------------------------
    def begin_decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, 4-D mask and position ids of one step for every row; the mask gains each
        row's new column in place."""
        n = self.n
        width = max(self.cols) + 1
        if width > self.col_cap:
            self._ensure(self.slot_cap, width, reserve=self._reserved())
        assert self.mask is not None
        self.mask[self.row_index[:n], self.cols_dev[:n]] = True
        self.mode = "decode"
        self.width = width
        # Runs of rows attending over their own widths (a long row's columns are not read by
        # the short rows beside it): engine/worker/attention.py.
        self.groups = attention.width_groups([c + 1 for c in self.cols[:n]])
        return (
            self.next_ids[:n, None],
            self.mask[:n, None, None, :width],
            self.positions[:n, None],
        )

    def end_decode(self) -> None:
        n = self.n
        self.cols_dev[:n] += 1
        self.positions[:n] += 1
        self.cols = [c + 1 for c in self.cols]

    def set_next(self, start: int, ids: torch.Tensor) -> None:
        """Rows `start..` feed `ids` next (and have now seen them)."""
        end = start + ids.shape[0]
        self.next_ids[start:end] = ids
        if self.seen is not None:
            self.seen[self.row_index[start:end], ids] = True

    # departures --------------------------------------------------------------------------------
    def leave(self, rows: list[int]) -> None:
        """Drop `rows`; each freed slot is refilled by the last row, so the batch stays dense."""
        if not rows:
            return
        for r in sorted(set(rows), reverse=True):
            last = self.n - 1
            if r != last:
                self._move_row(last, r, self.cols[last])
                for t in (self.cols_dev, self.positions, self.next_ids, self.lora):
                    t[r] = t[last]
                if self.seen is not None:
                    self.seen[r] = self.seen[last]
                self.seqs[r] = self.seqs[last]
                self.cols[r] = self.cols[last]
            self.seqs.pop()
            self.cols.pop()
            if self.partial is not None:  # the parked partial prefill follows, to slot n
                self._move_row(self.n + 1, self.n, self.partial_done)
                self.lora[self.n] = self.partial.lora
        self._plan = None
        self._any_lora = None
        if not self.seqs and self.partial is None:
            self._emptied()

    def _move_row(self, src: int, dst: int, used: int) -> None:
        for layer in self.cache.layers:
            layer.move(src, dst, used)
        assert self.mask is not None
        self.mask[dst] = self.mask[src]


def _num_layers(model: Any) -> int:
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, k, None)
        if isinstance(v, int):
            return v
    raise ValueError("cannot tell the model's number of layers")
