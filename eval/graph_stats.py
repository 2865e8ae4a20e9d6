"""Parameters and multiply-adds read off an ONNX graph (for files without our manifest)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference


def onnx_params(proto: onnx.ModelProto) -> int:
    """Elements of floating-point initializers (indices and shapes are not parameters)."""
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in proto.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                      onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8, onnx.TensorProto.INT4)))


def onnx_macs(proto: onnx.ModelProto) -> int:
    """Multiply-adds of Conv and Gemm nodes for one image, from inferred shapes."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 1
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    weights = {t.name: list(t.dims) for t in proto.graph.initializer}
    total = 0
    for node in inferred.graph.node:
        if node.op_type == "Conv":
            w = weights.get(node.input[1]) or shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if w and out:
                total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            w = weights.get(node.input[1])
            if w:
                total += int(np.prod(w))
    return total
