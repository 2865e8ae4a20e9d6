"""Shared fixtures. Tests that need the real CIFAR-10 copy in ../shared fail under CI when it is
missing (CI=true) and are skipped elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("CIFAR10_ROOT") or REPO.parent / "shared" / "datasets" / "cifar10-jpeg")
BASELINE = REPO / "artifacts" / "resnet20_cifar10.pt"


@pytest.fixture(autouse=True, scope="session")
def _threads():
    """Decoded images go to the user cache (never ../shared), shared across runs."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        message = f"{what} not found at {path}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required under CI)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _require(REAL_DATA / "test", "the real CIFAR-10 copy").parent


@pytest.fixture(scope="session")
def test_split(data_root):
    from toolchain.data import load_split
    return load_split(data_root, "test")


@pytest.fixture(scope="session")
def train_split(data_root):
    from toolchain.data import load_split
    return load_split(data_root, "train")


@pytest.fixture(scope="session")
def baseline_path() -> Path:
    return _require(BASELINE, "the shipped baseline checkpoint")


@pytest.fixture(scope="session")
def baseline(baseline_path):
    from toolchain.checkpoints import load_checkpoint
    return load_checkpoint(baseline_path)


def run_cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the real `toolchain` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "toolchain", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd or REPO, timeout=900)
