"""What a model is and how it was made: stored in the ONNX file and as JSON beside it."""

from __future__ import annotations

import gzip
import json
import os
from importlib import metadata
from pathlib import Path

import onnx

from toolchain.io import write_json

MANIFEST_KEY = "toolchain.manifest"


def versions() -> dict:
    found = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "cifar-filter-toolchain"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def file_sizes(path: str | os.PathLike) -> dict:
    """On-disk and gzip-compressed bytes: what a download to an edge device costs."""
    data = Path(path).read_bytes()
    return {"model_bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9, mtime=0))}


def set_metadata(proto: onnx.ModelProto, manifest: dict) -> None:
    """Embed the manifest (and the input normalisation, for other tools) in metadata_props."""
    del proto.metadata_props[:]
    entries = {MANIFEST_KEY: json.dumps(manifest, sort_keys=True),
               "normalization_mean": json.dumps(manifest["normalization"]["mean"]),
               "normalization_std": json.dumps(manifest["normalization"]["std"])}
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value


def read_metadata(proto: onnx.ModelProto) -> dict:
    """The embedded manifest, or {} for an ONNX file this toolchain did not write."""
    for prop in proto.metadata_props:
        if prop.key == MANIFEST_KEY:
            return json.loads(prop.value)
    return {}


def normalization(proto: onnx.ModelProto) -> tuple[tuple, tuple]:
    """Input mean/std recorded at export; the CIFAR-10 defaults for foreign files."""
    from toolchain.data import CIFAR10_MEAN, CIFAR10_STD

    norm = read_metadata(proto).get("normalization") or {}
    return tuple(norm.get("mean", CIFAR10_MEAN)), tuple(norm.get("std", CIFAR10_STD))


def manifest_path(model_path: str | os.PathLike) -> Path:
    """`model.onnx` -> `model.manifest.json` (distinct from a checkpoint's training record)."""
    return Path(model_path).with_suffix(".manifest.json")


def write_manifest(model_path: str | os.PathLike, manifest: dict, sized_from=None) -> dict:
    """Write the manifest beside `model_path`, with the bytes of `sized_from` (default: the model)."""
    full = {**manifest, **file_sizes(sized_from or model_path)}
    write_json(manifest_path(model_path), full)
    return full
