"""Static int8 deployment on real images: `toolchain quantize`, `export --quantize int8` (with a
quantization-aware fine-tune), method first's shared filters kept in int8, and the sweep's rows."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import run_cli


def _conv_weights_are_dequantized(path) -> bool:
    """Every Conv takes its input and its weight from a DequantizeLinear: ONNX Runtime's QDQ convolution."""
    graph = onnx.load(str(path)).graph
    made_by = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]

    def dequantized(name):
        node = made_by.get(name)
        while node is not None and node.op_type == "Gather":  # shared filters: Gather of an int8 table
            node = made_by.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    return bool(convs) and all(dequantized(c.input[0]) and dequantized(c.input[1]) for c in convs)


@pytest.fixture(scope="module")
def float_baseline(tmp_path_factory, baseline_path):
    out = tmp_path_factory.mktemp("float") / "baseline.onnx"
    result = run_cli("export", "--method", "none", "--checkpoint", baseline_path, "--out", out, env={"CIFAR10_ROOT": ""})
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_quantize_command_on_real_images(float_baseline, data_root, test_split, tmp_path):
    from eval.accuracy import evaluate_onnx
    out = tmp_path / "int8.onnx"
    result = run_cli("quantize", float_baseline, "--data", data_root, "--out", out, "--calibration-images", "256",
                     "--json", "-")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["quantization"]["calibration_images"] == 256 and manifest["model_bytes"] == out.stat().st_size
    assert _conv_weights_are_dequantized(out)
    assert out.stat().st_size < 0.3 * float_baseline.stat().st_size
    images = test_split.subset(1000)
    before, after = evaluate_onnx(float_baseline, images)["accuracy"], evaluate_onnx(out, images)["accuracy"]
    assert after > before - 0.025  # post-training int8 within 2.5 points, on real images
    # Deterministic for a seed; another seed takes other calibration images.
    again, other = tmp_path / "again.onnx", tmp_path / "other.onnx"
    assert run_cli("quantize", float_baseline, "--data", data_root, "--out", again, "--calibration-images", "256").returncode == 0
    assert again.read_bytes() == out.read_bytes()
    assert run_cli("quantize", float_baseline, "--data", data_root, "--out", other, "--calibration-images", "256",
                   "--seed", "1").returncode == 0
    assert other.read_bytes() != out.read_bytes()
    # The edge checks read int8 files as any other.
    check = run_cli("check", out, "--max-bytes", "300KB", "--max-latency-ms", "50")
    assert check.returncode == 0 and "PASS  latency_ms" in check.stdout, check.stderr


@pytest.mark.slow
def test_quantize_refuses_what_it_cannot_quantize(float_baseline, data_root, tmp_path):
    out = tmp_path / "int8.onnx"
    assert run_cli("quantize", float_baseline, "--data", data_root, "--out", out, "--calibration-images", "64").returncode == 0
    cases = [  # (arguments, message start)
        ([out, "--data", data_root, "--out", tmp_path / "twice.onnx"], f"error: {out} is already quantized"),
        ([float_baseline, "--data", tmp_path / "empty", "--out", tmp_path / "x.onnx"], "error: dataset folder"),
        ([float_baseline, "--data", tmp_path, "--out", tmp_path / "x.onnx"], f"error: {tmp_path} has no train/ folder"),
        ([float_baseline, "--data", data_root, "--out", tmp_path / "x.txt"], "error: output"),
        ([tmp_path / "missing.onnx", "--data", data_root], "error: model"),
    ]
    for args, start in cases:
        result = run_cli("quantize", *args)
        assert result.returncode == 2 and result.stderr.startswith(start), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.manifest.json", "int8.onnx"]  # nothing else written


def test_the_simulation_is_what_onnx_runtime_runs(baseline, float_baseline, train_split, test_split):
    """The PyTorch model that simulates int8 gives ONNX Runtime's int8 logits more closely than the float
    model does, and the same class on nearly every real image."""
    from eval.runtime import create_session
    from export.int8_static import calibration_images, quantize_int8
    from toolchain.data import to_tensor
    from toolchain.quantization import simulated
    import copy
    out = float_baseline.with_name("sim_check.onnx")
    calibration = calibration_images(onnx.load(str(float_baseline)), train_split, 256, 0)
    quantize_int8(float_baseline, out, calibration)
    x = to_tensor(test_split.images[:500], baseline.mean, baseline.std)
    runtime = create_session(out).run(None, {"input": x.numpy()})[0]
    model = copy.deepcopy(baseline.model).eval()
    with torch.no_grad():
        as_float = model(x).numpy()
        with simulated(model, torch.from_numpy(calibration)):
            as_int8 = model(x).numpy()
        assert np.array_equal(model(x).numpy(), as_float)  # removed: the float model again
    assert (as_int8.argmax(1) == runtime.argmax(1)).mean() >= 0.98
    assert np.abs(as_int8 - runtime).mean() < 0.85 * np.abs(as_float - runtime).mean()


