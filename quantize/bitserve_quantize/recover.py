"""Quantization-aware recovery: keep the base quantized, train a LoRA adapter that removes the error.

The student is the float checkpoint loaded as the server loads it at `--quantize` (nf4, fp4 or
int8 through bitsandbytes, the same `bnb_config`), plus a LoRA adapter on its linear layers; the
teacher is the float checkpoint itself. The adapter is trained to match the teacher's next-token
distribution on general text: the loss is KL(teacher || student) of the two softmaxes, per token
(at a temperature T, times T^2), on packed blocks of `--max-length` tokens. Before training the
adapter may start from LoftQ's decomposition of each layer's quantization residual (W - Q(W): its
best rank-r approximation by SVD, as peft's `replace_lora_weights_loftq` computes it; peft's own
function hard-codes a CUDA device, so it is computed here on the model's device).

The output is a peft adapter directory (adapter_config.json + adapter_model.safetensors) that
serves on the quantized base, unmerged: a model entry with `quantize: <mode>` and
`adapters: {recovered: <output>}`, `default_adapter: recovered` (written as `serve.yaml`).

    quantize recover --model CKPT --quantize nf4 --data pydoc --steps 200 --lora-r 16 --output DIR

`--data pydoc` is the Python language reference that ships with every Python (`pydoc_data.topics`):
general English prose and code, offline, and no part of any eval set here; any .jsonl/.csv file
with a `text` column works too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import data
from .errors import CheckpointError, DataError, OptionError
from .versions import versions

log = logging.getLogger(__name__)

RECOVER_MODES = ("nf4", "fp4", "int8")
STUDENTS = ("auto", "dequantized", "quantized")
INITS = ("loftq", "zero")  # zero: peft's default (B = 0, the adapter starts as the quantized base)
BUILTIN_DATA = ("pydoc",)
MANIFEST = "recover.json"
SNIPPET = "serve.yaml"
ADAPTER_NAME = "recovered"


@dataclass
class RecoverOptions:
    model: str
    output: str
    quantize: str = "nf4"
    data: str = "pydoc"
    steps: int = 200
    batch_size: int = 4
    max_length: int = 128
    lr: float = 5e-4
    warmup_ratio: float = 0.05
    lora_r: int = 16
    lora_alpha: int = 16
    lora_targets: str = "all-linear"
    init: str = "loftq"
    student: str = "auto"  # auto: dequantized for nf4/fp4, quantized for int8 (see train_student)
    temperature: float = 1.0
    eval_blocks: int = 4  # held-out blocks of the data on which KL to the teacher is reported
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        if self.quantize not in RECOVER_MODES:
            raise OptionError(
                f"--quantize must be one of {', '.join(RECOVER_MODES)} (a quantized base to recover), "
                f"not {self.quantize!r}"
            )
        if self.student not in STUDENTS:
            raise OptionError(f"--student must be one of {', '.join(STUDENTS)}, not {self.student!r}")
        if self.student == "dequantized" and self.quantize == "int8":
            raise OptionError(
                "--student dequantized: int8 (LLM.int8) also quantizes the activations, so a float "
                "model with dequantized weights is another function; use --student quantized"
            )
        if self.init not in INITS:
            raise OptionError(f"--init must be one of {', '.join(INITS)}, not {self.init!r}")
        for name in ("steps", "batch_size", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.max_length < 2:
            raise OptionError(
                f"--max-length must be at least 2 (a next token to predict), not {self.max_length}"
            )
        if self.eval_blocks < 0:
            raise OptionError(f"--eval-blocks must be 0 or more, not {self.eval_blocks}")
        if not self.lr > 0:
            raise OptionError(f"--lr must be positive, not {self.lr}")
        if not self.temperature > 0:
            raise OptionError(f"--temperature must be positive, not {self.temperature}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise OptionError(f"--warmup-ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.data not in BUILTIN_DATA and not Path(self.data).is_file():
            raise OptionError(
                f"--data: {self.data!r} is neither a file nor a built-in text ({', '.join(BUILTIN_DATA)})"
            )
        if not (Path(self.model) / "config.json").is_file():
            raise CheckpointError(f"--model: {self.model}: no checkpoint there (config.json missing)")


def pydoc_texts() -> list[str]:
    """The Python language reference's topics (pydoc_data.topics, shipped with CPython)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def texts(source: str) -> list[str]:
    if source == "pydoc":
        return pydoc_texts()
    ds = data.read(source)
    return [r.text("text") for r in ds.records]


