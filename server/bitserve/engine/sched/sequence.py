"""A generation request while it waits or decodes, inside the engine process."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from bitserve.types import GenerationRequest

if TYPE_CHECKING:
    from bitserve.engine.worker.logits import Guide


class Sequence:
    """A request while it waits or decodes. Only the engine's loop touches it."""

    __slots__ = (
        "rid",
        "model",
        "prompt_ids",
        "params",
        "max_new_tokens",
        "stop_ids",
        "deadline",
        "client",
        "arrived",
        "cancelled",
        "token_ids",
        "finish",
        "rng",
        "penalty",
        "guide",
        "adapter",
        "lora",
    )

    def __init__(self, req: GenerationRequest, arrived: float | None = None):
        self.rid = req.rid
        self.model = req.model
        self.prompt_ids = req.prompt_ids
        self.params = req.params
        self.max_new_tokens = req.max_new_tokens
        self.stop_ids = frozenset(req.stop_ids)
        self.deadline = req.deadline
        self.client = req.client
        self.arrived = time.monotonic() if arrived is None else arrived
        self.cancelled = False
        self.token_ids: list[int] = []
        self.finish: str | None = None  # "eos" | "stop" | "length"
        seed = req.params.seed
        self.rng = random.Random(seed if seed is not None else random.getrandbits(64))
        rp = req.params.repetition_penalty
        self.penalty = rp if rp != 1.0 else None
        self.guide: Guide | None = None  # the row's constraint (set by the scheduler)
        # Its LoRA adapter, as the bank knows it: "model:name" ("" = the base).
        self.adapter = f"{req.model}:{req.params.adapter}" if req.params.adapter else ""
        self.lora = 0  # that adapter's slot in the LoRA bank while the row runs (0: none)
