"""Many processes with ``torch.distributed``: which rank this is, a shard of the work, and the collectives
that put the shards back together.

Launch any factlens command with ``torchrun --nproc-per-node N -m ...``: :func:`init_from_environment`
joins the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``/``PORT``) with the
gloo backend, which runs on CPUs and on CPU copies of GPU results alike. Without a process group every
helper here is the single-process identity, so library code calls them unconditionally.

Work is split round-robin (``items[rank::world]``): neighbouring facts or batches, often of similar cost,
land on different ranks, and :func:`gather_shards` restores the original order.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes working together (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that prints, shows progress and writes results."""
        return self.rank == 0


def world() -> World:
    """The current process group's rank and size, or rank 0 of 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_environment() -> World:
    """Join the process group described by torchrun's environment (gloo backend), left again when the
    process exits; alone without it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(_leave)
    return world()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device() -> torch.device:
    """This rank's default device: its own GPU (``LOCAL_RANK``) where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def shard(items: Sequence[T], current: World | None = None) -> list[T]:
    """This rank's share of ``items``: every ``size``-th item from position ``rank``."""
    current = current or world()
    return list(items[current.rank::current.size])


def gather_shards(local: list[T], current: World | None = None) -> list[T]:
    """Every rank's :func:`shard` results, on every rank, in the order of the items they came from."""
    current = current or world()
    if current.size == 1:
        return list(local)
    shards: list[list[T] | None] = [None] * current.size
    dist.all_gather_object(shards, local)
    merged: list[T] = []
    for i in range(max(len(s) for s in shards)):
        merged.extend(s[i] for s in shards if i < len(s))
    return merged


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (in place, and returned); itself when alone."""
    if world().size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait until every rank is here (nothing when alone)."""
    if world().size > 1:
        dist.barrier()
