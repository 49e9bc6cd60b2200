"""Data-parallel generator training under `torchrun` (or `accelerate launch`, which sets the same
environment): every rank holds the frozen backbones and a replica of the generator, takes its slice
of each global batch, and the gradients are summed across ranks before the optimizer step.

The loss of a rank is weighted by its share of the global batch (scored tokens for the
cross-entropy, rows for the L2 penalty), so the summed gradient is the gradient of the
single-process loss on the whole batch: N ranks train the same generator as one process (tested
with two CPU ranks on gloo). Without WORLD_SIZE > 1 in the environment nothing here does anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist

from tflow.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def setup(batch_size: int, device: str) -> World:
    """Join the process group torchrun described in the environment (nccl on CUDA, gloo on CPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if batch_size % size:
        raise ConfigError(f"train.batch_size={batch_size} must be a multiple of the number of ranks ({size}): "
                          "every rank takes an equal slice of each global batch")
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return world


def rank_device(device: str, world: World) -> str:
    """cuda -> cuda:<local rank> under torchrun; other devices unchanged."""
    return f"cuda:{world.local_rank}" if world.parallel and device.startswith("cuda") else device


def shard(items: Sequence[T], world: World) -> list[T]:
    """This rank's slice of a global batch (rows rank, rank + size, ...)."""
    return list(items[world.rank::world.size])


def all_sum(values: Sequence[float], world: World, device: str | torch.device = "cpu") -> list[float]:
    """Element-wise sums over ranks of a few scalars, in one collective."""
    if not world.parallel:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params: Iterable[torch.nn.Parameter], world: World) -> None:
    """Sum the gradients over ranks (each rank's loss is already weighted by its share)."""
    if not world.parallel:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)


def barrier(world: World) -> None:
    if world.parallel:
        dist.barrier()


def teardown(world: World) -> None:
    if world.parallel and dist.is_initialized():
        dist.destroy_process_group()
