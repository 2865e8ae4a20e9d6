"""Top-1 accuracy of an ONNX file (ONNX Runtime) or a checkpoint (PyTorch) on CIFAR-10 test images."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm import tqdm

from export.manifest import file_sizes, normalization, read_metadata
from toolchain.data import Split, batches
from toolchain.errors import ToolchainError

from .graph_stats import onnx_macs, onnx_params
from .memory import session_memory
from .runtime import PROVIDERS, create_session, load_onnx


def evaluate_onnx(path: str | os.PathLike, split: Split, provider: str = "cpu",
                  batch_size: int = 256, threads: int | None = None) -> dict:
    proto = load_onnx(path)
    manifest = read_metadata(proto)
    check_classes(manifest.get("classes"), split, path)
    mean, std = normalization(proto)
    session = create_session(path, provider, threads)
    input_name = session.get_inputs()[0].name
    correct = 0
    start = time.perf_counter()
    for x, y in tqdm(batches(split, batch_size, mean=mean, std=std), desc="evaluating",
                     total=-(-len(split) // batch_size), leave=False, mininterval=1.0, disable=None):
        logits = session.run(None, {input_name: x.numpy()})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
    seconds = time.perf_counter() - start
    return {"model": str(path), "provider": provider, "accuracy": correct / len(split),
            "images": len(split), **file_sizes(path),
            "params": manifest["params"] if "params" in manifest else onnx_params(proto),
            "macs": manifest["macs"] if "macs" in manifest else onnx_macs(proto), "seconds": round(seconds, 3),
            "session_rss_bytes": session_memory(path, batch_size, PROVIDERS[provider])}


def check_classes(model_classes, split: Split, path) -> None:
    """Labels are indices: a model and a dataset must list the same classes in the same order."""
    if model_classes is not None and tuple(model_classes) != tuple(split.classes):
        raise ToolchainError(f"{path} was trained on classes {', '.join(model_classes)} but the dataset has "
                             f"{', '.join(split.classes)}; accuracy would be meaningless")


def evaluate_checkpoint(path: str | os.PathLike, split: Split, batch_size: int = 500,
                        arch: str | None = None) -> dict:
    from toolchain.checkpoints import load_checkpoint
    from toolchain.models import count_macs, count_params
    from toolchain.training import evaluate

    ckpt = load_checkpoint(path, arch)
    check_classes(ckpt.classes, split, path)
    start = time.perf_counter()
    accuracy = evaluate(ckpt.model, split, batch_size, ckpt.mean, ckpt.std, progress=True)
    seconds = time.perf_counter() - start
    return {"model": str(path), "provider": "pytorch-cpu", "accuracy": accuracy,
            "images": len(split), **file_sizes(path), "params": count_params(ckpt.model),
            "macs": count_macs(ckpt.model), "seconds": round(seconds, 3)}


def evaluate_model(path: str | os.PathLike, split: Split, **kwargs) -> dict:
    """Dispatch on the file type: .onnx runs under ONNX Runtime, anything else is a checkpoint."""
    if Path(path).suffix == ".onnx":
        return evaluate_onnx(path, split, **{k: v for k, v in kwargs.items() if k != "arch"})
    if kwargs.get("provider", "cpu") != "cpu":
        raise ToolchainError(f"{path} is a PyTorch checkpoint, evaluated on the CPU; export it to ONNX "
                             "to evaluate it on another provider")
    return evaluate_checkpoint(path, split, kwargs.get("batch_size", 500), kwargs.get("arch"))
