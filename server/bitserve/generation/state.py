"""The engine-side state of one generation request: token ids in, token ids out."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from ..types import SamplingParams


@dataclass
class GenerationRequest:
    """What the front sends for one prompt (plain data; crosses the process boundary)."""

    rid: int
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()  # token ids that end the answer (besides the model's EOS)
    deadline: float | None = None  # time.monotonic() value (one clock for all processes)
    client: str = ""  # who asked: admission is fair across clients


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
