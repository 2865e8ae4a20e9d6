"""The peers the report compares against: L1-norm pruning (Torch-Pruning) and ONNX Runtime int8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export.int8_peer import quantize_int8
from export.manifest import read_metadata
from toolchain.errors import ToolchainError
from toolchain.methods.l1_peer import L1Config, apply_l1
from toolchain.methods.second import SecondConfig, apply_second
from toolchain.pipeline import ExportConfig, run_export


@pytest.mark.parametrize("ratio, round_to", [(0.5, 1), (0.8, 1), (0.5, 8)])
def test_l1_peer_keeps_the_largest_filters_at_method_seconds_widths(baseline, ratio, round_to):
    model = baseline.model
    pruned, info = apply_l1(model, L1Config(ratio=ratio, round_to=round_to))
    _, second = apply_second(model, SecondConfig(ratio=ratio, round_to=round_to, n_init=1))
    assert info["inner_widths"] == second["inner_widths"]
    for old, new in zip(model.blocks(), pruned.blocks()):
        norms = old.conv1.weight.abs().sum((1, 2, 3))
        kept = norms.argsort(descending=True)[: new.conv1.out_channels].sort().values
        assert torch.equal(new.conv1.weight, old.conv1.weight[kept])  # the largest L1 norms, unchanged
        assert torch.equal(new.bn1.running_var, old.bn1.running_var[kept])
        assert torch.equal(new.conv2.weight, old.conv2.weight[:, kept])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_salient_clusters_keep_the_l1_peers_filters_and_merge_the_dropped_ones(baseline):
    model = baseline.model
    peer, _ = apply_l1(model, L1Config(ratio=0.5, round_to=1))
    ours, info = apply_second(model, SecondConfig(ratio=0.5, round_to=1, keep="salient"))
    assert info["keep"] == "salient" and info["inner_widths"] == peer.inner_widths()
    for old, p, o in zip(model.blocks(), peer.blocks(), ours.blocks()):
        torch.testing.assert_close(o.conv1.weight, p.conv1.weight)  # the same filters as the peer
        # every original conv2 input slice lands in exactly one kept channel (summed), none is lost
        torch.testing.assert_close(o.conv2.weight.sum(1), old.conv2.weight.sum(1))
        assert not torch.allclose(o.conv2.weight, p.conv2.weight)


@pytest.mark.slow
def test_l1_peer_exports_and_recalibration_recovers_accuracy_on_real_images(baseline_path, data_root, tmp_path):
    from eval.accuracy import evaluate_onnx
    from toolchain.data import load_split

    out = tmp_path / "l1.onnx"
    result = run_export(ExportConfig(method="l1", ratio=0.5, round_to=1, checkpoint=str(baseline_path),
                                     data=str(data_root), finetune_epochs=0, test_limit=1000, stage_accuracy=True,
                                     out=str(out)),
                        log=print)
    accuracy = result.manifest["accuracy"]
    assert set(accuracy) == {"pruned", "recalibrated"}  # no least-squares step for the peer
    assert accuracy["recalibrated"] > accuracy["pruned"] + 0.1  # BN statistics matter after pruning
    assert result.manifest["inner_widths"] == [8, 8, 8, 16, 16, 16, 32, 32, 32]
    onnx_eval = evaluate_onnx(out, load_split(data_root, "test").subset(1000))
    assert abs(onnx_eval["accuracy"] - accuracy["recalibrated"]) <= 0.002  # ONNX Runtime = PyTorch


@pytest.mark.slow
def test_int8_peer_is_a_quarter_of_the_bytes_at_the_baselines_accuracy(baseline_path, data_root, tmp_path):
    from eval.accuracy import evaluate_onnx
    from toolchain.data import load_split

    base = run_export(ExportConfig(method="none", checkpoint=str(baseline_path), data=str(data_root),
                                   test_limit=10, out=str(tmp_path / "base.onnx")), log=print)
    manifest = quantize_int8(base.path, tmp_path / "int8.onnx", "int8-dynamic")
    assert manifest["method"] == "int8-dynamic" and manifest["normalization"] == base.manifest["normalization"]
    assert read_metadata(onnx.load(str(tmp_path / "int8.onnx")))["method"] == "int8-dynamic"
    assert manifest["model_bytes"] < 0.3 * base.manifest["model_bytes"]
    split = load_split(data_root, "test").subset(1000)
    float_acc = evaluate_onnx(base.path, split)["accuracy"]
    int8_acc = evaluate_onnx(tmp_path / "int8.onnx", split)["accuracy"]
    assert abs(int8_acc - float_acc) <= 0.01


def test_int8_peer_refuses_a_foreign_file_and_writes_nothing(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]),
                                opset_imports=[helper.make_opsetid("", 17)]), foreign)
    with pytest.raises(ToolchainError, match="not written by this toolchain"):
        quantize_int8(foreign, tmp_path / "out.onnx", "int8-dynamic")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_before_fine_tuning_method_second_beats_the_l1_peer_on_real_images(baseline, train_split, test_split):
    """Budget 0 of the peer comparison, ratio 0.5: measured on the 10,000 test images with 1,024
    calibration images, salient clusters + the block and classifier refit reached 78.30%, the L1
    peer with BN recalibration 49.29% (with conv2 refit alone: salient 69.46%, medoids 63.13%)."""
    from toolchain.data import to_tensor
    from toolchain.methods.second import reconstruct
    from toolchain.training import evaluate, recalibrate_bn

    calibration = to_tensor(train_split.subset(512, seed=0).images, baseline.mean, baseline.std)
    held_out = test_split.subset(1000, seed=1)
    accuracy = {}
    for keep in ("salient", "medoid", "centroid"):
        model, _ = apply_second(baseline.model, SecondConfig(ratio=0.5, round_to=1, n_init=2, keep=keep))
        reconstruct(model, baseline.model, calibration)
        recalibrate_bn(model, train_split, images=512, keep_outputs=True)
        accuracy[keep] = evaluate(model, held_out)
    peer, _ = apply_l1(baseline.model, L1Config(ratio=0.5, round_to=1))
    recalibrate_bn(peer, train_split, images=512)
    accuracy["l1"] = evaluate(peer, held_out)
    # Every refit strategy far above the peer; salient, the default, the best within noise (20 of 1,000
    # images): one run's strict order of the three is not a property of the method.
    assert min(accuracy["salient"], accuracy["medoid"], accuracy["centroid"]) > accuracy["l1"] + 0.1, accuracy
    assert accuracy["salient"] >= max(accuracy["medoid"], accuracy["centroid"]) - 0.02, accuracy
