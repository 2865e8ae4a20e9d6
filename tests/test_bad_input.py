"""Every row of the README's bad-input table, fed to the real command: exit status 2, one line
saying what is wrong, and no file left behind."""

import os
import re

import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from conftest import run_cli
from toolchain.models import build_model


def _identity_onnx(path, shape, opset):
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _image_folder(root, corrupt=False):
    from PIL import Image
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / split / "cat" / "0.png")
    if corrupt:
        (root / "test" / "cat" / "1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _pickled_with_code(root):
    import pickle
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _Payload(), "labels": []}))
    return root


# (case, how to build the arguments from (inputs folder, baseline, data root), the message's start as the
# README's table gives it: {t} the inputs folder, ... anything)
CASES = [
    ("checkpoint missing", lambda t, b, d: ["export", "--checkpoint", t / "missing.pt"],
     "checkpoint {t}/missing.pt does not exist"),
    ("checkpoint empty", lambda t, b, d: ["eval", _write(t / "empty.pt", b""), "--data", d],
     "checkpoint {t}/empty.pt is empty"),
    ("checkpoint truncated", lambda t, b, d: ["eval", _write(t / "half.pt", b.read_bytes()[:50_000]), "--data", d],
     "{t}/half.pt is not a readable PyTorch checkpoint (truncated or another format"),
    ("checkpoint not PyTorch", lambda t, b, d: ["eval", _write(t / "notes.pt", b"just some text\n" * 50),
                                                "--data", d],
     "{t}/notes.pt is not a readable PyTorch checkpoint (truncated or another format"),
    ("checkpoint with code", lambda t, b, d: ["eval", _saved(t / "code.pt", {"x": _Payload()}), "--data", d],
     "refused to load {t}/code.pt: it holds objects other than tensors"),
    ("checkpoint of another depth", lambda t, b, d: ["eval", _saved(t / "r32.pt", build_model("resnet32").state_dict()),
                                                     "--arch", "resnet20", "--data", d],
     "{t}/r32.pt ... unexpected key 'layer1.3."),
    ("unknown architecture", lambda t, b, d: ["train", "--arch", "resnet21", "--data", d],
     "unknown architecture 'resnet21'; choose one of"),
    ("ratio 0", lambda t, b, d: ["export", "--ratio", "0"], "... 0 is not between 0 and 1 (exclusive)"),
    ("ratio 1", lambda t, b, d: ["export", "--ratio", "1"], "... 1 is not between 0 and 1 (exclusive)"),
    ("ratio negative", lambda t, b, d: ["export", "--ratio", "-0.5"], "... -0.5 is not between 0 and 1 (exclusive)"),
    ("ratio NaN", lambda t, b, d: ["export", "--ratio", "nan"], "... nan is not between 0 and 1 (exclusive)"),
    ("ratio text", lambda t, b, d: ["export", "--ratio", "half"], "... 'half' is not a number"),
    ("unknown method", lambda t, b, d: ["export", "--method", "third"], "Invalid value for '--method': 'third'"),
    ("allocation of method second for first", lambda t, b, d: ["export", "--allocation", "latency"],
     "allocation must be one of uniform, global for method first, "),
    ("allocation for the L1 peer", lambda t, b, d: ["export", "--method", "l1", "--allocation", "latency"],
     "the L1 peer prunes to uniform widths"),
    ("centroid bits for method second", lambda t, b, d: ["export", "--method", "second", "--centroid-bits", "8"],
     "--centroid-bits is an option of method first, not of second"),
    ("features for method second", lambda t, b, d: ["export", "--method", "second", "--features", "raw"],
     "--features is an option of method first, not of second"),
    ("keep for method first", lambda t, b, d: ["export", "--keep", "medoid"],
     "--keep is an option of method second, not of first"),
    ("round-to for method first", lambda t, b, d: ["export", "--round-to", "8"],
     "--round-to is an option of method second and l1, not of first"),
    ("no-reconstruct for the L1 peer", lambda t, b, d: ["export", "--method", "l1", "--no-reconstruct"],
     "--no-reconstruct is an option of method first and second, not of l1"),
    ("centroid bits 3", lambda t, b, d: ["export", "--centroid-bits", "3"], "Invalid value for '--centroid-bits': '3'"),
    ("feature distillation without a teacher", lambda t, b, d: ["export", "--distill-features", "1", "--no-distill"],
     "--distill-features takes a weight of 0 or more, and the teacher"),
    ("distillation temperature without a teacher",
     lambda t, b, d: ["export", "--distill-temperature", "4", "--no-distill"],  # even the default's value
     "--distill-temperature takes a temperature above 0, and the teacher"),
    ("distillation temperature 0", lambda t, b, d: ["export", "--distill-temperature", "0"],
     "Invalid value for '--distill-temperature': 0"),
    ("data missing", lambda t, b, d: ["eval", b, "--data", t / "nowhere"], "dataset folder {t}/nowhere does not exist"),
    ("data empty", lambda t, b, d: ["eval", b, "--data", _mkdir(t / "empty")],
     "{t}/empty has no test/ folder and no cifar-10-batches-py/ "),
    ("data wrong layout", lambda t, b, d: ["eval", b, "--data", _mkdir(t / "flat", "img.png")],
     "{t}/flat has no test/ folder and no cifar-10-batches-py/ "),
    ("data pickled batch with code", lambda t, b, d: ["eval", b, "--data", _pickled_with_code(t / "pk")],
     "{t}/pk/... refusing to load posix.system from a data file"),
    ("data corrupt image", lambda t, b, d: ["eval", b, "--data", _image_folder(t / "bad", corrupt=True)],
     "corrupt image {t}/bad/test/cat/1.jpg"),
    ("onnx garbage", lambda t, b, d: ["eval", _write(t / "g.onnx", b"\x00garbage" * 100), "--data", d],
     "{t}/g.onnx is not a valid ONNX model: "),
    ("onnx truncated", lambda t, b, d: ["eval", _write(t / "t.onnx", _exported(t)[: 40_000]), "--data", d],
     "{t}/t.onnx is not a valid ONNX model: "),
    ("onnx of another model", lambda t, b, d: ["eval", _identity_onnx(t / "big.onnx", ["N", 3, 64, 64], 17),
                                               "--data", d], "{t}/big.onnx takes input shape [... expected [batch, 3, 32, 32]"),
    ("onnx newer opset", lambda t, b, d: ["eval", _identity_onnx(t / "new.onnx", ["N", 3, 32, 32], 99),
                                          "--data", d], "ONNX Runtime cannot load {t}/new.onnx: ... opset"),
    ("output not .onnx", lambda t, b, d: ["export", "--out", t / "model.txt"], "output {t}/model.txt must end in .onnx"),
    ("output parent is a file", lambda t, b, d: ["export", "--method", "none", "--out",
                                                 _write(t / "file", b"x") / "m.onnx"],
     "cannot write {t}/file/m.onnx: a parent of it is a file"),
    ("output folder read-only", lambda t, b, d: ["export", "--method", "none", "--out", "/sys/m.onnx"],
     "cannot write /sys/m.onnx: permission denied in /sys"),
    ("cuda without onnxruntime-gpu", lambda t, b, d: ["eval", _write(t / "m.onnx", _exported(t)), "--data", d,
                                                      "--provider", "cuda", "--limit", "10", "--json", "eval.json"],
     "execution provider cuda is not available (have: "),
]


