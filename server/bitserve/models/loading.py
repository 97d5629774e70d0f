"""Checkpoint (directory, safetensors, GGUF) -> model + tokenizer on a device, at a precision."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from bitserve.errors import ConfigError
from bitserve.models import quantization
from bitserve.models.loaded import LoadedModel

log = logging.getLogger(__name__)


class _DropRepeats(logging.Filter):
    """bitsandbytes logs on every int8 matmul that fp32 inputs are cast to fp16: once is enough."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key.startswith("MatMul8bitLt"):
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropRepeats())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_SHARED_MODELS: weakref.WeakValueDictionary[tuple[str, ...], Any] = weakref.WeakValueDictionary()
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec != "auto":
        return _DTYPES[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def max_context(config: Any, tokenizer: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10**9:
        return v
    return 512  # relative-position models (T5) have no hard limit; keep inputs sane


def _checkpoint_source(path: str, gguf_file: str | None) -> tuple[str, dict[str, Any]]:
    """(directory, extra from_pretrained kwargs) for a directory or a GGUF file.

    A GGUF file is dequantized once into a cached safetensors checkpoint (`demo.gguf_checkpoint`),
    so it loads fast and quantizes like any other checkpoint.
    """
    p = Path(path)
    if gguf_file or (p.is_file() and p.suffix == ".gguf"):
        from bitserve.models.demo import gguf_checkpoint

        p = gguf_checkpoint(p / gguf_file if gguf_file else p)
    return str(p), {"use_safetensors": any(p.glob("*.safetensors")) or None}


def load_tokenizer(path: str, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    source, extra = _checkpoint_source(path, gguf_file)
    extra.pop("use_safetensors", None)
    return AutoTokenizer.from_pretrained(source, **extra)


def load_checkpoint(
    path: str,
    auto_class: Any,
    *,
    quantize: str = "none",
    dtype: str = "auto",
    device: str = "auto",
    gguf_file: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_dir: str | None = None,
) -> LoadedModel:
    """Load a checkpoint with `auto_class` (an AutoModelFor* class) at the requested precision.

    Checkpoints saved already quantized load as they are; asking to quantize them again to a
    different mode is a configuration error. With `max_memory` (device "auto" only) accelerate's
    device map spreads the layers over the devices it names, at most that much on each, and
    offloads what does not fit to disk under `offload_dir`.
    """
    from transformers import AutoConfig

    if max_memory and device != "auto":
        raise ConfigError(
            f"max_memory spreads the model over devices: it needs device 'auto', not {device!r}"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, extra = _checkpoint_source(path, gguf_file)
    config = AutoConfig.from_pretrained(source, **{k: v for k, v in extra.items() if k == "gguf_file"})
    saved_mode = quantization.mode_of(config)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, **{k: v for k, v in extra.items() if v is not None}}
    if saved_mode != "none":
        if quantize not in ("none", saved_mode):
            raise ConfigError(
                f"{path}: checkpoint is saved quantized as {saved_mode}; "
                f"quantize must be 'none' or {saved_mode!r}, not {quantize!r}"
            )
        mode = saved_mode
    else:
        mode = quantize
        qc = quantization.bnb_config(mode, compute_dtype=torch_dtype, offload=bool(max_memory))
        if qc is not None:
            kwargs["quantization_config"] = qc
    offload_to: str | None = None
    if max_memory:
        offload_to = _offload_dir(offload_dir)
        # transformers rewrites max_memory in place (sizes to bytes): hand it a copy.
        kwargs.update(device_map="auto", max_memory=dict(max_memory), offload_folder=offload_to)
    elif mode != "none":
        # bitsandbytes places quantized weights itself; everything on the one device.
        kwargs["device_map"] = {"": dev.index if dev.type == "cuda" and dev.index is not None else str(dev)}
    # Engines serving one checkpoint at one precision (an instruction model answering several
    # tasks) share one copy of the weights; it is freed when the last engine lets go. Only
    # unquantized weights are shared: engines run forward passes from their own threads, and
    # bitsandbytes layers mutate their state on first use, so quantized copies stay private.
    key = (
        str(Path(source).resolve()),
        auto_class.__name__,
        mode,
        str(torch_dtype),
        str(dev),
        repr(sorted((str(k), v) for k, v in (max_memory or {}).items())),
    )
    model = _SHARED_MODELS.get(key) if mode == "none" else None
    if model is None:
        log.info(
            "loading %s as %s (quantize=%s, dtype=%s, device=%s)",
            path,
            auto_class.__name__,
            mode,
            torch_dtype,
            dev,
        )
        model = auto_class.from_pretrained(source, **kwargs)
        if offload_to is not None:
            # The offloaded weights live as long as the model that reads them.
            weakref.finalize(model, shutil.rmtree, offload_to, True)
        elif mode == "none":
            model.to(dev)
        model.eval()
        if mode == "none":
            _SHARED_MODELS[key] = model
    else:
        log.info("%s: sharing the weights already loaded for another model", path)
    device_map: dict[str, str] = {}
    if max_memory:
        device_map, dev = _placement(model, dev)
        if mode != "none" and "disk" in device_map.values():
            # bitsandbytes layers reloaded from disk by accelerate's hooks come back empty (meta)
            # from the second forward on (int8 does not run even once without a GPU).
            raise ConfigError(
                f"{path}: max_memory leaves {mode} layers to be offloaded to disk ({_summary(device_map)}), "
                "which bitsandbytes cannot run; raise max_memory (GPUs and cpu) until the model fits, "
                "or serve it unquantized"
            )
        log.info("%s spread over devices: %s", path, _summary(device_map))
    tokenizer = load_tokenizer(path, gguf_file)
    report = _quality_report(Path(path))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=torch_dtype,
        quantization=mode,
        memory_bytes=int(model.get_memory_footprint()),
        parameter_count=_parameter_count(model),
        architecture=(getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        max_context=max_context(model.config, tokenizer),
        path=str(path),
        quality_report_json=report,
        source=source,
        device_map=device_map,
    )


def _offload_dir(base: str | None) -> str:
    """A fresh directory per load: accelerate reuses an offload folder that has an index.json,
    so a shared one could serve another model's (or an older checkpoint's) weights."""
    from bitserve.models.demo import cache_dir

    root = Path(base) if base else cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix="weights-", dir=root)


def _placement(model: Any, dev: torch.device) -> tuple[dict[str, str], torch.device]:
    """(module -> device name, the device inputs go to) of a model loaded with a device map.

    Inputs go where accelerate's dispatch runs the model from: the first accelerator in the
    map, else the CPU (layers on "cpu"/"disk" then run on the CPU).
    """
    hf_map = getattr(model, "hf_device_map", None) or {"": str(dev)}  # it all fit on `dev`
    names = {m: f"cuda:{d}" if isinstance(d, int) else str(d) for m, d in hf_map.items()}
    accelerators = [d for d in names.values() if d not in ("cpu", "disk")]
    return names, torch.device(accelerators[0] if accelerators else "cpu")


def _summary(device_map: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for d in device_map.values():
        counts[d] = counts.get(d, 0) + 1
    return ", ".join(f"{n} modules on {d}" for d, n in counts.items())


def _parameter_count(model: Any) -> int:
    """Logical parameter count: 4-bit weights pack two values per stored byte."""
    total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2
        total += n
    return total


def _quality_report(path: Path) -> str:
    """`quantize export` writes quality.json beside the checkpoint; ListModels shows it."""
    d = path if path.is_dir() else path.parent
    f = d / "quality.json"
    return f.read_text() if f.is_file() else ""
