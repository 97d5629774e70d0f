"""LoRA adapters at run time, front half: the Admin service's operations on a model's engine.

The engine process holds the adapters (engine/worker/lora.py) and runs each operation between
two steps, so rows decoding never see a half-loaded adapter; this side checks names, forwards,
and keeps the model's list (ListModels) current. An adapter loaded here is written into the
engine's spec too, so an engine process that restarts comes back with it.
"""

from __future__ import annotations

from typing import Any

from bitserve.errors import FailedPrecondition, InvalidArgument
from bitserve.frontend.base import Engine
from bitserve.ipc import protocol as P
from bitserve.settings import ADAPTER_NAME


def _check_name(name: str) -> None:
    if not ADAPTER_NAME.fullmatch(name):
        raise InvalidArgument(
            f"name {name[:64]!r}: an adapter name is letters, digits, '.', '_', '-' (1-128)"
        )


def _lm(engine: Engine) -> Engine:
    if not engine.uses_scheduler:
        raise FailedPrecondition(
            f"model {engine.name!r} ({engine.task.value}) has its own task head; LoRA adapters are "
            "served on causal LMs"
        )
    return engine


async def refresh(engine: Engine) -> list[dict[str, Any]]:
    engine.adapters = list(await engine.core.call(P.ADAPTER, "list", [engine.name]))
    return engine.adapters


async def load(engine: Engine, name: str, path: str) -> dict[str, Any]:
    """Load the adapter at `path` as `name`; its entry as ListAdapters shows it."""
    _check_name(name)
    if not path:
        raise InvalidArgument("path is empty: give the adapter's directory on the server")
    await _lm(engine).core.call(P.ADAPTER, "load", [engine.name, name, path])
    _remember(engine, name, path)
    return next(a for a in await refresh(engine) if a["name"] == name)


async def unload(engine: Engine, name: str) -> int:
    """Unknown from now on; how many rows still decode with it (they finish first)."""
    _check_name(name)
    result = await _lm(engine).core.call(P.ADAPTER, "unload", [engine.name, name])
    _remember(engine, name, None)
    await refresh(engine)
    return int(result["running"])


async def listing(engine: Engine) -> list[dict[str, Any]]:
    return await refresh(engine) if engine.uses_scheduler else []


def _remember(engine: Engine, name: str, path: str | None) -> None:
    engine.core.remember_adapter(engine.name, name, path)