def _starts_like(line: str, template: str, inputs) -> bool:
    """`line` starts with the README's message, where ... stands for anything."""
    parts = [re.escape(part) for part in template.format(t=inputs).split("...")]
    return re.match(".*".join(parts), line) is not None


def _write(path, data):
    path.write_bytes(data)
    return path


def _saved(path, obj):
    torch.save(obj, path)
    return path


def _mkdir(path, *files):
    path.mkdir()
    for name in files:
        (path / name).write_bytes(b"x")
    return path


def _exported(t):
    from conftest import random_resnet20
    from export.onnx_export import export_onnx
    out = t / "whole.onnx"
    export_onnx(random_resnet20(), out, {"normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}},
                torch.randn(2, 3, 32, 32))
    data = out.read_bytes()
    out.unlink()
    out.with_suffix(".manifest.json").unlink()
    return data


@pytest.mark.parametrize("case, build, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_leaves_nothing(tmp_path, baseline_path, data_root, case, build, message):
    if case.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: test_eval.py forces the refusal instead")
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    args = build(inputs, baseline_path, data_root)
    before = sorted(p.relative_to(inputs) for p in inputs.rglob("*"))
    result = run_cli(*args, cwd=work)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and _starts_like(lines[0], "error: " + message, inputs), result.stderr
    assert "Traceback" not in result.stderr
    assert not any(work.iterdir())  # nothing written where the command ran
    assert sorted(p.relative_to(inputs) for p in inputs.rglob("*")) == before  # nor beside the inputs

