"""Fine-tuning: full, LoRA or QLoRA, at fp32 or under bf16/fp16 autocast.

Master weights are always fp32; autocast runs the forward pass in the lower precision, and fp16
adds a GradScaler (bf16 has fp32's range and needs none). QLoRA loads the base in NF4 with
double quantization, computing in the --precision dtype, prepares it for k-bit training and trains LoRA adapters
(plus the task head for classifiers). One code path serves one process and DDP under
`torchrun` / `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoints, data, distributed, tasks
from .errors import CheckpointError, DataError, OptionError
from .versions import versions

log = logging.getLogger(__name__)

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MANIFEST = "finetune.json"
EVAL_FILE = "eval.jsonl"


@dataclass
class FinetuneOptions:
    model: str
    task: str
    data: str
    output: str
    method: str = "full"
    precision: str = "fp32"
    eval: str | None = None
    eval_split: float = 0.1
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 0
    save_every: int = 0
    keep: int = 2
    resume: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    gradient_checkpointing: bool = False
    eval_batch_size: int = 32
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.precision not in PRECISIONS:
            raise OptionError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise OptionError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        for name in ("batch_size", "grad_accum", "epochs", "max_length"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.eval_split < 1.0:
            raise OptionError("--eval-split must be in [0, 1)")


@dataclass
class FinetuneResult:
    output: Path
    steps: int
    losses: list[float]
    eval_metrics: dict[str, float]
    trainable_parameters: int
    total_parameters: int
    peak_memory_bytes: int  # training only: read before eval
    resumed_from: int | None
    labels: list[str] | None
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)
    eval_peak_memory_bytes: int = 0
    skipped_steps: int = 0  # optimizer steps GradScaler skipped (inf/NaN gradients under fp16)
    peak_memory_kind: str = ""  # how peak_memory_bytes was measured (peak_memory_kind())
    train_start_memory_bytes: int | None = None  # RSS (CPU) / allocated (CUDA) as training began

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def autocast_factory(device: torch.device, precision: str) -> Callable[[], Any]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = _DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def finetune(opts: FinetuneOptions) -> FinetuneResult:
    opts.check()
    task = tasks.get(opts.task)
    out = Path(opts.output)
    world = distributed.setup(opts.device)
    try:
        return _finetune(opts, task, out, world)
    finally:
        world.close()


def _finetune(opts: FinetuneOptions, task: tasks.Task, out: Path, world: distributed.World) -> FinetuneResult:
    from transformers import AutoConfig, get_scheduler

    from bitserve.models.loading import load_tokenizer

    started = time.perf_counter()
    reset_peak_memory(world.device)
    _seed_everything(opts.seed)
    if not Path(opts.model).exists():
        raise CheckpointError(f"{opts.model}: no such checkpoint")
    config = AutoConfig.from_pretrained(opts.model)
    task.check_checkpoint(config, opts.model)
    train_set, eval_set = _load_data(opts, task)
    labels = _label_names(task, config, train_set)
    if eval_set is not None and labels:
        task.check_labels(eval_set, {name: i for i, name in enumerate(labels)})
    tokenizer = task.prepare_tokenizer(load_tokenizer(opts.model))
    tokenizer.padding_side = "right"

    model = build_model(opts, task, labels, world.device, pad_token_id=tokenizer.pad_token_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = parameter_count(model)
    log.info("%s fine-tune of %s: %d of %d parameters trainable", opts.method, opts.model, trainable, total)

    features = _features(task, train_set, tokenizer, model.config, opts.max_length)
    per_step = opts.batch_size * world.size * opts.grad_accum
    steps_per_epoch = max(1, len(features) // per_step)
    total_steps = opts.max_steps or opts.epochs * steps_per_epoch

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=opts.lr, weight_decay=opts.weight_decay
    )
    scheduler = get_scheduler(
        opts.schedule,
        optimizer,
        num_warmup_steps=int(opts.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    scaler = torch.amp.GradScaler(world.device.type, enabled=opts.precision == "fp16")
    autocast = autocast_factory(world.device, opts.precision)

    start_step, resumed_from, losses, skipped = 0, None, [], 0
    if opts.resume:
        resumed = checkpoints.load_latest(
            out, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, world=world
        )
        if resumed is None:
            log.warning("--resume: no finished checkpoint under %s; starting at step 0", out)
        else:
            start_step = resumed_from = resumed.step
            state = json.loads((resumed.path / checkpoints.TRAINER_STATE).read_text())
            losses, skipped = state.get("losses", []), state.get("skipped_steps", 0)
            log.info("resumed from %s (step %d of %d)", resumed.path, start_step, total_steps)
    if start_step > total_steps:
        raise CheckpointError(f"{out}: checkpoint step {start_step} is past the last step {total_steps}")

    wrapped = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model, device_ids=[world.device.index] if world.device.type == "cuda" else None
        )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=f"{opts.method}/{opts.precision}",
        disable=not (opts.progress and world.is_main),
        dynamic_ncols=True,
    )
    micro = opts.batch_size
    wrapped.train()
    # The training window starts here: loading, quantizing and tokenizing are behind us.
    peak_resettable = reset_peak_memory(world.device)
    start_memory = (
        int(torch.cuda.memory_allocated(world.device)) if world.device.type == "cuda" else resident_memory()
    )
    for step in range(start_step, total_steps):
        indices = _global_batch(len(features), step, steps_per_epoch, per_step, opts.seed)
        micro_batches = []
        for a in range(opts.grad_accum):
            chunk = indices[a * micro * world.size : (a + 1) * micro * world.size]
            mine = chunk[world.rank * micro : (world.rank + 1) * micro]
            micro_batches.append(task.collate([features[i] for i in mine], tokenizer.pad_token_id))
        # Each micro-batch's mean loss is weighted by its share of the step's targets (tokens or
        # examples) over all ranks, so the step's gradient is that of one big batch however it
        # is split across processes and accumulation (DDP then averages over ranks: * size).
        counts = [task.count_targets(b) for b in micro_batches]
        total_targets = max(world.sum(float(sum(counts))), 1.0)
        step_loss = 0.0
        for a, cpu_batch in enumerate(micro_batches):
            batch = {k: v.to(world.device) for k, v in cpu_batch.items()}
            weight = counts[a] / total_targets
            # Gradients are all-reduced once per optimizer step, not per micro-batch.
            sync = a == opts.grad_accum - 1 or not world.distributed
            with contextlib.nullcontext() if sync else wrapped.no_sync(), autocast():
                loss = micro_batch_loss(wrapped, batch, counts[a])
            scaler.scale(loss * (weight * world.size)).backward()
            step_loss += loss.item() * weight
        scaler.unscale_(optimizer)
        if opts.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], opts.max_grad_norm
            )
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        # GradScaler skips the optimizer step on inf/NaN gradients and lowers its scale; the
        # schedule follows the steps actually taken.
        if scaler.is_enabled() and scaler.get_scale() < scale:
            skipped += 1
        else:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = world.sum(step_loss)
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if opts.save_every and done % opts.save_every == 0 and done < total_steps:
            checkpoints.save(
                out,
                done,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                world=world,
                trainer_state={"losses": losses, "total_steps": total_steps, "skipped_steps": skipped},
                keep=opts.keep,
            )
    bar.close()
    if skipped:
        log.warning("%d of %d optimizer steps skipped by the fp16 GradScaler", skipped, total_steps)
    # Training memory is read before eval: eval holds an fp32 copy of the logits, which is not
    # what the method costs to train.
    train_peak = peak_memory(world.device)

    model.eval()
    metrics: dict[str, float] = {}
    eval_peak = 0
    if world.is_main and eval_set is not None:
        reset_peak_memory(world.device)
        scored = task.evaluate(
            model,
            tokenizer,
            eval_set,
            batch_size=opts.eval_batch_size,
            max_length=opts.max_length,
            autocast=autocast,
        )
        metrics = scored.metrics
        eval_peak = peak_memory(world.device)
        log.info("eval on %d held-out examples: %s", scored.examples, _fmt(metrics))
    result = FinetuneResult(
        output=out,
        steps=total_steps,
        losses=losses,
        eval_metrics=metrics,
        trainable_parameters=trainable,
        total_parameters=total,
        peak_memory_bytes=train_peak,
        resumed_from=resumed_from,
        labels=labels,
        seconds=time.perf_counter() - started,
        eval_peak_memory_bytes=eval_peak,
        skipped_steps=skipped,
        peak_memory_kind=peak_memory_kind(world.device, peak_resettable),
        train_start_memory_bytes=start_memory,
    )
    if world.is_main:
        result.manifest = _save_final(opts, task, model, tokenizer, train_set, eval_set, result, world)
    # Not a collective on the training backend: rank 0's eval and save may outlast NCCL's
    # watchdog, so the other ranks wait on a CPU group with a long timeout.
    world.wait_for_main()
    return result


def as_trained_4bit(model: Any) -> Any:
    """Keep `model`'s 4-bit layers on the kernels training runs, in eval mode too.

    On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit` switches in eval mode without grad to
    an inference kernel that rounds activations, NF4 code values, block scales and outputs to
    bf16, whatever the compute dtype (bitsandbytes 0.50 `backends/cpu/ops.py: gemv_4bit`).
    Training always dequantizes and multiplies in the compute dtype, so an eval on that kernel
    scores another function than the one trained: on the tiny test classifier (largest logit
    5.7) its logits differ from the dequantized merge by 3.3e-3 there, by 9.5e-7 on the
    training kernels (tests/quantize/test_qlora_export.py). The switch is read per layer.
    """
    import bitsandbytes.nn as bnn

    for module in model.modules():
        if isinstance(module, bnn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def build_model(
    opts: FinetuneOptions,
    task: tasks.Task,
    labels: list[str] | None,
    device: torch.device,
    *,
    pad_token_id: int | None = None,
) -> Any:
    """The model to train: fp32 master weights, or an NF4 base for QLoRA; LoRA-wrapped if asked."""
    from transformers import AutoConfig

    from bitserve.models.quantization import bnb_config

    kwargs = task.model_kwargs(labels)
    config = AutoConfig.from_pretrained(opts.model)
    fresh_head = False
    if labels:
        kwargs["ignore_mismatched_sizes"] = True  # a new label count means a new head
        fresh_head = not keeps_head(config, labels)
    if getattr(config, "pad_token_id", None) is None and isinstance(task, tasks.ClassifyTask):
        # A decoder classifier pools at the last non-pad token and refuses batches without a pad
        # id in its config; many Llama-family configs have none (the tokenizer's pad is EOS).
        if pad_token_id is None:
            from bitserve.models.loading import load_tokenizer

            pad_token_id = task.prepare_tokenizer(load_tokenizer(opts.model)).pad_token_id
        kwargs["pad_token_id"] = pad_token_id
    gc_kwargs = {"use_reentrant": False}
    if opts.method == "qlora":
        from peft import prepare_model_for_kbit_training

        compute = _DTYPES[opts.precision]
        # bnb_config keeps the task head in float: it is trained (modules_to_save); 4-bit weights cannot be.
        qc = bnb_config("nf4", compute, double_quant=True)
        model = task.auto_class.from_pretrained(
            opts.model,
            quantization_config=qc,
            device_map={"": device.index if device.type == "cuda" else str(device)},
            dtype=torch.float32,
            **kwargs,
        )
        model = prepare_model_for_kbit_training(
            as_trained_4bit(model),
            use_gradient_checkpointing=opts.gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    else:
        model = task.auto_class.from_pretrained(opts.model, dtype=torch.float32, **kwargs).to(device)
    if fresh_head:
        reinit_head(model)
    if opts.method != "qlora":
        if opts.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            if opts.method == "lora":
                model.enable_input_require_grads()
    if opts.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        targets: str | list[str] = opts.lora_targets
        if targets != "all-linear":
            targets = [t.strip() for t in opts.lora_targets.split(",") if t.strip()]
        model = get_peft_model(
            model,
            LoraConfig(
                task_type=task.peft_task_type,
                r=opts.lora_r,
                lora_alpha=opts.lora_alpha,
                lora_dropout=opts.lora_dropout,
                target_modules=targets,
            ),
        )
    return model


def _load_data(opts: FinetuneOptions, task: tasks.Task) -> tuple[data.Dataset, data.Dataset | None]:
    train_set = data.read(opts.data)
    task.validate(train_set)
    if opts.eval:
        eval_set = data.read(opts.eval)
        task.validate(eval_set)
    elif opts.eval_split > 0:
        stratify = "label" if "label" in task.columns[0] else None
        train_set, eval_set = data.split(train_set, opts.eval_split, opts.seed, stratify=stratify)
    else:
        eval_set = None
    return train_set, eval_set


def _label_names(task: tasks.Task, config: Any, train_set: data.Dataset) -> list[str] | None:
    """Keep the checkpoint's named labels when the data fits them; else the data's, in order
    (numbers by value: "2" before "10")."""
    if "label" not in task.columns[0]:
        return None
    seen = sorted({r.text("label") for r in train_set.records}, key=_label_key)
    existing = _existing_labels(config)
    generic = all(re.fullmatch(r"LABEL_\d+", name) for name in existing)
    if existing and not generic and set(seen) <= set(existing):
        return existing
    return seen


def _label_key(name: str) -> tuple[int, float | str]:
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def _existing_labels(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label)]


def keeps_head(config: Any, labels: list[str]) -> bool:
    """Whether the checkpoint's head rows already mean `labels`, in order.

    True for the checkpoint's own names and for generic `LABEL_i` names with labels "0".."n-1"
    (row i is label i). Otherwise the head was trained for other labels: reusing its rows would
    tie a new label to an unrelated old one, so the head starts afresh.
    """
    existing = _existing_labels(config)
    if existing == labels:
        return True
    generic = [f"LABEL_{i}" for i in range(len(labels))]
    return existing == generic and labels == [str(i) for i in range(len(labels))]


def reinit_head(model: Any) -> None:
    """Re-initialise the classification head (the modules that map hidden states to labels)."""
    from bitserve.models.quantization import HEAD_MODULES

    std = getattr(model.config, "initializer_range", None) or 0.02
    with torch.no_grad():
        for name, module in model.named_children():
            if name not in HEAD_MODULES:
                continue
            for m in module.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.normal_(0.0, std)
                    if m.bias is not None:
                        m.bias.zero_()


def _global_batch(n: int, step: int, steps_per_epoch: int, size: int, seed: int) -> list[int]:
    """The example indices of one optimizer step, the same on every rank and after a resume.

    Each epoch is a seeded permutation; a batch that runs past the end wraps around, so every
    rank always gets a full micro-batch (DDP needs equal work per rank).
    """
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return [order[(within * size + i) % n] for i in range(size)]


def _save_final(
    opts: FinetuneOptions,
    task: tasks.Task,
    model: Any,
    tokenizer: Any,
    train_set: data.Dataset,
    eval_set: data.Dataset | None,
    result: FinetuneResult,
    world: distributed.World,
) -> dict[str, Any]:
    """Model (full) or adapter (LoRA) + tokenizer + manifest, each file moved in atomically."""
    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if eval_set is not None:
        data.write_jsonl(eval_set, tmp / EVAL_FILE)
    manifest = {
        "kind": "bitserve-finetune",
        "task": task.name,
        "base_model": str(Path(opts.model).resolve()),
        "method": opts.method,
        "precision": opts.precision,
        "labels": result.labels,
        "data": str(Path(opts.data).resolve()),
        "data_sha256": data.sha256(opts.data, opts.eval),
        "train_examples": len(train_set),
        "eval_examples": len(eval_set) if eval_set is not None else 0,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "losses": result.losses,
        "eval_metrics": result.eval_metrics,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "peak_memory_bytes": result.peak_memory_bytes,
        "eval_peak_memory_bytes": result.eval_peak_memory_bytes,
        "peak_memory_kind": result.peak_memory_kind,
        "train_start_memory_bytes": result.train_start_memory_bytes,
        "skipped_steps": result.skipped_steps,
        "world_size": world.size,
        "device": world.device.type,
        "seconds": round(result.seconds, 2),
        "options": asdict(opts),
        "versions": versions(),
    }
    # The manifest goes last: a directory with finetune.json holds a complete result.
    (out / MANIFEST).unlink(missing_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    tmp_manifest = out / f".{MANIFEST}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp_manifest, out / MANIFEST)
    log.info("saved %s model to %s", opts.method, out)
    return manifest


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last `reset_peak_memory`.

    CUDA: the caching allocator's `max_memory_allocated`. CPU on Linux: the kernel's resident-set
    high-water mark `VmHWM` (/proc/self/status), which `reset_peak_memory` lowers to the current
    RSS, so the peak counts what stays resident (weights, optimizer state) plus what the window
    adds, not what loading touched before it. Elsewhere: `ru_maxrss`, a process-lifetime peak
    that cannot be reset (it includes loading)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if _is_macos() else 1024)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak window; whether the CPU peak could be reset (Linux) - always on CUDA.

    CPU: garbage is collected and glibc's `malloc_trim(0)` hands freed heap pages back to the
    kernel first (memory loading freed but the allocator kept would otherwise count as
    resident), then "5" written to /proc/self/clear_refs resets `VmHWM` to the current RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    import gc

    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_memory_kind(device: torch.device, resettable: bool) -> str:
    """What `peak_memory` measured, in words (recorded next to the number)."""
    if device.type == "cuda":
        return "cuda max_memory_allocated during training"
    if resettable and _proc_status_bytes("VmHWM") is not None:
        return "peak RSS during training (VmHWM reset via /proc/self/clear_refs after malloc_trim)"
    return "process-lifetime peak RSS (ru_maxrss; includes loading)"


def resident_memory() -> int | None:
    """The process's current RSS in bytes (Linux), else None."""
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _is_macos() -> bool:
    import sys

    return sys.platform == "darwin"  # ru_maxrss is bytes there, KiB on Linux


def parameter_count(model: Any) -> int:
    """Logical parameter count: a 4-bit weight stores two values per byte (`Params4bit.numel()`
    counts bytes), so it counts twice."""
    return sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())


def micro_batch_loss(model: Any, batch: dict[str, torch.Tensor], targets: int) -> torch.Tensor:
    """The micro-batch's mean loss; 0 (with zero gradients, still through every parameter, as
    DDP needs) for a batch with no targets, whose mean would be 0/0 = NaN."""
    out = model(**batch)
    if targets == 0:
        return out.logits.sum() * 0.0
    return out.loss


def _features(
    task: tasks.Task, dataset: data.Dataset, tokenizer: Any, config: Any, max_length: int
) -> list[dict[str, Any]]:
    """Encoded training examples; those with nothing to learn within `max_length` are dropped,
    and both drops and cut completions are counted in a warning."""
    features, dropped, cut = [], 0, 0
    for r in dataset.records:
        f = task.encode(r, tokenizer, config, max_length)
        one = task.collate([f], tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        if task.count_targets(one) == 0:
            dropped += 1
            continue
        cut += task.cut(r, tokenizer, max_length)
        features.append(f)
    n = len(dataset)
    if not features:
        raise DataError(
            dataset.path, f"0 of {n} examples have a target token within --max-length {max_length}"
        )
    if dropped:
        log.warning(
            "%d of %d examples have no target token within --max-length %d: dropped", dropped, n, max_length
        )
    if cut:
        log.warning(
            "%d of %d examples: the completion is cut at --max-length %d (its end and EOS are not learned)",
            cut,
            n,
            max_length,
        )
    return features


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if not math.isnan(v))
