"""ONNX Runtime sessions: load and validate a file, pick a provider, refuse silent fallback."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from toolchain.errors import ToolchainError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ModelFileError(ToolchainError):
    """An .onnx file that is missing, not ONNX, or not a CIFAR classifier."""


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and validate an ONNX file: full checker pass and a [batch, 3, 32, 32] input."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model {path} does not exist")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # protobuf DecodeError, ValidationError, shape inference errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"{path} is not a valid ONNX model: {first}") from exc
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
    if len(dims) != 4 or dims[1:] != [3, 32, 32]:
        raise ModelFileError(f"{path} takes input shape {dims or 'unknown'}, expected [batch, 3, 32, 32] "
                             "(a CIFAR-10 image classifier)")
    return proto


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def create_session(path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                   optimized_path: str | None = None):
    """An InferenceSession on exactly the requested provider, or a clear error."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ToolchainError(f"unknown provider {provider!r}; choose cpu or cuda")
    wanted = PROVIDERS[provider]
    if wanted not in available_providers():
        raise ToolchainError(f"execution provider {provider} is not available (have: "
                             f"{', '.join(available_providers())}); for cuda install onnxruntime-gpu "
                             "in place of onnxruntime (pip install '.[gpu]')")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    providers = [wanted] if provider == "cpu" else [wanted, PROVIDERS["cpu"]]
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # ORT raises its own exception types (e.g. newer opset than supported)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"ONNX Runtime cannot load {path}: {first}") from exc
    if session.get_providers()[0] != wanted:
        raise ToolchainError(f"ONNX Runtime fell back to {session.get_providers()[0]} instead of "
                             f"{wanted}; available: {', '.join(available_providers())}")
    return session
