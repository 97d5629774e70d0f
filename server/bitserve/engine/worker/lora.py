"""LoRA adapters served unmerged, per row, on one shared base (punica / S-LoRA style).

Every resident adapter has a slot `1..capacity` (slot 0 is "no adapter": zeros). For each base
module some resident adapter targets, the bank holds two stacks: `A[:, slot]` = lora_A^T
([in, r]) and `B[slot]` = scale * lora_B^T ([r, out]), zero-padded to the largest resident
rank. A forward hook on that module adds, for every row of the pass, its own adapter's
contribution, `y = base(x) + (x @ A[idx]) @ B[idx]` with `idx` the rows' slots, so rows with
different adapters and rows with none share one forward pass. Two ways to compute it, the same
sum:
- dense (while slots x rank is small, <= DENSE_COLUMNS): `x @ A` for every slot at once (one
  [in, slots*r] matmul), masked to each row's own slot's columns, then `@ B` ([slots*r, out]):
  two plain matmuls per module and no copy of weights, for a few wasted columns;
- gathered (many adapters or big ranks): each row's A and B gathered (index_select) and one
  batched matmul each, punica's BGMV in plain torch.
The base module is untouched - a float `nn.Linear` or a bitsandbytes int8 / NF4 layer alike -
and a pass with no adapter row skips the hooks' work entirely.

The runner sets `index` (one slot per row of the pass, or None) before each forward. Only the
engine's loop touches the bank.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitserve.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."
# Below this many stacked columns (slots x rank) the dense form is cheaper than gathering.
DENSE_COLUMNS = 256
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


@dataclass
class Adapter:
    """One adapter's weights, as the bank stores them: per target module, A^T [in, r] and
    scale * B^T [r, out] (float32, on the host until it is resident)."""

    path: str
    rank: int
    alpha: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # A classifier fine-tune's own head (peft `modules_to_save`): module -> (weight, bias or
    # None) replacing that linear layer's for this adapter's rows. Only a bank with `heads`.
    heads: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values()
        ) + sum(
            w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
            for w, b in self.heads.values()
        )


def read_adapter(path: str | Path, model: Any, max_rank: int, *, heads: bool = False) -> Adapter:
    """A peft LoRA directory (`quantize finetune --method lora|qlora` writes one):
    adapter_config.json + adapter_model.safetensors, checked against `model`.
    FAILED_PRECONDITION says what does not fit. `heads`: the bank can serve a replaced linear
    head per row (a sequence classifier's `modules_to_save`, e.g. `classifier`)."""
    d = Path(path)
    cfg_file = d / "adapter_config.json"
    if not cfg_file.is_file():
        raise FailedPrecondition(f"{d}: no adapter_config.json; not a LoRA adapter directory")
    weights_file = d / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise FailedPrecondition(f"{d}: no adapter_model.safetensors (only safetensors adapters are served)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise FailedPrecondition(f"{cfg_file}: unreadable ({e})") from e
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise FailedPrecondition(f"{d}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are served")
    if cfg.get("bias") not in (None, "none"):
        raise FailedPrecondition(f"{d}: bias={cfg['bias']!r}; only bias='none' adapters are served unmerged")
    if cfg.get("use_dora"):
        raise FailedPrecondition(
            f"{d}: DoRA adapters are not served unmerged; merge it with `quantize export`"
        )
    to_save = list(cfg.get("modules_to_save") or [])
    if to_save and not heads:
        raise FailedPrecondition(
            f"{d}: modules_to_save={cfg['modules_to_save']} replaces base modules; such an adapter "
            "cannot share the base - merge it with `quantize export` and serve it as its own model"
        )
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise FailedPrecondition(
            f"{d}: rank_pattern/alpha_pattern are not supported; use one r and lora_alpha"
        )
    rank, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    if rank > max_rank:
        raise FailedPrecondition(f"{d}: rank r={rank} exceeds max_lora_rank={max_rank} of this model")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    from safetensors.torch import load_file

    tensors = load_file(str(weights_file))
    parts: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    saved: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for k, t in tensors.items():
        for suffix, which in _SUFFIXES.items():
            if k.endswith(suffix):
                parts[k.removeprefix(_PREFIX).removesuffix(suffix)][which] = t
                break
        else:
            mod_name, _, param = k.removeprefix(_PREFIX).rpartition(".")
            inside = [m for m in to_save if f".{m}." in f".{mod_name}."]
            if inside and not any(mod_name == m or mod_name.endswith("." + m) for m in to_save):
                raise FailedPrecondition(
                    f"{d}: saved module {inside[0]!r} is a head of several layers ({k!r}); a "
                    "replaced head is served per row only as one linear layer - merge this adapter "
                    "with `quantize export` and serve it as its own model"
                )
            if not inside:
                raise FailedPrecondition(
                    f"{d}: weight {k!r} is not a lora_A/lora_B matrix (embedding or extra weights)"
                )
            saved[mod_name][param] = t
    head_weights = {name: _head(d, model, name, ps) for name, ps in sorted(saved.items())}
    if not parts and not head_weights:
        raise FailedPrecondition(f"{d}: adapter_model.safetensors holds no LoRA weights")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise FailedPrecondition(f"{d}: module {name!r} has lora_A or lora_B but not both")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise FailedPrecondition(
                f"{d}: target module {name!r} is not in the base model "
                f"(adapter made for another base: {cfg.get('base_model_name_or_path')!r})"
            ) from None
        fin, fout = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
        if fin is None or fout is None:
            raise FailedPrecondition(
                f"{d}: target module {name!r} is a {type(mod).__name__}, not a linear layer"
            )
        a, b = ab["A"], ab["B"]
        if a.shape != (rank, fin) or b.shape != (fout, rank):
            raise FailedPrecondition(
                f"{d}: module {name!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                f"base's {fin}->{fout} layer at r={rank} (adapter made for another base: "
                f"{cfg.get('base_model_name_or_path')!r})"
            )
        modules[name] = (a.float().t().contiguous(), (b.float() * scale).t().contiguous())
    return Adapter(str(d), rank, alpha, modules, head_weights)


def _head(
    d: Path, model: Any, name: str, params: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A saved module's weights (`modules_to_save`), checked to replace a float linear layer."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise FailedPrecondition(f"{d}: saved module {name!r} is not in the base model") from None
    if type(mod) is not torch.nn.Linear or not mod.weight.dtype.is_floating_point:
        raise FailedPrecondition(
            f"{d}: saved module {name!r} is a {type(mod).__name__}; a replaced head is served per row "
            "only for a float linear layer (merge this adapter with `quantize export`)"
        )
    w, b = params.get("weight"), params.get("bias")
    if w is None or set(params) - {"weight", "bias"} or tuple(w.shape) != tuple(mod.weight.shape):
        raise FailedPrecondition(
            f"{d}: saved module {name!r} ({', '.join(sorted(params))}) does not fit the base's "
            f"{mod.in_features}->{mod.out_features} layer"
        )
    if (b is None) != (mod.bias is None) or (b is not None and tuple(b.shape) != (mod.out_features,)):
        raise FailedPrecondition(f"{d}: saved module {name!r}: its bias does not fit the base's")
    return w.float(), None if b is None else b.float()


class LoraBank:
    """The adapters an engine knows (name -> path) and the resident ones (at most `capacity`,
    least recently used evicted first), with the stacks and hooks that apply them per row."""

    def __init__(self, model: Any, *, capacity: int, max_rank: int = 64, heads: bool = False):
        self.model = model
        self.capacity = capacity
        self.max_rank = max_rank
        # Serve replaced linear heads (`modules_to_save`) per row: a sequence classifier's bank.
        self.heads = heads
        # head module -> (weight [slots, out, in], bias [slots, out] or None); slot 0 and the
        # slots of adapters without that head hold the base's own weights
        self.head_stacks: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        emb = model.get_input_embeddings().weight
        self.device = emb.device
        self.dtype = emb.dtype if emb.dtype.is_floating_point else torch.float32
        self.known: dict[str, str] = {}  # name -> path
        self.slot: dict[str, int] = {}  # resident name -> slot
        self.lru: collections.OrderedDict[str, None] = collections.OrderedDict()  # resident, oldest first
        self.rank: dict[int, int] = {}  # slot -> rank of its adapter
        self.draining: set[str] = set()  # unloaded while rows still run on them
        self.loads = 0  # reads from disk (a reload after eviction counts)
        self.rcap = 0
        # module -> (A [in, slots, r], B [slots, r, out])
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: dict[str, Any] = {}
        self._index: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None  # dense form: [rows, slots*r], 1 on a row's own slot
        self._col_slot = torch.zeros(0, dtype=torch.long, device=self.device)

    @property
    def index(self) -> torch.Tensor | None:
        """The current pass's slot per row (None: no row has an adapter)."""
        return self._index

    @index.setter
    def index(self, idx: torch.Tensor | None) -> None:
        self._index = idx
        self._mask = None
        if idx is not None and self.dense:
            self._mask = (idx[:, None] == self._col_slot[None, :]).to(self.dtype)

    @property
    def dense(self) -> bool:
        return (self.capacity + 1) * self.rcap <= DENSE_COLUMNS

    # registry ----------------------------------------------------------------------------------
    def register(self, name: str, path: str) -> Adapter:
        """Check the adapter at `path` against the base and know it as `name` (not yet resident)."""
        if name in self.known and self.known[name] != path:
            raise FailedPrecondition(
                f"adapter {name!r} is already loaded from {self.known[name]}; unload it first"
            )
        ad = read_adapter(path, self.model, self.max_rank, heads=self.heads)
        self.known[name] = path
        self.draining.discard(name)
        return ad

    def forget(self, name: str) -> None:
        """Unknown from now on; its slot is freed once no row uses it (`free_unused`)."""
        if name not in self.known:
            raise NotFound(f"adapter {name!r} is not loaded")
        del self.known[name]
        if name in self.slot:
            self.draining.add(name)

    def free_unused(self, in_use: set[int]) -> None:
        for name in list(self.draining):
            s = self.slot.get(name)
            if s is None or s not in in_use:
                self._evict(name)

    # residency ---------------------------------------------------------------------------------
    def acquire(self, name: str, in_use: set[int], adapter: Adapter | None = None) -> int | None:
        """The slot of `name`, made resident if needed (evicting the least recently used
        adapter no row uses); None when every slot is in use. NOT_FOUND for an unknown name."""
        if name not in self.known:
            raise NotFound(f"adapter {name!r} is not loaded on this model")
        s = self.slot.get(name)
        if s is not None:
            self.lru.move_to_end(name)
            return s
        self.free_unused(in_use)
        free = set(range(1, self.capacity + 1)) - set(self.slot.values())
        if not free:
            for old in self.lru:
                if self.slot[old] not in in_use:
                    self._evict(old)
                    free = set(range(1, self.capacity + 1)) - set(self.slot.values())
                    break
            else:
                return None
        s = min(free)
        if adapter is None:
            adapter = read_adapter(self.known[name], self.model, self.max_rank, heads=self.heads)
        self._install(s, adapter)
        self.slot[name] = s
        self.lru[name] = None
        self.loads += 1
        return s

    def _evict(self, name: str) -> None:
        s = self.slot.pop(name)
        self.lru.pop(name, None)
        self.draining.discard(name)
        self.rank.pop(s, None)
        for a, b in self.stacks.values():
            a[:, s].zero_()
            b[s].zero_()
        self._base_heads(s)
        log.info("adapter %r left slot %d", name, s)

    def _install(self, s: int, ad: Adapter) -> None:
        if ad.rank > self.rcap:
            self._grow_rank(ad.rank)
        for a, b in self.stacks.values():
            a[:, s].zero_()
            b[s].zero_()
        for name, (at, bt) in ad.modules.items():
            if name not in self.stacks:
                self._add_module(name, at.shape[0], bt.shape[1])
            sa, sb = self.stacks[name]
            sa[:, s, : ad.rank] = at.to(sa.device, sa.dtype)
            sb[s, : ad.rank] = bt.to(sb.device, sb.dtype)
        self._base_heads(s)
        for name, (w, bias) in ad.heads.items():
            if name not in self.head_stacks:
                self._add_head(name)
            hw, hb = self.head_stacks[name]
            hw[s] = w.to(hw.device, hw.dtype)
            if hb is not None and bias is not None:
                hb[s] = bias.to(hb.device, hb.dtype)
        self.rank[s] = ad.rank

    def _grow_rank(self, r: int) -> None:
        for name, (a, b) in self.stacks.items():
            na = a.new_zeros(a.shape[0], a.shape[1], r)
            nb = b.new_zeros(b.shape[0], r, b.shape[2])
            na[:, :, : self.rcap] = a
            nb[:, : self.rcap] = b
            self.stacks[name] = (na, nb)
        self.rcap = r
        self._col_slot = torch.arange(self.capacity + 1, device=self.device).repeat_interleave(r)

    def _add_module(self, name: str, fin: int, fout: int) -> None:
        n = self.capacity + 1
        a = torch.zeros(fin, n, self.rcap, dtype=self.dtype, device=self.device)
        b = torch.zeros(n, self.rcap, fout, dtype=self.dtype, device=self.device)
        self.stacks[name] = (a, b)
        self._hooks[name] = self.model.get_submodule(name).register_forward_hook(self._hook(name))

    def _base_heads(self, s: int) -> None:
        for name, (hw, hb) in self.head_stacks.items():
            mod = self.model.get_submodule(name)
            hw[s] = mod.weight.detach().to(hw.dtype)
            if hb is not None:
                hb[s] = mod.bias.detach().to(hb.dtype)

    def _add_head(self, name: str) -> None:
        mod = self.model.get_submodule(name)
        n = self.capacity + 1
        w = mod.weight.detach().to(self.dtype).unsqueeze(0).repeat(n, 1, 1).contiguous()
        b = (
            None
            if mod.bias is None
            else mod.bias.detach().to(self.dtype).unsqueeze(0).repeat(n, 1).contiguous()
        )
        self.head_stacks[name] = (w, b)
        self._hooks[name] = mod.register_forward_hook(self._head_hook(name))

    def _head_hook(self, name: str) -> Any:
        def own_head(_mod: Any, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            idx = self.index
            if idx is None:
                return out
            w, b = self.head_stacks[name]
            x = inputs[0]
            rows = x.shape[0]
            # each row through its own adapter's head (slot 0: the base's): [rows, *, in] @ [rows, in, out]
            y = torch.matmul(
                x.reshape(rows, -1, x.shape[-1]).to(w.dtype), w.index_select(0, idx).transpose(1, 2)
            )
            if b is not None:
                y = y + b.index_select(0, idx)[:, None, :]
            return y.reshape(out.shape).to(out.dtype)

        return own_head

    def _hook(self, name: str) -> Any:
        def add_lora(_mod: Any, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            idx = self.index
            if idx is None:
                return out
            a, b = self.stacks[name]
            x = inputs[0]
            if x.dtype != a.dtype:
                x = x.to(a.dtype)
            mask = self._mask
            if mask is not None:
                # every slot's x @ A at once, each row kept to its own slot's columns; the
                # base's fresh output takes the sum in place (3 ops per module and pass)
                h = torch.matmul(x, a.view(a.shape[0], -1)).mul_(mask[:, None, :])
                bb = b.view(-1, b.shape[2])
                if out.dtype == bb.dtype and out.is_contiguous():
                    out.view(-1, bb.shape[1]).addmm_(h.view(-1, bb.shape[0]), bb)
                    return out
                return out + torch.matmul(h, bb).to(out.dtype)
            # [rows, T, in] @ [rows, in, r] @ [rows, r, out]: each row's own A and B
            ga = a.index_select(1, idx).permute(1, 0, 2)
            delta = torch.matmul(torch.matmul(x, ga), b.index_select(0, idx))
            return out + delta.to(out.dtype)

        return add_lora

    # what the admin sees -----------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name, path in sorted(self.known.items()):
            s = self.slot.get(name)
            out.append(
                {"name": name, "path": path, "resident": s is not None, "rank": self.rank.get(s or -1, 0)}
            )
        return out


def pass_index(slots: list[int], device: torch.device) -> torch.Tensor | None:
    """The hooks' per-row slots for a pass over rows with these slots (None: no adapter row)."""
    if not any(slots):
        return None
    return torch.tensor(slots, dtype=torch.long, device=device)
