"""Quality report: one checkpoint, the same data, each precision.

For every quantization mode the checkpoint is loaded through `bitserve.models.loading.load_checkpoint`
(exactly as the server loads it), scored with the task's metric, and measured for weight memory
and throughput. The result is `quality.json` (which the server shows in ListModels) and a PNG
chart beside it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitserve.models import quantization

from . import data, tasks
from .errors import OptionError
from .versions import versions

log = logging.getLogger(__name__)

QUALITY = "quality.json"
CHART = "quality.png"


COMPUTE_DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class QuantOptions:
    """How a mode is applied, beyond the mode itself (the server's defaults when unchanged)."""

    compute_dtype: str = "auto"  # 4-bit matmul dtype; auto: the load dtype (fp32 CPU, bf16 CUDA)
    double_quant: bool = True  # 4-bit: quantize the block scales too
    skip_modules: tuple[str, ...] = ()  # kept unquantized, beside the task heads

    @property
    def is_default(self) -> bool:
        return self == QuantOptions()

    def check(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise OptionError(
                f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {self.compute_dtype!r}"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "compute_dtype": self.compute_dtype,
            "double_quant": self.double_quant,
            "skip_modules": list(self.skip_modules),
        }


@dataclass
class ReportOptions:
    model: str
    data: str
    modes: tuple[str, ...] = ("none", "int8", "nf4", "fp4")
    task: str | None = None
    output: str | None = None  # default: the model directory
    batch_size: int = 32
    max_length: int = 256
    device: str = "auto"
    chart: bool = True
    compute_dtype: str = "auto"
    double_quant: bool = True
    skip_modules: tuple[str, ...] = ()

    @property
    def quant(self) -> QuantOptions:
        return QuantOptions(self.compute_dtype, self.double_quant, tuple(self.skip_modules))


def report(opts: ReportOptions) -> dict[str, Any]:
    from transformers import AutoConfig

    for m in opts.modes:
        if m not in quantization.MODES:
            raise OptionError(
                f"--quantize: unknown mode {m!r}; expected some of {', '.join(quantization.MODES)}"
            )
    opts.quant.check()
    config = AutoConfig.from_pretrained(opts.model)
    task = resolve_task(opts.task, config, opts.model)
    dataset = data.read(opts.data)
    task.validate(dataset)
    modes = _modes_for(config, opts.modes, opts.model)
    if quantization.mode_of(config) != "none" and not opts.quant.is_default:
        raise OptionError(
            f"{opts.model}: checkpoint is saved quantized; its quantization options are fixed "
            "(drop --compute-dtype/--no-double-quant/--skip-modules)"
        )
    results = [
        evaluate(
            opts.model,
            task,
            dataset,
            m,
            batch_size=opts.batch_size,
            max_length=opts.max_length,
            device=opts.device,
            quant=opts.quant,
        )
        for m in modes
    ]
    doc = document(task, opts.model, dataset, results)
    doc["max_length"] = opts.max_length
    write(Path(opts.output or opts.model), doc, chart=opts.chart)
    return doc


def resolve_task(name: str | None, config: Any, path: str) -> tasks.Task:
    task = tasks.get(name) if name else tasks.infer(config, path)
    task.check_checkpoint(config, path)
    return task


def _modes_for(config: Any, modes: tuple[str, ...], path: str) -> tuple[str, ...]:
    """A checkpoint saved quantized can only be measured at its own precision."""
    saved = quantization.mode_of(config)
    if saved == "none":
        return modes
    others = [m for m in modes if m not in ("none", saved)]
    if others and modes != ReportOptions.modes:
        raise OptionError(
            f"{path}: checkpoint is saved as {saved}; it can only be reported at {saved}, not {', '.join(others)}"
        )
    return (saved,)


def evaluate(
    path: str,
    task: tasks.Task,
    dataset: data.Dataset,
    mode: str,
    *,
    batch_size: int,
    max_length: int,
    device: str = "auto",
    quant: QuantOptions | None = None,
    adapter: str | None = None,
) -> dict[str, Any]:
    """Load `path` at `mode` as the server would and score it on `dataset`; with `adapter`, a
    peft LoRA directory applied unmerged (peft's PeftModel) on that base, its weights counted in
    `memory_bytes`."""
    quant = quant or QuantOptions()
    loaded = load(path, task, mode, device, quant)
    extra = 0
    if adapter is not None:
        from peft import PeftModel

        from .recover import adapter_bytes

        loaded.model = PeftModel.from_pretrained(loaded.model, adapter).eval()
        extra = adapter_bytes(adapter)
    tokenizer = task.prepare_tokenizer(loaded.tokenizer)
    tokenizer.padding_side = "right"
    scored = task.evaluate(
        loaded.model,
        tokenizer,
        dataset,
        batch_size=batch_size,
        max_length=max_length,
        autocast=contextlib.nullcontext,
    )
    log.info("%s at %s: %s", path, mode, ", ".join(f"{k}={v:.4f}" for k, v in scored.metrics.items()))
    row = {
        "quantize": mode,
        **{k: round(v, 6) for k, v in scored.metrics.items()},
        "memory_bytes": loaded.memory_bytes + extra,
        "examples_per_s": round(scored.examples_per_s, 3),
        "seconds": round(scored.seconds, 3),
        "device": loaded.device.type,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "max_length": max_length,
    }
    if mode != "none" and not quant.is_default:
        row.update(quant.describe())
    if adapter is not None:
        row.update(adapter=str(adapter), base_memory_bytes=loaded.memory_bytes, adapter_bytes=extra)
    del loaded
    return row


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any
    memory_bytes: int


def load(path: str, task: tasks.Task, mode: str, device: str, quant: QuantOptions) -> Loaded:
    """The checkpoint at `mode`: through the server's loader for the server's defaults; with
    other quantization options, the same load with those options in the bitsandbytes config."""
    from bitserve.models.loading import load_checkpoint, load_tokenizer, resolve_device, resolve_dtype

    if mode == "none" or quant.is_default or quantization.mode_of(_config(path)) != "none":
        lm = load_checkpoint(path, task.auto_class, quantize=mode, dtype="auto", device=device)
        return Loaded(lm.model, lm.tokenizer, lm.device, lm.dtype, lm.memory_bytes)
    import torch

    dev = resolve_device(device)
    dtype = resolve_dtype("auto", dev)
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    compute = named.get(quant.compute_dtype, dtype)
    qc = quantization.bnb_config(
        mode, compute, double_quant=quant.double_quant, skip_modules=quant.skip_modules
    )
    place = dev.index if dev.type == "cuda" and dev.index is not None else str(dev)
    model = task.auto_class.from_pretrained(path, dtype=dtype, quantization_config=qc, device_map={"": place})
    model.eval()
    return Loaded(model, load_tokenizer(path), dev, dtype, int(model.get_memory_footprint()))


def _config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def document(
    task: tasks.Task, model: str, dataset: data.Dataset, results: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "schema": 1,
        "task": task.name,
        "model": str(Path(model).resolve()),
        "data": dataset.path,
        "data_sha256": data.sha256(dataset.path) if Path(dataset.path).is_file() else None,
        "examples": len(dataset),
        "primary_metric": task.primary_metric,
        "higher_is_better": task.higher_is_better,
        "results": results,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write(directory: Path, doc: dict[str, Any], *, chart: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{QUALITY}.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, directory / QUALITY)
    if chart and doc["results"]:
        plot(doc, directory / CHART)
    return directory / QUALITY


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    modes = [r["quantize"] for r in rows]
    metric = doc["primary_metric"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    panels = [
        (metric, [r.get(metric, float("nan")) for r in rows]),
        ("weight memory (MiB)", [r["memory_bytes"] / 2**20 for r in rows]),
        ("throughput (examples/s)", [r["examples_per_s"] for r in rows]),
    ]
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(modes, values, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][: len(modes)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{Path(doc['model']).name}: {doc['task']} on {doc['examples']} examples", fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
