"""PyTorch -> ONNX, then a check that ONNX Runtime gives the same logits as PyTorch.

The exporter is the TorchScript-based one (`dynamo=False`): it can keep BatchNorm as
separate nodes and leave the weight-rebuilding Gather of method first unfolded
(`training=PRESERVE`, `do_constant_folding=False`), which the shared-weight file needs.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import torch
from onnx import numpy_helper

from toolchain.errors import ToolchainError
from toolchain.io import atomic_path, check_writable

from .manifest import set_metadata, write_manifest

OPSET = 17
INT4_OPSET = 21  # the first opset whose Cast reads INT4 tensors (method first's 4-bit centroids)
INPUT_NAME, OUTPUT_NAME = "input", "logits"
TOLERANCE = 1e-4


class ExportCheckError(ToolchainError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance."""


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float
    manifest: dict


def _export_to(model: torch.nn.Module, path: Path, keep_structure: bool) -> None:
    model = model.eval()
    dummy = torch.zeros(2, 3, 32, 32)
    options = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False) \
        if keep_structure else dict(do_constant_folding=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch_size"}, OUTPUT_NAME: {0: "batch_size"}},
                          **options)


def max_logit_difference(model: torch.nn.Module, onnx_path: Path, inputs: torch.Tensor) -> float:
    """Max |PyTorch - ONNX Runtime| over the logits of `inputs` (CPU provider)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.eval()(inputs).numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy().astype(np.float32)})[0]
    return float(np.abs(expected - got).max())


def export_onnx(model: torch.nn.Module, out: str | os.PathLike, manifest: dict,
                check_inputs: torch.Tensor, *, keep_structure: bool = False, int4: tuple[str, ...] = (),
                tolerance: float = TOLERANCE) -> ExportResult:
    """Export `model` to `out` atomically, check it against PyTorch, embed and write the manifest.

    `keep_structure` keeps BatchNorm nodes and un-folded weight expressions (method first), and
    gives the initializers short names (the manifest maps them back: `initializers`).
    `int4` names initializers holding 4-bit codes, to be stored two a byte (see `store_int4`).
    The check runs on the final graph; the manifest goes into the file's metadata_props and
    beside it (`<out stem>.manifest.json`, which adds the file's bytes). Both files appear
    only once everything succeeded.
    """
    out = check_output_path(out)
    with atomic_path(out) as tmp:
        _export_to(model, tmp, keep_structure)
        proto = onnx.load(str(tmp))
        proto.producer_name = "cifar-filter-toolchain"
        if int4:
            proto = store_int4(proto, int4)
        names = compact_names(proto.graph, initializers=keep_structure)
        drop_default_attributes(proto)
        onnx.save(proto, str(tmp))
        diff = max_logit_difference(model, tmp, check_inputs)
        if not diff <= tolerance:
            raise ExportCheckError(f"ONNX Runtime's logits differ from PyTorch's by {diff:.2e} "
                                   f"(tolerance {tolerance:.0e}); the export is not written")
        manifest = {**manifest, "max_abs_diff": diff, "check_images": int(len(check_inputs)),
                    **({"initializers": names} if names else {})}
        set_metadata(proto, manifest)  # metadata only: the checked graph is unchanged
        onnx.save(proto, str(tmp))
        manifest = write_manifest(out, manifest, sized_from=tmp)
    return ExportResult(out, diff, manifest)


def store_int4(proto: onnx.ModelProto, names: tuple[str, ...]) -> onnx.ModelProto:
    """The model with these initializers stored 4 bits a value, two a byte: int8 codes within -8..7
    as INT4 (method first's 4-bit centroids), uint8 within 0..15 as UINT4 (weight-clustering indices).

    The nodes stay as they are, but the Cast that reads the codes takes 4-bit tensors only from
    opset 21 on: the model moves to opset 21 (ONNX's own converter) and to the IR version that 4-bit
    types need. ONNX Runtime folds that Cast at load as it does for 8 bits (a DequantizeLinear would stay)."""
    proto = onnx.version_converter.convert_version(proto, INT4_OPSET)
    proto.ir_version = max(proto.ir_version, onnx.helper.find_min_ir_version_for(list(proto.opset_import)))
    wanted = set(names)
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.name not in wanted:
            continue
        codes = numpy_helper.to_array(tensor)
        kind = _FOUR_BIT.get(codes.dtype.type)
        if kind is None or codes.min(initial=kind[1]) < kind[1] or codes.max(initial=kind[1]) > kind[1] + 15:
            raise ValueError(f"initializer {tensor.name} does not hold 4-bit codes")
        nibbles = np.concatenate([codes.ravel(), np.zeros(codes.size % 2, codes.dtype)]).view(np.uint8) & 0xF
        packed = nibbles[0::2] | (nibbles[1::2] << 4)  # ONNX's layout: the first code in the low nibble
        proto.graph.initializer[i].CopyFrom(onnx.helper.make_tensor(
            tensor.name, kind[0], codes.shape, packed.tobytes(), raw=True))
        wanted.discard(tensor.name)
    if wanted:
        raise ValueError(f"no 4-bit initializer named {', '.join(sorted(wanted))}")
    return proto


# The 4-bit ONNX type for each numpy type of codes, and the smallest code it holds.
_FOUR_BIT = {np.int8: (onnx.TensorProto.INT4, -8), np.uint8: (onnx.TensorProto.UINT4, 0)}


def drop_default_attributes(proto: onnx.ModelProto) -> None:
    """Remove the node attributes that only restate the operator's default (BatchNormalization's
    epsilon, momentum and training_mode, Conv's group, all-ones dilations and strides): about 2.7 kB
    of a ResNet20 graph, which in a 90 kB codebook file is 3% of it."""
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    for node in proto.graph.node:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        for attribute in list(node.attribute):
            default = schema.attributes.get(attribute.name)
            restated = (default is not None and default.default_value.type
                        and onnx.helper.get_attribute_value(attribute) == onnx.helper.get_attribute_value(default.default_value))
            if restated or (node.op_type == "Conv" and attribute.name in _ONES and set(attribute.ints) == {1}):
                node.attribute.remove(attribute)


_ONES = ("dilations", "strides")  # Conv's: 1 along each axis when absent (the spec says so; the schema has no default)


def check_output_path(out: str | os.PathLike) -> Path:
    """Fail before any work is done when the output cannot be an ONNX file."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ToolchainError(f"output {out} must end in .onnx")
    if out.is_dir():
        raise ToolchainError(f"output {out} is a folder; give a file name ending in .onnx")
    check_writable(out)
    return out


def compact_names(graph: onnx.GraphProto, initializers: bool = False) -> dict[str, str]:
    """Short names for nodes and intermediate values, no doc strings.

    The exporter names every value after its module path ("/layer1/layer1.0/conv1/Conv_output_0");
    in a 60 KB shared-weight file those names are a third of the bytes. Inputs and outputs keep
    their names, and so do initializers unless `initializers` (w0, w1, ...: in a 65 kB codebook
    file their module paths, written twice, would be 5 kB; an int8 file's quantizer adds three per
    weight). Returns {short name: old name} of the renamed initializers.
    """
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    renamed: dict[str, str] = {}
    if initializers:
        for index, tensor in enumerate(graph.initializer):
            renamed[tensor.name] = tensor.name = f"w{index}"
    else:
        keep |= {t.name for t in graph.initializer}
    originals = {short: long for long, short in renamed.items()}
    for index, node in enumerate(graph.node):
        node.name = f"n{index}"
        node.doc_string = ""
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for i, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = node.output[i] = f"t{len(renamed)}"
    del graph.value_info[:]
    return originals
