"""The size peer of method first: ONNX Runtime's own 8-bit weight quantization.

What a user would run instead of method first to shrink a file: `quantize_dynamic` on the
uncompressed model (int8 weights, activations quantized at run time, no fine-tuning). The
quantized file keeps the source's manifest (with the method and bytes updated), so
`toolchain eval` normalises its inputs the same way.
"""

from __future__ import annotations

import os

import onnx

from toolchain.errors import ToolchainError
from toolchain.io import atomic_path
from toolchain.methods import Implementation

from .manifest import read_manifest, set_metadata, write_manifest
from .onnx_export import check_output_path

def quantize_int8(source: str | os.PathLike, out: str | os.PathLike, method: str) -> dict:
    """Quantize `source`'s weights to int8 into `out`; returns the new manifest, which names `method`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = check_output_path(out)
    manifest = read_manifest(source)
    if not manifest:
        raise ToolchainError(f"{source} was not written by this toolchain (no manifest to keep)")
    with atomic_path(out) as tmp:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8)
        proto = onnx.load(str(tmp))
        manifest = {**manifest, "method": method, "ratio": None, "quantized_from": str(source)}
        set_metadata(proto, manifest)
        onnx.save(proto, str(tmp))
        return write_manifest(out, manifest, sized_from=tmp)


IMPLEMENTATION = Implementation(from_file=quantize_int8)
