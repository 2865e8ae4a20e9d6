"""Run by tests/test_training.py, alone or under torchrun: fit() on real images for a few steps, saving the
weights of every process. A net without BatchNorm and no augmentation (crops drawn per process differ from
one process's), so that N processes with batch B must end where one process with batch N x B ends.

    python tests/ddp_steps.py DATA BATCH_SIZE OUT_DIR
"""

import sys
from pathlib import Path

import torch
from torch import nn

from toolchain import data
from toolchain.distributed import torchrun_world
from toolchain.training import TrainConfig, fit


def main(root: str, batch_size: str, out: str) -> None:
    data.augment = lambda images, generator: images
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    train = data.load_split(root, "train").subset(512)
    Path(out).mkdir(parents=True, exist_ok=True)
    with torchrun_world() as world:
        if world.rank == 0:
            torch.save(model.state_dict(), Path(out) / "start.pt")
        fit(model, train, None, TrainConfig(epochs=2, batch_size=int(batch_size), lr=0.05), log=lambda _: None,
            rank=world.rank, world_size=world.size)
        torch.save(model.state_dict(), Path(out) / f"rank{world.rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
