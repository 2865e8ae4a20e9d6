"""Parameters and multiply-adds read off an ONNX graph (for files without our manifest).

They count what toolchain.models.count_params / count_macs count on the PyTorch model: BatchNorm's
running statistics are not parameters, and a convolution whose weight the graph builds from
constants alone (the option-A shortcut's channel selection) is data movement, not a layer."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import shape_inference

_NUMBERS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
            onnx.TensorProto.INT4)


def onnx_params(proto: onnx.ModelProto) -> int:
    """Elements of floating-point (and int8/int4 code) initializers, less BatchNorm statistics
    (indices and shapes are not parameters)."""
    statistics = {name for node in proto.graph.node if node.op_type == "BatchNormalization"
                  for name in node.input[3:5]}
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in proto.graph.initializer
                   if t.data_type in _NUMBERS and t.name not in statistics))


def _stored(graph: onnx.GraphProto) -> set[str]:
    """Values that are initializers or computed from one (method first's Gather of centroids)."""
    stored = {t.name for t in graph.initializer}
    for node in graph.node:  # nodes are in topological order
        if any(name in stored for name in node.input):
            stored.update(node.output)
    return stored


def onnx_macs(proto: onnx.ModelProto) -> int:
    """Multiply-adds of Conv and Gemm nodes with stored weights for one image, from inferred shapes."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 1
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    weights = {t.name: list(t.dims) for t in proto.graph.initializer}
    stored = _stored(inferred.graph)
    total = 0
    for node in inferred.graph.node:
        if node.op_type == "Conv" and node.input[1] in stored:
            w = weights.get(node.input[1]) or shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if w and out:
                total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            w = weights.get(node.input[1])
            if w:
                total += int(np.prod(w))
    return total
