"""LoRA adapters at run time, front half: the Admin service's operations on a model's engine.

The engine process holds the adapters (engine/worker/lora.py) and runs each operation between
two steps, so rows decoding never see a half-loaded adapter; this side checks names, forwards,
and keeps the model's list (ListModels) current. An adapter loaded here is written into the
engine's spec too, so an engine process that restarts comes back with it.
"""

from __future__ import annotations

from typing import Any

from bitserve.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from bitserve.frontend.base import Engine
from bitserve.ipc import protocol as P
from bitserve.settings import ADAPTER_NAME, BASE_ADAPTER, ModelSettings


def resolve(settings: ModelSettings, requested: str) -> str:
    """The adapter a request runs with: the one it names; the model entry's `default_adapter`
    when it names none; the base model ("") for the reserved name "base" or no default."""
    if requested == BASE_ADAPTER:
        return ""
    return requested or settings.default_adapter


def serves_adapters(engine: Engine) -> bool:
    """Causal LMs on the generation scheduler and sequence classifiers (head backend) do."""
    return bool(getattr(engine, "serves_adapters", engine.uses_scheduler))


def refuse_on_head(engine: Engine, requested: str) -> None:
    """A seq2seq translator serves no adapter: FAILED_PRECONDITION saying why, for any name but
    "base" (none named is the base)."""
    if resolve(engine.settings, requested):
        raise FailedPrecondition(
            f"adapter {requested!r}: model {engine.name!r} ({engine.task.value}) has its own task head "
            "(a seq2seq model), which takes no LoRA adapter; adapters are served on causal LMs and "
            "sequence classifiers. Merge it with `quantize export` and serve it as its own model"
        )


def row_error(engine: Engine, code: str, adapter: str) -> BaseException:
    """The error of one row the engine could not run with its adapter (an error code)."""
    if code == NotFound.code:
        return NotFound(f"model {engine.name!r} has no adapter {adapter!r} loaded")
    return ResourceExhausted(
        f"model {engine.name!r}: every LoRA adapter slot (max_resident_adapters="
        f"{engine.settings.max_resident_adapters}) is held by running generations; retry "
        f"adapter {adapter!r} when they finish"
    )


def _check_name(name: str) -> None:
    if not ADAPTER_NAME.fullmatch(name):
        raise InvalidArgument(
            f"name {name[:64]!r}: an adapter name is letters, digits, '.', '_', '-' (1-128)"
        )
    if name == BASE_ADAPTER:
        raise InvalidArgument(f"name {name!r} is reserved: a request naming it gets the base model")


def _lm(engine: Engine) -> Engine:
    if not serves_adapters(engine):
        raise FailedPrecondition(
            f"model {engine.name!r} ({engine.task.value}) has its own task head (seq2seq) that takes "
            "no adapter; LoRA adapters are served on causal LMs and sequence classifiers"
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
    if name == engine.settings.default_adapter:
        raise FailedPrecondition(
            f"adapter {name!r} is model {engine.name!r}'s default_adapter: requests naming no adapter "
            "run with it; change the model's default_adapter in its config to unload it"
        )
    result = await _lm(engine).core.call(P.ADAPTER, "unload", [engine.name, name])
    _remember(engine, name, None)
    await refresh(engine)
    return int(result["running"])


async def listing(engine: Engine) -> list[dict[str, Any]]:
    return await refresh(engine) if serves_adapters(engine) else []


def _remember(engine: Engine, name: str, path: str | None) -> None:
    engine.core.remember_adapter(engine.name, name, path)
