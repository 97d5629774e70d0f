"""Export: merge LoRA adapters into the base, quantize, save a checkpoint the server loads as is.

The adapter is merged into a float base: the fp32 checkpoint, or (the default for a QLoRA
fine-tune) the NF4 weights it was trained against, dequantized, so the merged model is the
trained one. A QLoRA export also reports the as-trained model (NF4 base + adapter) beside the
merge. The merged model is quantized at the end by loading it through
`bitserve.models.loading.load_checkpoint` (the server's own path) and saving that. The output
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

from bitserve.models import quantization

from . import data, report, tasks
from .errors import CheckpointError, DataError, OptionError
from .report import QuantOptions
from .train import EVAL_FILE, as_trained_4bit
from .train import MANIFEST as FINETUNE_MANIFEST
from .versions import versions

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MERGE_BASES = ("auto", "fp32", "dequantized")
AS_TRAINED = "qlora-as-trained"  # the report row of the NF4 base + adapter


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
    max_length: int | None = None  # default: the fine-tune's, so both evals see the same inputs
    device: str = "auto"
    merge_base: str = "auto"  # fp32 | dequantized (NF4 weights, as QLoRA trained) | auto
    compute_dtype: str = "auto"  # 4-bit matmul dtype saved in the export's config
    double_quant: bool = True
    skip_modules: tuple[str, ...] = ()  # kept unquantized in the export, beside the task heads

    @property
    def quant(self) -> QuantOptions:
        return QuantOptions(self.compute_dtype, self.double_quant, tuple(self.skip_modules))


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
    if opts.merge_base not in MERGE_BASES:
        raise OptionError(f"--merge-base must be one of {', '.join(MERGE_BASES)}, not {opts.merge_base!r}")
    opts.quant.check()
    src = _resolve(opts)
    merge_base = _merge_base(opts, src)
    max_length = opts.max_length or (src.finetune.get("options") or {}).get("max_length") or 256
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
        _merge(src, task, staging, merge_base)
        if opts.quantize == "none":
            shutil.copytree(staging, tmp)
        else:
            _quantize(staging, task, opts.quantize, tmp, opts.device, opts.quant)
        quality = _report(opts, src, task, staging, tmp, max_length)
        manifest = _manifest(opts, src, task, quality, merge_base, max_length)
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


def _merge_base(opts: ExportOptions, src: _Source) -> str:
    """auto: a QLoRA adapter merges into the NF4 weights it trained against (dequantized), which
    makes the merge the trained model - except for a 4-bit export. Those weights lie on the NF4
    grid, and a LoRA update is far smaller than the grid's steps, so quantizing them again
    rounds nearly all of the update away (~2% of it survives; test_qlora_export); merged into
    the fp32 weights it survives the rounding on average (measured on the SmolLM2 BBC
    classifier: 0.570 vs 0.952 test accuracy, docs/quantize.md)."""
    qlora = src.finetune.get("method") == "qlora"
    if opts.merge_base == "auto":
        as_trained = qlora and src.adapter and opts.quantize not in quantization.FOUR_BIT
        return "dequantized" if as_trained else "fp32"
    if opts.merge_base == "dequantized" and not src.adapter:
        raise OptionError("--merge-base dequantized needs a LoRA adapter to merge")
    return opts.merge_base


def _base_kwargs(src: _Source, task: tasks.Task) -> dict[str, Any]:
    """from_pretrained arguments that rebuild the fine-tune's base: its label set, its pad id."""
    from transformers import AutoConfig

    labels = src.finetune.get("labels")
    kwargs = task.model_kwargs(labels)
    if labels:
        kwargs["ignore_mismatched_sizes"] = True
    if isinstance(task, tasks.ClassifyTask) and AutoConfig.from_pretrained(src.base).pad_token_id is None:
        from bitserve.models.loading import load_tokenizer

        kwargs["pad_token_id"] = task.prepare_tokenizer(load_tokenizer(src.tokenizer_dir)).pad_token_id
    return kwargs


def load_base(src: _Source, task: tasks.Task, base: str, compute: torch.dtype = torch.float32) -> Any:
    """The fine-tune's base: fp32 weights, or the NF4 weights QLoRA trained against ("nf4", with
    the same double quantization), or those dequantized to fp32 ("dequantized")."""
    kwargs = _base_kwargs(src, task)
    if base == "fp32":
        return task.auto_class.from_pretrained(src.base, dtype=torch.float32, **kwargs)
    qc = quantization.bnb_config("nf4", compute, double_quant=True)
    model = task.auto_class.from_pretrained(
        src.base, quantization_config=qc, device_map={"": "cpu"}, dtype=torch.float32, **kwargs
    )
    if base == "nf4":
        return as_trained_4bit(model)
    model = model.dequantize(dtype=torch.float32)
    # Loading quantized leaves these behind; the merged checkpoint is a plain fp32 one.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.is_quantized = False
    model.hf_quantizer = None
    return model.float()


