"""Shared fixtures. Tests that need the real CIFAR-10 copy in ../shared fail under CI when it is
missing (CI set to anything but an empty or false value) and are skipped elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Absolute, so CLI subprocesses started in other folders find it too (CI passes a relative path).
REAL_DATA = Path(os.environ.get("CIFAR10_ROOT") or REPO.parent / "shared" / "datasets" / "cifar10-jpeg").absolute()
BASELINE = REPO / "artifacts" / "resnet20_cifar10.pt"


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def cache_folder(request):
    """Decoded images go to the tests' own folder in pytest's cache of this checkout (.pytest_cache;
    CLI subprocesses inherit it), never to the user's cache nor ../shared. The first run decodes
    each split (the training split: about 40 s); later runs of the suite read it back."""
    folder = request.config.cache.mkdir("toolchain-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOOLCHAIN_CACHE_DIR", str(folder))
        yield folder


def under_ci() -> bool:
    """CI services set CI to true, True, 1, yes...: any value but an empty or false one counts."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def has_cifar10(root: Path) -> bool:
    """Either layout --data takes: test/<class>/ image folders, or torchvision's cifar-10-batches-py
    (the folder itself or a folder holding it)."""
    return (root / "test").is_dir() or any((folder / "test_batch").is_file()
                                           for folder in (root, root / "cifar-10-batches-py"))


def require(path: Path, what: str, present=Path.exists) -> Path:
    if not present(path):
        message = f"{what} not found at {path}"
        if under_ci():
            pytest.fail(message + " (required under CI)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return require(REAL_DATA, "the real CIFAR-10 copy", has_cifar10)


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
    return require(BASELINE, "the shipped baseline checkpoint")


@pytest.fixture(scope="session")
def baseline(baseline_path):
    from toolchain.checkpoints import load_checkpoint
    return load_checkpoint(baseline_path)


def random_resnet20(seed: int = 0):
    """A ResNet20 with random weights and non-trivial BatchNorm statistics and affines."""
    from toolchain.models import build_model
    torch.manual_seed(seed)
    model = build_model("resnet20")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


def run_cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the real `toolchain` command in a subprocess."""
    full_env = {**os.environ, "CIFAR10_ROOT": str(REAL_DATA), **(env or {})}
    return subprocess.run([sys.executable, "-m", "toolchain", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd or REPO, timeout=900)
