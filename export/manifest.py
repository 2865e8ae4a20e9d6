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
    return _sizes(Path(path).read_bytes())


def _sizes(data: bytes) -> dict:
    return {"model_bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9, mtime=0))}


# What the file itself carries of the manifest: what a reader of the file alone needs (eval, check,
# quantize), not the long records (per-layer clustering, refit errors, training history), which at
# a 60 kB file would be a tenth of it. The sidecar JSON holds everything.
EMBEDDED_FIELDS = ("method", "ratio", "arch", "classes", "normalization", "source_checkpoint", "params", "macs",
                   "accuracy", "test_images", "centroid_bits", "quantization", "max_abs_diff", "check_images",
                   "versions")


def set_metadata(proto: onnx.ModelProto, manifest: dict) -> None:
    """Embed the manifest's short entry (and the input normalisation, for other tools) in metadata_props."""
    del proto.metadata_props[:]
    short = {key: manifest[key] for key in EMBEDDED_FIELDS if key in manifest}
    entries = {MANIFEST_KEY: json.dumps(short, sort_keys=True, separators=(",", ":")),
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


def read_manifest(model_path: str | os.PathLike) -> dict:
    """The whole manifest: the sidecar JSON beside the file where there is one, else the file's entry."""
    beside = manifest_path(model_path)
    if beside.is_file():
        return json.loads(beside.read_text())
    return read_metadata(onnx.load(str(model_path), load_external_data=False))


def manifest_path(model_path: str | os.PathLike) -> Path:
    """`model.onnx` -> `model.manifest.json` (distinct from a checkpoint's training record)."""
    return Path(model_path).with_suffix(".manifest.json")


def write_manifest(model_path: str | os.PathLike, manifest: dict, sized_from=None) -> dict:
    """Write the manifest beside `model_path`, with the bytes of `sized_from` (default: the model)."""
    data = Path(sized_from or model_path).read_bytes()
    full = {**manifest, **_sizes(data), "bytes_by_part": bytes_by_part(onnx.load_from_string(data))}
    write_json(manifest_path(model_path), full)
    return full


# The node whose input an initializer ends up in, through the ops that rebuild a weight (Cast, Gather,
# Mul, Reshape...), names the part of the model it belongs to.
_PARTS = {"Conv": "conv_weights", "ConvInteger": "conv_weights", "QLinearConv": "conv_weights",
          "BatchNormalization": "batchnorm", "Gemm": "classifier", "MatMul": "classifier"}


def bytes_by_part(proto: onnx.ModelProto) -> dict:
    """The file's bytes split into conv weights (tables, indices, scales), BatchNorm, classifier,
    other initializers, the graph (nodes, names, shapes) and the metadata; they add up to the file."""
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def part(value: str, seen: set) -> str:
        for node in consumers.get(value, []):
            if node.op_type in _PARTS:
                return _PARTS[node.op_type]
            for out in node.output:
                if out not in seen:
                    seen.add(out)
                    found = part(out, seen)
                    if found != "other_initializers":
                        return found
        return "other_initializers"

    parts = dict.fromkeys(("conv_weights", "batchnorm", "classifier", "other_initializers"), 0)
    for tensor in proto.graph.initializer:
        parts[part(tensor.name, set())] += tensor.ByteSize()
    parts["metadata"] = sum(prop.ByteSize() for prop in proto.metadata_props)
    parts["graph"] = proto.ByteSize() - sum(parts.values())
    return parts
