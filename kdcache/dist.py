"""torchrun support: process group set-up, rank-0-only steps whose errors every rank sees, barriers."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from kdcache.errors import KDCacheError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, and the device it owns."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only; a KDCacheError there is raised on every rank (no rank hangs)."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except KDCacheError as e:
                error = str(e)
        if self.active:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise KDCacheError(error)
        return result

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def device(self, requested: torch.device) -> torch.device:
        """Each rank owns one GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
        if self.active and requested.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return requested


def init_from_env(cuda: bool) -> Dist:
    """Join the torchrun job named by the environment (NCCL on GPUs, gloo on CPU); a lone process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
