"""Static int8 quantization of an ONNX file, calibrated on real images: what edge CPUs run.

ONNX Runtime's `quantize_static` in the QDQ format: int8 weights with a symmetric scale per output
channel, uint8 activations with one scale and zero point per tensor, their ranges taken as the
minimum and maximum over seeded training images. ONNX Runtime fuses each QuantizeLinear /
DequantizeLinear pair around a Conv into its integer kernels at load (VNNI instructions run them
fastest). Weights rebuilt in the graph (method first's Gather of shared centroids) are folded into
plain initializers first, since the quantizer needs a weight it can read; afterwards the repeated
rows of every int8 weight are shared again (a table of distinct filters and a Gather, as method
first's float file has), which ONNX Runtime folds at load before it fuses the integer kernels.
Filters of one cluster quantize to the same codes: a per-channel scale absorbs the BatchNorm scale
folded into each.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from toolchain.data import CIFAR10_MEAN, CIFAR10_STD, Split, to_tensor
from toolchain.errors import ToolchainError
from toolchain.io import atomic_path

from .manifest import normalization, read_manifest, set_metadata, write_manifest
from .onnx_export import check_output_path, compact_names

# Operators that only a quantized graph holds: a file with one of them is not quantized again.
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "ConvInteger",
                 "MatMulInteger", "QLinearMatMul", "QLinearAdd", "QGemm"}
# The int8 file against the PyTorch model that simulates it (toolchain.quantization): the share of
# check images whose top-1 class they agree on. Not exact: ONNX Runtime fuses operators and rounds
# biases to int32 where the simulation does not, so near-ties can flip.
INT8_AGREEMENT = 0.95
SCHEME = {"format": "QDQ", "weights": "int8, symmetric, per output channel",
          "activations": "uint8, per tensor, min-max over the calibration images"}


def quantized_ops(proto: onnx.ModelProto) -> list[str]:
    return sorted({n.op_type for n in proto.graph.node if n.op_type in QUANTIZED_OPS})


def calibration_images(proto: onnx.ModelProto, split: Split, count: int, seed: int) -> np.ndarray:
    """`count` seeded images of `split`, normalised as the file's manifest says (CIFAR-10's otherwise)."""
    mean, std = normalization(proto)
    return to_tensor(split.subset(count, seed).images, mean, std).numpy()


def _folded(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every constant subgraph (a Gather of centroids, a Cast and Mul of codes) computed
    into an initializer, by ONNX Runtime's own constant folding."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        source, folded = Path(tmp) / "in.onnx", Path(tmp) / "folded.onnx"
        onnx.save(proto, str(source))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(folded)
        opts.log_severity_level = 3
        ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
        return onnx.load(str(folded))


def agreement(path, images: np.ndarray, simulated: np.ndarray, float_logits: np.ndarray) -> dict:
    """How the int8 file at `path` agrees with the simulating model's logits and with the float model's;
    an ExportCheckError below INT8_AGREEMENT with the simulation."""
    import onnxruntime as ort

    from .onnx_export import ExportCheckError

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    report = {"images": len(images),
              "top1_agreement_simulated": float((logits.argmax(1) == simulated.argmax(1)).mean()),
              "max_abs_diff_simulated": float(np.abs(logits - simulated).max()),
              "top1_agreement_float": float((logits.argmax(1) == float_logits.argmax(1)).mean())}
    if report["top1_agreement_simulated"] < INT8_AGREEMENT:
        raise ExportCheckError(f"the int8 file agrees with its PyTorch simulation on "
                               f"{report['top1_agreement_simulated']:.1%} of {len(images)} images, under "
                               f"{INT8_AGREEMENT:.0%}: not written")
    return report


def quantize_int8(source: str | os.PathLike, out: str | os.PathLike, images: np.ndarray, manifest: dict | None = None,
                  batch_size: int = 64, verify=None, extra=None) -> dict:
    """Write `source` quantized to int8 (QDQ) into `out`, calibrated on `images` (normalised NCHW);
    returns the manifest written beside it and into it. A file already quantized is refused.
    `verify(path)` may check the quantized file before it is written (raise to write nothing);
    `extra()` then adds to the manifest."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    out = check_output_path(out)
    try:
        proto = onnx.load(str(source))
    except Exception as exc:
        raise ToolchainError(f"{source} is not a valid ONNX model: {exc}") from exc
    found = quantized_ops(proto)
    if found:
        raise ToolchainError(f"{source} is already quantized (it holds {', '.join(found)}): give a float model")
    if not len(images):
        raise ToolchainError("static quantization needs calibration images; none were given")
    base = manifest if manifest is not None else read_manifest(source)
    base = base or {"normalization": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}}
    name = _input_name(proto)
    batches = [{name: images[i:i + batch_size]} for i in range(0, len(images), batch_size)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)

        def get_next(self):
            return next(self._batches, None)

    with _quiet_quantizer(), tempfile.TemporaryDirectory() as tmp, atomic_path(out) as target:
        folded = Path(tmp) / "folded.onnx"
        onnx.save(_folded(proto), str(folded))
        quantize_static(str(folded), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        quantized = onnx.load(str(target))
        _drop_zero_weight_offsets(quantized.graph)
        _share_repeated_filters(quantized.graph)
        compact_names(quantized.graph, initializers=True)
        full = {**base, "quantization": {**SCHEME, "calibration_images": len(images), "source": str(source)}}
        set_metadata(quantized, full)
        onnx.save(quantized, str(target))
        if verify is not None:  # the file as it will be, metadata (the input normalisation) included
            verify(target)
            full.update(extra() if extra else {})
            set_metadata(quantized, full)
            onnx.save(quantized, str(target))
        return write_manifest(out, full, sized_from=target)


def _input_name(proto: onnx.ModelProto) -> str:
    initializers = {t.name for t in proto.graph.initializer}
    return next(i.name for i in proto.graph.input if i.name not in initializers)


def _drop_zero_weight_offsets(graph: onnx.GraphProto) -> None:
    """Symmetric int8 weights have zero points of 0, DequantizeLinear's default: leave them out."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if (node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in initializers
                and node.input[2] in initializers):
            offsets = numpy_helper.to_array(initializers[node.input[2]])
            if offsets.dtype == np.int8 and not offsets.any():
                del node.input[2]
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _share_repeated_filters(graph: onnx.GraphProto) -> None:
    """Each int8 conv weight with repeated filters becomes a table of its distinct filters and a
    Gather of them (int32 indices), where that is smaller."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        weight = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        codes = numpy_helper.to_array(weight) if weight is not None else None
        if codes is None or codes.dtype != np.int8 or codes.ndim != 4:
            nodes.append(node)
            continue
        table, index = np.unique(codes.reshape(len(codes), -1), axis=0, return_inverse=True)
        if table.size + 4 * len(codes) >= codes.size:
            nodes.append(node)
            continue
        name = weight.name
        graph.initializer.remove(weight)
        graph.initializer.extend([numpy_helper.from_array(table.reshape(-1, *codes.shape[1:]), f"{name}_table"),
                                  numpy_helper.from_array(index.reshape(-1).astype(np.int32), f"{name}_index")])
        nodes.append(helper.make_node("Gather", [f"{name}_table", f"{name}_index"], [f"{name}_shared"], axis=0))
        node.input[0] = f"{name}_shared"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


@contextmanager
def _quiet_quantizer():
    """The quantizer logs advice on the root logger at WARNING: keep the user's terminal for results."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
