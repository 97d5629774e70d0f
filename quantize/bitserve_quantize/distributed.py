"""One process or many: the same training code under `python`, `torchrun` or `accelerate launch`.

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR/PORT); we read them and pick
gloo on CPU and NCCL on CUDA, so nothing in the command line changes between the two.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from bitserve.models.loading import resolve_device

from .errors import OptionError

# How long the other ranks wait for rank 0 to evaluate and save. Eval has no collective, and a
# long one must not trip NCCL's watchdog (10 minutes by default), so the wait runs on a gloo group.
WAIT_FOR_MAIN = _dt.timedelta(hours=12)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    _wait_group: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wait_for_main(self) -> None:
        """Every rank returns once rank 0 gets here (after its eval and save); a CPU barrier
        with its own long timeout, not a collective on the training backend."""
        if self.distributed:
            dist.barrier(group=self._wait_group)

    def sum(self, value: float) -> float:
        """The sum of a scalar over all processes."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def rank_device(requested: str, size: int, local_rank: int) -> str:
    """The device spec one rank uses: under a multi-process launch each rank takes the GPU of
    its LOCAL_RANK; naming one GPU there would put every rank on it."""
    if size > 1 and requested.startswith("cuda:"):
        raise OptionError(
            f"--device {requested} with {size} processes would put every rank on that GPU; "
            "pass --device cuda (each rank uses the GPU of its LOCAL_RANK) or limit GPUs "
            "with CUDA_VISIBLE_DEVICES"
        )
    if size > 1 and requested == "cuda":
        return f"cuda:{local_rank}"
    return requested


def setup(device: str = "auto", *, timeout: _dt.timedelta | None = None) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(rank_device(device, size, local_rank))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if size > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    wait_group = None
    if size > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if timeout is not None:
                dist.init_process_group(backend=backend, timeout=timeout)
            else:
                dist.init_process_group(backend=backend)
        wait_group = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN)
    return World(rank=rank, size=size, local_rank=local_rank, device=dev, _wait_group=wait_group)
