"""Model name -> engine, built from settings; resolves which engine answers a request.

Models that read the same weights (same checkpoint, model class, precision and device) are
served by one engine process: it loads them once and runs every task on them through one
scheduler. The registry starts those processes (`EngineClient`), one at a time since weights
compete for memory, and builds the front half of each model's engine on top.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bitserve.engine.heads import model_half
from bitserve.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from bitserve.frontend import engine_class
from bitserve.frontend.base import BatchedEngine, Engine
from bitserve.ipc.client import EngineClient, EngineMemoryCollector
from bitserve.metrics import Metrics
from bitserve.models.backends import resolve_backend
from bitserve.models.loaded import load_front
from bitserve.settings import ModelSettings, Settings
from bitserve.types import Task

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Engine)


def weights_key(m: ModelSettings) -> tuple[str, ...]:
    """Models with equal keys share one engine process (one copy of the weights)."""
    half = model_half(m.task, resolve_backend(m))
    path = str(Path(m.path).resolve())
    placement = repr(sorted((str(k), str(v)) for k, v in (m.max_memory or {}).items()))
    return (path, m.gguf_file or "", half.auto_class, m.quantize, m.dtype, m.device, placement)


def engine_groups(models: list[ModelSettings]) -> list[list[int]]:
    """Indices of `models` grouped by the weights they read, in config order."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, m in enumerate(models):
        groups.setdefault(weights_key(m), []).append(i)
    return list(groups.values())