def load_as_trained(src: _Source, task: tasks.Task, compute: torch.dtype = torch.float32) -> Any:
    """NF4 base + the LoRA adapter, unmerged: the model a QLoRA fine-tune trained."""
    from peft import PeftModel

    assert src.adapter is not None, "the as-trained model needs an adapter"
    return PeftModel.from_pretrained(load_base(src, task, "nf4", compute), src.adapter).eval()


def _merge(src: _Source, task: tasks.Task, dest: Path, base: str = "fp32") -> None:
    """fp32 or dequantized-NF4 base (+ adapter, merged) saved as safetensors in `dest`."""
    from bitserve.models.loading import load_tokenizer

    model = load_base(src, task, base)
    if src.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, src.adapter).merge_and_unload()
    model.save_pretrained(dest, safe_serialization=True)
    load_tokenizer(src.tokenizer_dir).save_pretrained(dest)


def _quantize(
    merged: Path, task: tasks.Task, mode: str, dest: Path, device: str, quant: report.QuantOptions
) -> None:
    loaded = report.load(str(merged), task, mode, device, quant)
    loaded.model.save_pretrained(dest, safe_serialization=True)
    loaded.tokenizer.save_pretrained(dest)


def _report(
    opts: ExportOptions, src: _Source, task: tasks.Task, merged: Path, exported: Path, max_length: int
) -> dict[str, Any]:
    """quality.json beside the checkpoint: the unquantized merge and the export, same data (and
    for QLoRA the as-trained model, NF4 base + adapter)."""
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
    if src.adapter and src.finetune.get("method") == "qlora":
        rows.append(_as_trained_row(src, task, dataset, opts.batch_size, max_length))
    if opts.quantize != "none":
        rows.append(
            report.evaluate(
                str(merged),
                task,
                dataset,
                "none",
                batch_size=opts.batch_size,
                max_length=max_length,
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
            max_length=max_length,
            device=opts.device,
        )
    )
    doc = report.document(task, str(exported), dataset, rows)
    doc["max_length"] = max_length
    doc["model"] = str(Path(opts.output).resolve())
    report.write(exported, doc)
    return doc


def _as_trained_row(
    src: _Source, task: tasks.Task, dataset: data.Dataset, batch_size: int, max_length: int
) -> dict[str, Any]:
    """The QLoRA model as trained (NF4 base + adapter, unmerged), scored like the other rows.

    Computed in fp32 on CPU like the "none" row, so the rows differ by weights only.
    """
    import contextlib

    from bitserve.models.loading import load_tokenizer

    model = load_as_trained(src, task)
    tokenizer = task.prepare_tokenizer(load_tokenizer(src.tokenizer_dir))
    tokenizer.padding_side = "right"
    scored = task.evaluate(
        model,
        tokenizer,
        dataset,
        batch_size=batch_size,
        max_length=max_length,
        autocast=contextlib.nullcontext,
    )
    return {
        "quantize": AS_TRAINED,
        **{k: round(v, 6) for k, v in scored.metrics.items()},
        "memory_bytes": int(model.get_memory_footprint()),
        "examples_per_s": round(scored.examples_per_s, 3),
        "seconds": round(scored.seconds, 3),
        "device": "cpu",
        "dtype": "float32",
    }


def _memory_only(path: Path, task: tasks.Task, mode: str, device: str) -> dict[str, Any]:
    from bitserve.models.loading import load_checkpoint

    loaded = load_checkpoint(str(path), task.auto_class, quantize=mode, device=device)
    return {"quantize": mode, "memory_bytes": loaded.memory_bytes, "examples_per_s": 0.0}


def _manifest(
    opts: ExportOptions,
    src: _Source,
    task: tasks.Task,
    quality: dict[str, Any],
    merge_base: str,
    max_length: int,
) -> dict[str, Any]:
    ft = src.finetune
    ft_opts = ft.get("options") or {}
    return {
        "kind": "bitserve-export",
        "task": task.name,
        "base_model": str(Path(ft.get("base_model") or src.base).resolve()),
        "adapter": str(Path(src.adapter).resolve()) if src.adapter else None,
        "method": ft.get("method", "none"),
        "precision": ft.get("precision"),
        "quantize": opts.quantize,
        "quantize_options": opts.quant.describe() if opts.quantize != "none" else None,
        "labels": ft.get("labels"),
        "data_sha256": ft.get("data_sha256"),
        "merge_base": merge_base if src.adapter else None,
        "finetune_metrics": ft.get("eval_metrics", {}),
        # The fine-tune's eval and the quality rows are measured apart; say how each was taken.
        "finetune_eval": {
            "max_length": ft_opts.get("max_length"),
            "autocast": ft.get("precision"),
            "examples": ft.get("eval_examples"),
        },
        "quality_eval": {"max_length": max_length, "autocast": "none (each row's dtype)"},
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
