"""Data-parallel training under torchrun: one process per core (or GPU), rank 0 writes files.

`torchrun --nproc_per_node=N -m toolchain train ...` runs the same command in N processes;
each trains on its own shard of every epoch and DistributedDataParallel averages the
gradients, so N processes take the steps one process would take with N times the batch.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1


@contextmanager
def torchrun_world():
    """The process group torchrun set up through its environment, or a world of one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World()
        return
    # Training runs on the CPU here, so gloo; NCCL would need the model on a GPU.
    dist.init_process_group("gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size())
        # Leave together: rank 1 once aborted (SIGABRT) tearing the group down while rank 0 still
        # exported. Not on an exception: a barrier could then meet another rank's all-reduce.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def data_parallel(model: nn.Module, world_size: int) -> nn.Module:
    """The module to run training steps through: DDP averages gradients across processes."""
    if world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(model)


def sum_over_processes(values: list[float], world_size: int) -> list[float]:
    """Per-epoch counters (loss sum, correct, seen) summed over all processes."""
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
