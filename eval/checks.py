"""Edge-deployment checks of an ONNX file: valid, loadable, small enough, fast enough."""

from __future__ import annotations

import os
import re

from export.manifest import file_sizes, read_metadata
from toolchain.errors import ConfigError

from .bench import BenchConfig, bench
from .graph_stats import onnx_params
from .runtime import create_session, load_onnx

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3,
          "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3}


def parse_size(text: str) -> int:
    """'300KB', '1.5MB', '2MiB' or plain bytes -> bytes (KB = 1000 bytes, KiB = 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"{text!r} is not a size; use e.g. 300KB, 1.5MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def check_model(path: str | os.PathLike, max_bytes: int | None = None, max_params: int | None = None,
                max_latency_ms: float | None = None, repeats: int = 50) -> list[dict]:
    """One row per figure: name, value, limit, ok. Validation errors raise ModelFileError."""
    proto = load_onnx(path)  # full checker pass and input shape [batch, 3, 32, 32]
    create_session(path, "cpu")  # ONNX Runtime can load it
    rows = [{"check": "valid", "value": True, "limit": None, "ok": True}]
    if max_bytes is not None:
        size = file_sizes(path)["model_bytes"]
        rows.append({"check": "bytes", "value": size, "limit": max_bytes, "ok": size <= max_bytes})
    if max_params is not None:
        manifest = read_metadata(proto)  # the same figure `eval` reports, when the file has one
        params = manifest["params"] if "params" in manifest else onnx_params(proto)
        rows.append({"check": "params", "value": params, "limit": max_params, "ok": params <= max_params})
    if max_latency_ms is not None:
        row = bench([path], BenchConfig(batch_sizes=(1,), repeats=repeats))[0]
        rows.append({"check": "latency_ms", "value": row["p50_ms"], "limit": max_latency_ms,
                     "ok": row["p50_ms"] <= max_latency_ms})
    return rows
