"""Checkpoints: our own format with metadata, plus the layouts public CIFAR ResNet files use.

Checkpoints are untrusted input: they are read with `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers, so a file carrying code is refused.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from .errors import CheckpointError
from .io import atomic_path
from .models import CifarResNet, blocks_per_stage, build_model, parse_arch

FORMAT = "cifar-toolchain/1"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "artifacts" / "resnet20_cifar10.pt"


@dataclass
class Checkpoint:
    """A model plus what is known about it."""

    model: CifarResNet
    arch: str
    classes: tuple[str, ...] = CIFAR10_CLASSES
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    meta: dict = field(default_factory=dict)  # training record, accuracy, compression, ...


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint, extra: dict | None = None) -> None:
    """Write atomically; `extra` holds resumable training state (optimizer, epoch, ...)."""
    payload = {
        "format": FORMAT,
        "arch": ckpt.arch,
        "num_classes": len(ckpt.classes),
        "inner_widths": ckpt.model.inner_widths(),
        "classes": list(ckpt.classes),
        "normalization": {"mean": list(ckpt.mean), "std": list(ckpt.std)},
        "meta": ckpt.meta,
        "state_dict": ckpt.model.state_dict(),
    }
    if extra:
        payload["training_state"] = extra
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_payload(path: str | os.PathLike) -> dict:
    """The raw dictionary in a checkpoint file, read safely, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refused to load {path}: it holds objects other than tensors and "
                              "plain containers (possibly code); only weights are accepted") from exc
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError,
            IndexError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or another "
                              f"format?): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                              ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a state dict")
    return payload


def _state_dict_of(payload: dict, path) -> dict:
    state = payload.get("state_dict", payload.get("model", payload))
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def infer_arch(state: dict) -> str | None:
    """resnetN from the number of blocks in the first stage, if the keys show it."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer1\.(\d+)\.", k))}
    depth = 6 * len(blocks) + 2 if blocks else None
    return f"resnet{depth}" if depth in (20, 32, 44, 56, 110) else None


def load_checkpoint(path: str | os.PathLike | None = None, arch: str | None = None) -> Checkpoint:
    """Load any supported checkpoint layout into a model (the shipped baseline by default)."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    payload = read_payload(path)
    state = _state_dict_of(payload, path)
    ours = payload.get("format") == FORMAT
    file_arch = payload.get("arch") if ours else None
    if arch is not None:
        try:
            parse_arch(arch)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        if file_arch and parse_arch(file_arch) != parse_arch(arch):
            raise CheckpointError(f"{path} holds a {file_arch}, not the requested {arch}")
    arch = file_arch or arch or infer_arch(state)
    if arch is None:
        raise CheckpointError(f"{path} does not say its architecture; pass --arch resnet20|resnet32|...")
    depth = parse_arch(arch)
    linear = state.get("linear.weight")
    num_classes = int(payload.get("num_classes") or (linear.shape[0] if linear is not None else 10))
    widths = payload.get("inner_widths") if ours else None
    if widths is None:  # public files: widths follow from conv1 shapes where present
        n = blocks_per_stage(depth)
        widths = [int(state[k].shape[0]) if (k := f"layer{s}.{i}.conv1.weight") in state else w
                  for s, w in zip((1, 2, 3), (16, 32, 64)) for i in range(n)]
    model = build_model(arch, num_classes, widths)
    load_state_strict(model, state, path)
    norm = payload.get("normalization") or {}
    return Checkpoint(model=model, arch=f"resnet{depth}",
                      classes=tuple(payload.get("classes") or CIFAR10_CLASSES[:num_classes]),
                      mean=tuple(norm.get("mean", CIFAR10_MEAN)), std=tuple(norm.get("std", CIFAR10_STD)),
                      meta=payload.get("meta", {}) if ours else {"source": str(path)})


def load_state_strict(model: torch.nn.Module, state: dict, path) -> None:
    """Load with one clear error naming the first key that does not fit."""
    expected = model.state_dict()
    state = dict(state)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:  # older public files lack it
            state[key] = value
        if key not in state:
            raise CheckpointError(f"{path} does not fit {type(model).__name__}: missing key {key!r}")
        if state[key].shape != value.shape:
            raise CheckpointError(f"{path} does not fit the model: {key!r} has shape "
                                  f"{tuple(state[key].shape)} in the file, {tuple(value.shape)} in the model")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path} does not fit the model: unexpected key {unexpected[0]!r}")
    model.load_state_dict(state)
