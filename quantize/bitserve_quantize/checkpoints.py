"""Training checkpoints: written atomically, found again by `--resume`.

A checkpoint is a directory `step-00000042/` under `<output>/checkpoints/`. It is written as a
hidden `.step-00000042.tmp/` and renamed into place only when complete, so an interrupted run
never leaves a half-written checkpoint where `--resume` would look, and never touches the
finished ones. Only the trainable parameters are saved (all of them for a full fine-tune, the
adapters and the task head for LoRA); frozen base weights are reloaded from the base model.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import World
from .errors import CheckpointError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")
STATE = "state.pt"
TRAINER_STATE = "trainer_state.json"


@dataclass
class Resumed:
    step: int
    path: Path


def directory(output: Path) -> Path:
    return output / "checkpoints"


def finished(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a complete one has its trainer_state.json)."""
    root = directory(output)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / TRAINER_STATE).is_file() and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    output: Path,
    step: int,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    world: World,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically (every rank saves its RNG; rank 0 the rest)."""
    root = directory(output)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    world.barrier()
    torch.save(rng_state(), tmp / f"rng-{world.rank}.pt")
    if world.is_main:
        torch.save(
            {
                "model": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
            },
            tmp / STATE,
        )
        # Written last: its presence marks the checkpoint complete.
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    world.barrier()
    if world.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in finished(output)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    world.barrier()
    return final


def load_latest(
    output: Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    world: World,
) -> Resumed | None:
    """Restore the newest complete checkpoint; None when there is none."""
    done = finished(output)
    if not done:
        return None
    step, path = done[-1]
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
        missing = set(trainable_state(model)) - set(state["model"])
        if missing:
            raise CheckpointError(
                f"{path}: checkpoint does not match the model ({len(missing)} trainable tensors missing, "
                f"e.g. {sorted(missing)[0]}); was it written with another --method or --model?"
            )
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rng_file = path / f"rng-{world.rank}.pt"
        set_rng_state(torch.load(rng_file if rng_file.is_file() else path / "rng-0.pt", weights_only=False))
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint: {e}".splitlines()[0]) from e
    return Resumed(step=step, path=path)
