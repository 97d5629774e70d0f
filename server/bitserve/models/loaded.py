"""What loading a checkpoint leaves (`LoadedModel`), and the front's view of it (`load_front`).

Imports no torch: the front process (gRPC, per-task front classes) holds no weights, only a
tokenizer and a few config fields, so it stays small (`bench/serve_memory.py`;
tests/integration/test_front_imports.py checks it). The engine process fills `LoadedModel` in
`bitserve.models.loading.load_checkpoint`.
"""

from __future__ import annotations

import importlib
import os
import threading
import types
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    # torch.device / torch.dtype in the engine process; in the front, their names ("cpu", "float32").
    device: Any
    dtype: Any
    quantization: str
    memory_bytes: int
    parameter_count: int
    architecture: str
    max_context: int
    path: str
    quality_report_json: str = ""
    source: str = ""  # the directory the weights were read from (a GGUF file's converted cache)
    front_config: Any = None  # the front's copy of the config fields it reads (it holds no model)
    # module -> device when a device map spreads the model (max_memory); empty on one device.
    device_map: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.front_config if self.model is None else self.model.config


def front_info(model: Any, tokenizer: Any) -> dict[str, Any]:
    """What the engine tells the front so that it needs neither transformers' Auto classes nor
    the model config classes (both import torch): the tokenizer's class, as `module:name`, and
    the config fields the front reads."""
    cfg = model.config
    id2label = getattr(cfg, "id2label", None) or {}
    cls = type(tokenizer)
    return {
        "tokenizer_class": f"{cls.__module__}:{cls.__qualname__}",
        "config": {
            "model_type": getattr(cfg, "model_type", ""),
            "problem_type": getattr(cfg, "problem_type", None),
            "labels": [str(id2label[i]) for i in range(len(id2label))],
        },
    }


def _front_config(fields: dict[str, Any]) -> types.SimpleNamespace:
    labels = list(fields.get("labels", []))
    return types.SimpleNamespace(
        model_type=fields.get("model_type", ""),
        problem_type=fields.get("problem_type"),
        id2label=dict(enumerate(labels)),
        num_labels=len(labels),
    )


# Engines load at once, each front half on a thread: transformers' lazy modules are not safe to
# import from several threads at the same time ("cannot import name ... from 'transformers'",
# seen once with two models loading together), so the import of a tokenizer class is serialized;
# reading the tokenizer files (from_pretrained) still runs in parallel.
_IMPORT_LOCK = threading.Lock()


def _tokenizer_class(spec: str) -> Any:
    module, _, name = spec.partition(":")
    with _IMPORT_LOCK:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    return obj


def load_front(info: dict[str, Any]) -> LoadedModel:
    """The front's view of a checkpoint an engine process loaded: the tokenizer (the class the
    engine's AutoTokenizer chose) from the directory it read, the config fields the front reads,
    the rest as the engine reported it. No weights, no torch."""
    source = info["checkpoint_dir"]
    return LoadedModel(
        model=None,
        tokenizer=_tokenizer_class(info["tokenizer_class"]).from_pretrained(source),
        device=info["device"],
        dtype=info["dtype"],
        quantization=info["quantization"],
        memory_bytes=info["memory_bytes"],
        parameter_count=info["parameter_count"],
        architecture=info["architecture"],
        max_context=info["max_context"],
        path=info["path"],
        quality_report_json=info["quality_report_json"],
        source=source,
        front_config=_front_config(info["config"]),
        device_map=dict(info.get("device_map", {})),
    )
