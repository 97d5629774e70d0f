"""The decode step of the persistent batch under `torch.compile` (setting `compile_decode`).

What is compiled is the part that is pure tensors: the model forward of one decode step over
the batch's preallocated buffers (K/V `[slots, heads, columns, dim]` per layer, the in-place
`[slots, columns]` mask, per-slot positions and next ids). The Python side - which rows run,
their host column counts, the mask column set for this step, joins, departures, sampling -
stays eager around it. Inside the graph the cache layers take their shapes from the tensors
alone (`SlotBatch.mode == "graph"`): the rows from the input's batch dimension, every column of
the buffers (the mask hides the unused ones), so nothing Python-side is guarded per step and no
step or batch size makes it compile again.

- CPU: inductor with dynamic shapes. Sizes 1 are specialised by dynamo, so there are two graphs,
  one row and any other count, both compiled at warm-up (`CausalLM.warm_up`), before the
  engine answers READY: a user's first request never waits for a compile, and the front's
  watchdog (which starts at READY) never sees a step loop blocked by one.
- CUDA: CUDA graphs (`mode="reduce-overhead"`, as vLLM does) need static shapes and static
  addresses: the rows are padded up to a bucket (`CUDA_BUCKETS`, capped by the slots), one
  graph per bucket, all captured at warm-up; the buffers are marked static addresses (they are
  written in place, so a replay reads the live cache). Padding rows write a scratch column
  (the last) of free slots, which nothing attends to before it is written again.
  This path is written but was not run here (no GPU was lent); `compile_decode: auto` leaves
  CUDA eager until a benchmark on a GPU says it pays (and CPU too, see `AUTO_ON`).

Not compiled (stay eager, `eligible` says why): bitsandbytes int8/nf4/fp4 layers (their custom
autograd functions and host-side state break graphs), models spread over devices, and the
copying batch (transformers' `DynamicCache` grows per step: every shape would change).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from bitserve.engine.worker.input_batch import SlotBatch

log = logging.getLogger(__name__)

# Row counts a CUDA graph is captured for; a step runs the smallest bucket that holds its rows.
CUDA_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def eligible(model: Any, device: torch.device, quantization: str) -> str | None:
    """None when the decode step of `model` can be compiled, else why not."""
    if quantization not in ("", "none", None):
        return f"{quantization} (bitsandbytes) layers run eager"
    dm = getattr(model, "hf_device_map", None)
    if dm and len({str(d) for d in dm.values()}) > 1:
        return "the model is spread over devices"
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type} (compiled decode: CPU inductor or CUDA graphs only)"
    return None


def resolve(setting: str, device: torch.device, reason: str | None) -> tuple[bool, str]:
    """Whether to compile, and why (for the log): `on` wherever eligible, `off` never, `auto`
    where bench/results/step-compile-cpu.json measured a gain (see docs/generation.md)."""
    if setting == "off":
        return False, "compile_decode is off"
    if reason is not None:
        return False, reason
    if setting == "on":
        return True, "compile_decode is on"
    if device.type in AUTO_ON:
        return True, f"compile_decode auto: on for {device.type}"
    why = _AUTO_OFF.get(device.type, "no measured gain")
    return False, f"compile_decode auto: off for {device.type} ({why})"


# Devices where `auto` compiles: those where the committed benchmark shows a gain worth its
# start-up. None yet: on CPU bench/results/step-compile-cpu.json gains per step at every size
# on the 4-layer benchmark model (1.15-1.76x), but step-compile-cpu-smollm2.json loses at 64
# rows on the default config's model (0.86-0.98x), and a compile costs seconds (cache warm) to
# minutes (cold) at every engine start and restart; CUDA is unmeasured (docs/generation.md).
AUTO_ON: frozenset[str] = frozenset()
_AUTO_OFF = {
    "cpu": "every engine start pays a compile, and large models gain little or lose: "
    "measure with bench.step --compare-compile and set it on where it pays"
}


def bucket(n: int, slot_cap: int) -> int:
    for b in CUDA_BUCKETS:
        if b >= n:
            return min(b, slot_cap)
    return n


class CompiledDecode:
    """One model's compiled decode step over a `SlotBatch`."""

    def __init__(self, model: Any, device: torch.device, cache_kw: str, *, backend: str = "inductor"):
        self.model = model
        self.cuda = device.type == "cuda"
        self._marked: tuple[int, ...] = ()
        kw = cache_kw

        def forward(
            input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache: Any
        ) -> Any:
            out = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                **{kw: cache},
            )
            return out.logits[:, -1, :]

        if self.cuda:
            # One graph per bucket and per buffer size (grown rarely): more than dynamo's default 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            mode = "reduce-overhead" if backend == "inductor" else None
            self.fn = torch.compile(forward, mode=mode, dynamic=False, backend=backend)
        else:
            # Sizes are marked dynamic below, tensor by tensor (dynamo's own `dynamic=True` still
            # specialised the row count here).
            self.fn = torch.compile(forward, backend=backend)  # "eager": dynamo alone (tests)

    def _mark(self, batch: SlotBatch) -> None:
        """Mark the batch's buffers, again whenever they were reallocated (grown or freed):
        CUDA graphs replay fixed addresses; on CPU their row and column sizes are dynamic, so
        a grown buffer does not compile again."""
        assert batch.cache is not None and batch.mask is not None
        tensors = [batch.mask, batch.row_index, batch.cols_dev, batch.positions, batch.next_ids]
        for layer in batch.cache.layers:
            tensors += [layer.keys, layer.values]
        ids = tuple(id(t) for t in tensors)
        if ids == self._marked:
            return
        for t in tensors:
            if self.cuda:
                torch._dynamo.mark_static_address(t)
            else:
                for dim in (0, 2) if t.dim() == 4 else range(t.dim()):
                    torch._dynamo.maybe_mark_dynamic(t, dim)
        self._marked = ids

    def decode(self, batch: SlotBatch) -> torch.Tensor:
        """One decode step of every row of `batch`: next-token logits, [n, V]."""
        batch.begin_decode()  # this step's mask column, in place; capacity grown if needed
        assert batch.mask is not None
        n = m = batch.n
        last = batch.col_cap - 1
        if self.cuda:
            m = bucket(n, batch.slot_cap)
            if m > n:
                # Padding rows: free slots (or the parked partial prefill, whose columns stop
                # before the last) write the last column, which no row reads before writing it,
                # and attend to it alone for this step (a row that attends to nothing would put
                # NaN in that column, and NaN survives any mask).
                batch.cols_dev[n:m] = last
                batch.positions[n:m] = 0
                batch.next_ids[n:m] = 0
                batch.mask[n:m, last] = True
            torch.compiler.cudagraph_mark_step_begin()
        self._mark(batch)
        # CUDA graphs attend over every column (static shapes); on the CPU the mask is cut to
        # the columns in use and attention (engine/worker/attention.py) cuts K/V to it.
        width = batch.col_cap if self.cuda else batch.width
        ids, mask, pos = (
            batch.next_ids[:m, None],
            batch.mask[:m, None, None, :width],
            batch.positions[:m, None],
        )
        if not self.cuda:
            for t in (ids, mask, pos):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(mask, 3)
        batch.mode = "graph"
        try:
            logits = self.fn(ids, mask, pos, batch.cache)
        finally:
            batch.mode = "decode"
            if m > n:
                batch.mask[n:m, last] = False
        batch.end_decode()
        # A CUDA graph's output is overwritten by its next replay: the caller gets its own copy.
        return logits[:n].clone() if self.cuda else logits
