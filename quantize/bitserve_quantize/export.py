"""Export: merge LoRA adapters into the base, quantize, save a checkpoint the server loads as is.

Merging into a 4-bit base would need dequantizing it, so the base is always reloaded in fp32,
the adapter applied and merged there, and the merged model quantized at the end by loading it
through `bitserve.loading.load_checkpoint` (the server's own path) and saving that. The output
directory is built beside the destination and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitserve import quantization

from . import data, report, tasks
from .errors import CheckpointError, DataError, OptionError
from .train import EVAL_FILE
from .train import MANIFEST as FINETUNE_MANIFEST
from .versions import versions

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class ExportOptions:
    model: str
    output: str
    adapter: str | None = None
    quantize: str = "none"
    task: str | None = None
    data: str | None = None  # report data; default: the fine-tune's held-out eval.jsonl
    report: bool = True
    batch_size: int = 32
    max_length: int = 256
    device: str = "auto"


@dataclass
class _Source:
    base: str
    adapter: str | None
    finetune: dict[str, Any]
    tokenizer_dir: str


def export(opts: ExportOptions) -> dict[str, Any]:
    from transformers import AutoConfig

    if opts.quantize not in quantization.MODES:
        raise OptionError(f"--quantize must be one of {', '.join(quantization.MODES)}, not {opts.quantize!r}")
    src = _resolve(opts)
    config = AutoConfig.from_pretrained(src.base)
    if quantization.mode_of(config) != "none":
        raise CheckpointError(
            f"{src.base}: already quantized ({quantization.mode_of(config)}); export from an fp checkpoint"
        )
    task = report.resolve_task(opts.task or src.finetune.get("task"), config, src.base)
    out = Path(opts.output)
    staging = out.parent / f".{out.name}.merged.tmp"
    tmp = out.parent / f".{out.name}.tmp"
    for d in (staging, tmp):
        shutil.rmtree(d, ignore_errors=True)
    try:
        _merge(src, task, staging)
        if opts.quantize == "none":
            shutil.copytree(staging, tmp)
        else:
            _quantize(staging, task, opts.quantize, tmp, opts.device)
        quality = _report(opts, src, task, staging, tmp)
        manifest = _manifest(opts, src, task, quality)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace(tmp, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s) to %s", src.adapter or src.base, opts.quantize, out)
    return manifest


def _resolve(opts: ExportOptions) -> _Source:
    """Work out base and adapter from `--model` / `--adapter` and any fine-tune manifest."""
    model = Path(opts.model)
    if not model.exists():
        raise CheckpointError(f"{model}: no such checkpoint")
    adapter = Path(opts.adapter) if opts.adapter else None
    if adapter is None and (model / "adapter_config.json").is_file():
        adapter = model  # `--model` is a LoRA fine-tune output: its base is recorded inside
    finetune: dict[str, Any] = {}
    for d in (adapter, model):
        if d is not None and (d / FINETUNE_MANIFEST).is_file():
            finetune = json.loads((d / FINETUNE_MANIFEST).read_text())
            break
    if adapter is None:
        return _Source(str(model), None, finetune, str(model))
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter}: no adapter_config.json; not a LoRA adapter directory")
    if adapter == model:
        base = finetune.get("base_model") or json.loads((adapter / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        if not base or not Path(base).exists():
            raise CheckpointError(
                f"{adapter}: base model {base!r} not found; pass --model BASE --adapter {adapter}"
            )
    else:
        base = str(model)
    tok = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    return _Source(str(base), str(adapter), finetune, str(tok))


def _merge(src: _Source, task: tasks.Task, dest: Path) -> None:
    """fp32 base (+ adapter, merged) saved as safetensors in `dest`."""
    from bitserve.loading import load_tokenizer

    labels = src.finetune.get("labels")
    kwargs = task.model_kwargs(labels)
    if labels:
        kwargs["ignore_mismatched_sizes"] = True
    model = task.auto_class.from_pretrained(src.base, dtype=torch.float32, **kwargs)
    if src.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, src.adapter).merge_and_unload()
    model.save_pretrained(dest, safe_serialization=True)
    load_tokenizer(src.tokenizer_dir).save_pretrained(dest)


def _quantize(merged: Path, task: tasks.Task, mode: str, dest: Path, device: str) -> None:
    from bitserve.loading import load_checkpoint

    loaded = load_checkpoint(str(merged), task.auto_class, quantize=mode, dtype="auto", device=device)
    loaded.model.save_pretrained(dest, safe_serialization=True)
    loaded.tokenizer.save_pretrained(dest)


def _report(
    opts: ExportOptions, src: _Source, task: tasks.Task, merged: Path, exported: Path
) -> dict[str, Any]:
    """quality.json beside the checkpoint: the unquantized merge and the export, same data."""
    candidates = (
        [opts.data] if opts.data else [str(Path(d) / EVAL_FILE) for d in (src.adapter, src.base) if d]
    )
    path = next((p for p in candidates if p and Path(p).is_file()), None)
    if opts.data and path is None:
        raise DataError(opts.data, "no such file")
    if not opts.report or path is None:
        log.warning("no report data (pass --data); quality.json records memory only")
        rows = [_memory_only(exported, task, opts.quantize, opts.device)]
        doc = report.document(task, str(exported), data.Dataset("", []), rows)
        doc["model"] = str(Path(opts.output).resolve())
        report.write(exported, doc, chart=False)
        return doc
    dataset = data.read(path)
    task.validate(dataset)
    rows = []
    if opts.quantize != "none":
        rows.append(
            report.evaluate(
                str(merged),
                task,
                dataset,
                "none",
                batch_size=opts.batch_size,
                max_length=opts.max_length,
                device=opts.device,
            )
        )
    rows.append(
        report.evaluate(
            str(exported),
            task,
            dataset,
            opts.quantize,
            batch_size=opts.batch_size,
            max_length=opts.max_length,
            device=opts.device,
        )
    )
    doc = report.document(task, str(exported), dataset, rows)
    doc["model"] = str(Path(opts.output).resolve())
    report.write(exported, doc)
    return doc


def _memory_only(path: Path, task: tasks.Task, mode: str, device: str) -> dict[str, Any]:
    from bitserve.loading import load_checkpoint

    loaded = load_checkpoint(str(path), task.auto_class, quantize=mode, device=device)
    return {"quantize": mode, "memory_bytes": loaded.memory_bytes, "examples_per_s": 0.0}


def _manifest(opts: ExportOptions, src: _Source, task: tasks.Task, quality: dict[str, Any]) -> dict[str, Any]:
    ft = src.finetune
    return {
        "kind": "bitserve-export",
        "task": task.name,
        "base_model": str(Path(ft.get("base_model") or src.base).resolve()),
        "adapter": str(Path(src.adapter).resolve()) if src.adapter else None,
        "method": ft.get("method", "none"),
        "precision": ft.get("precision"),
        "quantize": opts.quantize,
        "labels": ft.get("labels"),
        "data_sha256": ft.get("data_sha256"),
        "finetune_metrics": ft.get("eval_metrics", {}),
        "quality": {
            r["quantize"]: {k: v for k, v in r.items() if k != "quantize"} for r in quality["results"]
        },
        "versions": versions(),
    }


def _replace(tmp: Path, out: Path) -> None:
    """Swap the finished export into place; the old one is removed only after the swap."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