def stats_hook(metrics: Metrics, entries: list[ModelSettings]) -> Callable[[dict[str, Any]], None]:
    """Engine step stats -> running/queue gauges and the batch-size histogram, per model."""
    m = metrics
    series = {
        e.name: (
            m.running_sequences.labels(e.name, e.task.value),
            m.queue_depth.labels(e.name, e.task.value),
            m.batch_size.labels(e.name, e.task.value),
            m.queue_wait.labels(e.name, e.task.value),
        )
        for e in entries
    }
    kv = {
        e.name: (
            m.kv_cache_tokens.labels(e.name, e.task.value, "reserved"),
            m.kv_cache_tokens.labels(e.name, e.task.value, "used"),
        )
        for e in entries
    }

    def hook(stats: dict[str, Any]) -> None:
        # running/waiting come when they changed; steps: the decode steps since the last report.
        running, waiting = stats.get("running"), stats.get("waiting")
        waits = stats.get("queue_wait", {})
        for name, (run_g, wait_g, batch_h, qwait_h) in series.items():
            if running is not None:
                run_g.set(running.get(name, 0))
            if waiting is not None:
                wait_g.set(waiting.get(name, 0))
            for batch, stepped in stats.get("steps", ()):
                if name in stepped:
                    batch_h.observe(batch)
            for w in waits.get(name, ()):
                qwait_h.observe(w)
        if "kv" in stats:
            for reserved_g, used_g in kv.values():
                reserved_g.set(stats["kv"]["reserved"])
                used_g.set(stats["kv"]["used"])

    return hook


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics):
        self._settings = settings
        self._metrics = metrics
        self._engines: dict[str, Engine] = {}
        self._declared = {m.name: m for m in settings.models}
        self.cores: list[EngineClient] = []
        metrics.registry.register(EngineMemoryCollector(self.cores))
        self.engine_of: dict[str, str] = {}  # model name -> engine id (models sharing weights)
        # Called with (model names, serving?) when an engine process dies or comes back.
        self.on_state: Callable[[list[str], bool], None] | None = None
        # Called with a message when an engine process has used up its restarts.
        self.on_give_up: Callable[[str], None] | None = None

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    async def load_all(self, on_loaded: Callable[[Engine], None] | None = None) -> None:
        """Start one engine process per copy of the weights (all at once: each imports and
        loads on its own), then each model's front half as its engine becomes ready. The first
        failure, in config order, is raised once every start has ended."""
        groups = engine_groups(self._settings.models)
        results = await asyncio.gather(
            *(self._load_group(n, g, on_loaded) for n, g in enumerate(groups)), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _load_group(self, n: int, group: list[int], on_loaded: Callable[[Engine], None] | None) -> None:
        models = self._settings.models
        entries = [models[i] for i in group]
        try:
            classes = [engine_class(m.task, resolve_backend(m)) for m in entries]
        except ConfigError as e:
            raise ConfigError(f"models.{group[0]} ({entries[0].name}): {e}") from e
        engine_id = f"e{n}-{entries[0].name}"
        srv = self._settings.server
        names = [m.name for m in entries]
        core = EngineClient(
            engine_id,
            {
                "engine": engine_id,
                "models": [m.model_dump(mode="json") for m in entries],
                "log_level": self._settings.server.log_level,
                "nice": self._settings.server.engine_nice,
            },
            on_state=lambda ok: self._engine_state(names, ok),
            on_give_up=self._gave_up,
            max_restarts=srv.engine_max_restarts,
            restart_window_s=srv.engine_restart_window_s,
            heartbeat_s=srv.engine_heartbeat_s,
            unresponsive_s=srv.engine_unresponsive_s,
            hung_s=srv.engine_hung_s,
            on_stats=stats_hook(
                self._metrics,
                [
                    m
                    for m, c in zip(entries, classes, strict=True)
                    if c.uses_scheduler and not issubclass(c, BatchedEngine)
                ],
            ),
        )
        self.cores.append(core)
        try:
            info = await core.start()
            loaded = await asyncio.to_thread(load_front, info)
        except Exception as e:  # a broken or unsupported checkpoint: say which and why
            await core.stop(timeout=5)
            m = entries[0]
            if not isinstance(e, ConfigError):
                log.exception("loading model %s failed", m.name)
            raise ConfigError(
                f"models.{group[0]} ({m.name}): cannot load {m.path} for task {m.task.value}: {e}".replace(
                    "\n", " "
                )
            ) from e
        for k, (i, m, cls) in enumerate(zip(group, entries, classes, strict=True)):
            try:
                engine = cls(m, loaded, self._metrics, core)
            except ConfigError as e:
                raise ConfigError(f"models.{i} ({m.name}): {e}") from e
            await engine.start()
            engine.adapters = list(info.get("adapters", {}).get(m.name, []))
            self._engines[m.name] = engine
            self.engine_of[m.name] = engine_id
            # One copy of the weights, counted once: on the first model that reads them.
            self._metrics.model_memory.labels(m.name, m.task.value, loaded.quantization).set(
                loaded.memory_bytes if k == 0 else 0
            )
            self._metrics.model_loaded.labels(m.name, m.task.value).set(1)
            log.info(
                "model %s ready: task=%s backend=%s quantization=%s memory=%.1f MB device=%s engine=%s",
                m.name,
                m.task.value,
                cls.backend,
                loaded.quantization,
                loaded.memory_bytes / 1e6,
                loaded.device,
                engine_id,
            )
            if on_loaded is not None:
                on_loaded(engine)

    def _engine_state(self, names: list[str], serving: bool) -> None:
        for name in names:
            engine = self._engines.get(name)
            if engine is not None:
                self._metrics.model_loaded.labels(name, engine.task.value).set(1 if serving else 0)
        if self.on_state is not None:
            self.on_state(names, serving)

    def _gave_up(self, message: str) -> None:
        if self.on_give_up is not None:
            self.on_give_up(message)

    async def stop_all(self) -> None:
        for e in self._engines.values():
            await e.stop()
        # Together: each engine process takes its own second or so to drain and exit.
        await asyncio.gather(*(core.stop() for core in self.cores))

    def model(self, name: str) -> Engine:
        """The loaded model `name`, whatever its task; NOT_FOUND / UNAVAILABLE as `get`."""
        engine = self._engines.get(name)
        if engine is None:
            if name in self._declared:
                raise Unavailable(f"model {name!r} is still loading; retry shortly")
            raise NotFound(f"model {name!r} is not loaded; loaded models: {sorted(self._declared) or 'none'}")
        if not engine.core.ready:
            raise Unavailable(f"model {name!r} is not serving: {engine.core.not_serving_reason}")
        return engine

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
        if not engine.core.ready:
            raise Unavailable(f"model {engine.name!r} is not serving: {engine.core.not_serving_reason}")
        if not isinstance(engine, kind):
            raise FailedPrecondition(f"model {engine.name!r} cannot answer {task.value!r} requests")
        return engine
