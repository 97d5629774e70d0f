"""Model name -> engine, built from settings; resolves which engine answers a request."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TypeVar

from .engines import engine_class
from .engines.base import Engine
from .errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from .metrics import Metrics
from .settings import ModelSettings, Settings
from .types import Task

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Engine)

_CAUSAL_SUFFIXES = ("ForCausalLM",)


def resolve_backend(m: ModelSettings) -> str:
    """'auto' -> 'instruct' when a non-generate task points at a causal LM, else 'head'."""
    if m.backend != "auto":
        return m.backend
    if m.task == Task.GENERATE:
        return "head"
    p = Path(m.path)
    if m.gguf_file or p.suffix == ".gguf":
        return "instruct"  # GGUF files hold decoder-only LMs
    try:
        from transformers import AutoConfig

        archs = AutoConfig.from_pretrained(str(p)).architectures or []
    except Exception:  # unreadable config: let the loader report it precisely
        return "head"
    return "instruct" if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) else "head"


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics):
        self._settings = settings
        self._metrics = metrics
        self._engines: dict[str, Engine] = {}
        self._declared = {m.name: m for m in settings.models}

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    async def load_all(self, on_loaded=None) -> None:
        """Load every configured model, one at a time (weights compete for memory)."""
        for i, m in enumerate(self._settings.models):
            try:
                cls = engine_class(m.task, resolve_backend(m))
                loaded = await asyncio.to_thread(cls.load, m)
                engine = cls(m, loaded, self._metrics)
            except ConfigError as e:
                raise ConfigError(f"models.{i} ({m.name}): {e}") from e
            except Exception as e:  # a broken or unsupported checkpoint: say which and why
                log.exception("loading model %s failed", m.name)
                raise ConfigError(
                    f"models.{i} ({m.name}): cannot load {m.path} for task {m.task.value}: "
                    f"{type(e).__name__}: {e}".replace("\n", " ")
                ) from e
            await engine.start()
            self._engines[m.name] = engine
            self._metrics.model_memory.labels(m.name, m.task.value, loaded.quantization).set(
                loaded.memory_bytes
            )
            self._metrics.model_loaded.labels(m.name, m.task.value).set(1)
            log.info(
                "model %s ready: task=%s backend=%s quantization=%s memory=%.1f MB device=%s",
                m.name,
                m.task.value,
                cls.backend,
                loaded.quantization,
                loaded.memory_bytes / 1e6,
                loaded.device,
            )
            if on_loaded is not None:
                on_loaded(engine)

    async def stop_all(self) -> None:
        for e in self._engines.values():
            await e.stop()

    def get(self, task: Task, name: str | None, kind: type[E]) -> E:
        """The engine that answers `task` for model `name` (or the only one serving `task`)."""
        if name:
            engine = self._engines.get(name)
            if engine is None:
                if name in self._declared:
                    raise Unavailable(f"model {name!r} is still loading; retry shortly")
                raise NotFound(
                    f"model {name!r} is not loaded; loaded models: {sorted(self._declared) or 'none'}"
                )
            if engine.task != task:
                raise FailedPrecondition(
                    f"model {name!r} serves task {engine.task.value!r}, not {task.value!r}"
                )
        else:
            serving = [e for e in self._engines.values() if e.task == task]
            declared = [m.name for m in self._declared.values() if m.task == task]
            if len(declared) > 1:
                raise InvalidArgument(
                    f"model: several models serve {task.value!r} ({', '.join(sorted(declared))}); name one"
                )
            if not serving:
                if declared:
                    raise Unavailable(f"model {declared[0]!r} is still loading; retry shortly")
                raise NotFound(f"no loaded model serves task {task.value!r}")
            engine = serving[0]
        if not engine.ready:
            raise Unavailable(f"model {engine.name!r} is not serving (shutting down)")
        if not isinstance(engine, kind):
            raise FailedPrecondition(f"model {engine.name!r} cannot answer {task.value!r} requests")
        return engine