@pytest.mark.slow
def test_export_quantize_int8_fine_tunes_through_the_rounding(baseline_path, data_root, test_split, tmp_path):
    from eval.accuracy import evaluate_onnx
    out = tmp_path / "second_int8.onnx"
    result = run_cli("export", "--method", "second", "--ratio", "0.5", "--round-to", "1", "--quantize", "int8",
                     "--checkpoint", baseline_path, "--data", data_root, "--finetune-epochs", "1",
                     "--train-limit", "2048", "--test-limit", "500", "--out", out, "--json", "-")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert _conv_weights_are_dequantized(out)
    accuracy = manifest["accuracy"]
    assert {"reconstructed", "int8_calibrated", "finetuned", "int8_simulated", "onnx_int8"} <= set(accuracy)
    # What the export reports of the int8 file is the file's accuracy, measured here again.
    assert evaluate_onnx(out, test_split.subset(500))["accuracy"] == accuracy["onnx_int8"]
    assert abs(accuracy["onnx_int8"] - accuracy["int8_simulated"]) <= 0.02
    assert accuracy["onnx_int8"] > 0.6
    assert manifest["int8_check"]["top1_agreement_simulated"] >= 0.95 and manifest["config"]["quantize"] == "int8"


@pytest.mark.slow
def test_method_first_keeps_its_shared_filters_in_int8(baseline_path, data_root, tmp_path):
    float_file, int8_file = tmp_path / "first.onnx", tmp_path / "first_int8.onnx"
    result = run_cli("export", "--method", "first", "--ratio", "0.5", "--checkpoint", baseline_path, "--data", data_root,
                     "--finetune-epochs", "0", "--test-limit", "200", "--out", float_file, "--json", "-")
    assert result.returncode == 0, result.stderr
    ks = sorted(layer["k"] for layer in json.loads(result.stdout)["layers"])
    assert run_cli("quantize", float_file, "--data", data_root, "--out", int8_file,
                   "--calibration-images", "128").returncode == 0
    graph = onnx.load(str(int8_file)).graph
    tables = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shared = [tables[n.input[0]] for n in graph.node if n.op_type == "Gather" and tables[n.input[0]].dtype == np.int8]
    # An int8 table of distinct filters for every clustered conv (and for the two option-A shortcut
    # convs, mostly zeros): filters of one cluster round to the same codes, so about k rows each.
    assert len(shared) >= len(ks)
    assert sum(len(t) for t in shared) <= 1.1 * sum(ks) + 64
    assert _conv_weights_are_dequantized(int8_file)
    assert int8_file.stat().st_size < 0.6 * 0.3 * 1_083_000  # well under an unshared int8 ResNet20


def test_quantize_int8_needs_data_and_no_narrower_centroids(baseline_path, tmp_path):
    out = tmp_path / "x.onnx"
    no_data = run_cli("export", "--method", "none", "--quantize", "int8", "--checkpoint", baseline_path, "--out", out,
                      env={"CIFAR10_ROOT": ""})
    assert no_data.returncode == 2 and no_data.stderr.startswith("error: --quantize int8 calibrates on training images")
    both = run_cli("export", "--method", "first", "--quantize", "int8", "--centroid-bits", "8", "--out", out)
    assert both.returncode == 2 and both.stderr.startswith("error: --quantize int8 rounds every weight itself")
    assert not out.exists()


@pytest.mark.slow
def test_sweep_adds_int8_rows_and_compares_them(baseline_path, data_root, tmp_path):
    report = tmp_path / "report"
    result = run_cli("sweep", "--method", "second", "--ratios", "0.5", "--quantize", "int8", "--data", data_root,
                     "--checkpoint", baseline_path, "--finetune-epochs", "0", "--round-to", "1", "--test-limit", "200",
                     "--repeats", "2", "--out", report)
    assert result.returncode == 0, result.stderr
    rows = json.loads((report / "results.json").read_text())["rows"]
    assert [(r["method"], r.get("quantize")) for r in rows] == [
        ("none", None), ("none", "int8"), ("second", None), ("second", "int8")]
    assert all(r["model_bytes"] < 0.3 * f["model_bytes"] for r, f in ((rows[1], rows[0]), (rows[3], rows[2])))
    text = (report / "report.md").read_text()
    assert "## Static int8 (ONNX Runtime QDQ) against float" in text and "| second qint8 r0.5 |" in text