def blocks(tokenizer: Any, corpus: list[str], length: int) -> torch.Tensor:
    """The texts tokenized, joined with EOS, and cut into [N, length] blocks (no padding)."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for t in corpus:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    n = len(ids) // length
    if n == 0:
        raise DataError("--data", f"{len(ids)} tokens: fewer than one block of --max-length {length}")
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of softmax(logits / T), times T^2."""
    v = student_logits.shape[-1]
    t = torch.log_softmax(teacher_logits.float().view(-1, v) / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float().view(-1, v) / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def load_student(path: str, mode: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The checkpoint quantized at `mode` as the server loads it (bitserve.models.loading)."""
    from transformers import AutoModelForCausalLM

    from bitserve.models.quantization import bnb_config

    from .train import as_trained_4bit

    place = device.index if device.type == "cuda" and device.index is not None else str(device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=bnb_config(mode, dtype), device_map={"": place}
    )
    for p in model.parameters():
        p.requires_grad_(False)
    return as_trained_4bit(model)


def train_student(quantized: Any, teacher: Any, kind: str) -> Any:
    """The model the adapter trains on. "quantized": the bitsandbytes model itself. "dequantized"
    (4-bit only): a float copy of the teacher whose quantized linears hold the weights the
    bitsandbytes layers compute with, dequantize_4bit(W_q) - the same function, since a 4-bit
    layer's training forward (and its eval forward on a CPU without AVX512-BF16, and on CUDA)
    dequantizes the weight to the compute dtype and multiplies in it - without dequantizing every
    weight again on every forward and backward (on 2 CPU cores nf4 forward passes take ~2.7x
    the float ones)."""
    import copy

    if kind == "quantized":
        return quantized
    student = copy.deepcopy(teacher)
    layers = dict(student.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if name in layers and module is not None and type(module).__name__ in ("Linear4bit",):
                target = layers[name]
                target.weight.copy_(dequantized_weight(module).to(target.weight.dtype))
    for p in student.parameters():
        p.requires_grad_(False)
    return student


def dequantized_weight(layer: Any) -> torch.Tensor:
    """The float weight a bitsandbytes layer computes with ([out, in], fp32)."""
    import bitsandbytes as bnb

    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scb: Any = getattr(w, "SCB", None)
        if scb is None:
            scb = layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scb).float()
    return w.detach().float()


def loftq_init(student: Any, teacher: Any, adapter: str = "default") -> int:
    """Set each LoRA pair to the best rank-r approximation of its layer's quantization residual
    (W_float - dequant(Q(W))), so base + adapter starts closer to the float model. Returns the
    number of layers initialised."""
    float_weights = {n: m.weight for n, m in teacher.named_modules() if isinstance(m, torch.nn.Linear)}
    done = 0
    for name, module in student.named_modules():
        if not hasattr(module, "lora_A") or adapter not in getattr(module, "lora_A", {}):
            continue
        key = name.removeprefix("base_model.model.")
        if key not in float_weights:
            continue
        base = module.get_base_layer()
        residual = float_weights[key].detach().float().to(base.weight.device) - dequantized_weight(base)
        r = module.r[adapter]
        # The top-r singular triplets by randomized SVD (Halko et al.; r + 16 columns, 4 power
        # iterations): on 2 CPU cores a full SVD of each of SmolLM2's 210 matrices takes minutes.
        u, s, v = torch.svd_lowrank(residual, q=min(r + 16, *residual.shape), niter=4)
        root = s[:r].sqrt()
        a = root[:, None] * v[:, :r].T  # [r, in]
        b = u[:, :r] * root[None, :] / module.scaling[adapter]  # [out, r]: the forward scales by alpha/r
        a_w, b_w = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        a_w.data = a.to(a_w.dtype)
        b_w.data = b.to(b_w.dtype)
        done += 1
    return done


@torch.no_grad()
def mean_kl(
    teacher_logits: list[torch.Tensor], student: Any, batches: list[torch.Tensor], device: torch.device
) -> float:
    """Token-weighted mean KL(teacher || student) over `batches`, the teacher's logits given."""
    was = student.training
    student.eval()
    total, count = 0.0, 0
    for t, b in zip(teacher_logits, batches, strict=True):
        ids = b.to(device)
        total += kl_loss(t, student(input_ids=ids).logits, 1.0).item() * ids.numel()
        count += ids.numel()
    student.train(was)
    return total / max(count, 1)


def serve_snippet(model: str, mode: str, adapter_dir: Path, name: str = "") -> str:
    """A bitserve model entry serving the quantized base with the recovered adapter by default."""
    entry = name or f"{Path(model).name}-{mode}"
    return (
        "models:\n"
        f"  - name: {entry}\n"
        "    task: generate\n"
        f"    path: {Path(model).resolve()}\n"
        f"    quantize: {mode}\n"
        "    adapters:\n"
        f"      {ADAPTER_NAME}: {adapter_dir.resolve()}\n"
        f"    default_adapter: {ADAPTER_NAME}\n"
    )


def adapter_bytes(adapter_dir: str | Path) -> int:
    """Bytes of an adapter's weights as the server holds them (its tensors, at their dtype)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            n = 1
            for d in t.get_shape():
                n *= d
            total += n * _itemsize(t.get_dtype())
    return total


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1}.get(dtype, 4)


def recover(opts: RecoverOptions) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    from bitserve.models.loading import load_tokenizer, resolve_device, resolve_dtype

    opts.check()
    started = time.perf_counter()
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    device = resolve_device(opts.device)
    dtype = resolve_dtype("auto", device)
    tokenizer = load_tokenizer(opts.model)
    all_blocks = blocks(tokenizer, texts(opts.data), opts.max_length)
    order = torch.randperm(len(all_blocks), generator=torch.Generator().manual_seed(opts.seed))
    held = min(opts.eval_blocks, max(len(all_blocks) - 1, 0))
    eval_blocks, train_blocks = all_blocks[order[:held]], all_blocks[order[held:]]
    log.info("%d training blocks of %d tokens (%d held out)", len(train_blocks), opts.max_length, held)

    teacher: Any = AutoModelForCausalLM.from_pretrained(opts.model, dtype=dtype)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    kind = (
        opts.student
        if opts.student != "auto"
        else ("quantized" if opts.quantize == "int8" else "dequantized")
    )
    quantized = load_student(opts.model, opts.quantize, device, dtype)
    student = train_student(quantized, teacher, kind)
    if student is not quantized:
        del quantized
    targets: str | list[str] = opts.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in opts.lora_targets.split(",") if t.strip()]
    student = get_peft_model(
        student,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=opts.lora_r,
            lora_alpha=opts.lora_alpha,
            lora_dropout=0.0,
            target_modules=targets,
        ),
    )
    eval_batches = [eval_blocks[i : i + opts.batch_size] for i in range(0, held, opts.batch_size)]
    with torch.no_grad():
        teacher_eval = [teacher(input_ids=b.to(device)).logits for b in eval_batches]
    kl_quantized = mean_kl(teacher_eval, student, eval_batches, device) if held else math.nan
    torch.manual_seed(opts.seed)  # svd_lowrank's random projections
    initialised = loftq_init(student, teacher) if opts.init == "loftq" else 0
    kl_init = mean_kl(teacher_eval, student, eval_batches, device) if held else math.nan
    at_init = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    log.info(
        "held-out KL to the teacher: quantized %.5f, after %s init %.5f", kl_quantized, opts.init, kl_init
    )

    params = [p for p in student.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=int(opts.warmup_ratio * opts.steps),
        num_training_steps=opts.steps,
    )
    from tqdm.auto import tqdm

    bar = tqdm(
        total=opts.steps, desc=f"recover/{opts.quantize}", disable=not opts.progress, dynamic_ncols=True
    )
    losses: list[float] = []
    n = len(train_blocks)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed + 1))
    train_started = time.perf_counter()
    student.train()
    for step in range(opts.steps):
        idx = torch.stack([perm[(step * opts.batch_size + i) % n] for i in range(opts.batch_size)])
        ids = train_blocks[idx].to(device)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        loss = kl_loss(t_logits, student(input_ids=ids).logits, opts.temperature)
        loss.backward()
        if opts.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 6))
        bar.update(1)
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    bar.close()
    train_seconds = time.perf_counter() - train_started
    kl_after = mean_kl(teacher_eval, student, eval_batches, device) if held else math.nan
    kept = "trained"
    if kl_after > kl_init:  # training moved away from the teacher on held-out text (lr too high?)
        log.warning(
            "held-out KL rose in training (%.5f -> %.5f): keeping the %s-init adapter",
            kl_init,
            kl_after,
            opts.init,
        )
        with torch.no_grad():
            for name, param in student.named_parameters():
                if name in at_init:
                    param.copy_(at_init[name])
        kept = "init"
    log.info("held-out KL to the teacher after %d steps: %.5f", opts.steps, kl_after)

    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    student.peft_config["default"].base_model_name_or_path = str(Path(opts.model).resolve())
    student.save_pretrained(str(out), safe_serialization=True)
    snippet = serve_snippet(opts.model, opts.quantize, out)
    (out / SNIPPET).write_text(snippet)
    summary = {
        "kind": "bitserve-recover",
        "output": str(out),
        "base_model": str(Path(opts.model).resolve()),
        "quantize": opts.quantize,
        "data": opts.data,
        "data_sha256": data.sha256(opts.data) if opts.data not in BUILTIN_DATA else None,
        "train_blocks": len(train_blocks),
        "eval_blocks": held,
        "tokens_seen": opts.steps * opts.batch_size * opts.max_length,
        "steps": opts.steps,
        "init": opts.init,
        "student": kind,
        "loftq_layers": initialised,
        "kl_quantized": kl_quantized,
        "kl_init": kl_init,
        "kl_trained": kl_after,
        "kept": kept,
        "kl_recovered": min(kl_after, kl_init) if held else math.nan,
        "final_loss": losses[-1] if losses else math.nan,
        "losses": losses,
        "trainable_parameters": trainable,
        "adapter_bytes": adapter_bytes(out),
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "device": device.type,
        "config": snippet,
        "options": asdict(opts),
        "versions": versions(),
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / MANIFEST)
    log.info("recovered adapter saved to %s; serve it with:\n%s", out, snippet)
    return summary
