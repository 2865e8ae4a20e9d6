"""The weight-clustering peer (TensorFlow Model Optimization's scheme): 16 values per conv, 4-bit indices."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from conftest import run_cli
from toolchain.data import to_tensor
from toolchain.errors import ConfigError
from toolchain.methods.weight_clustering import (WeightClusteringConfig, apply_weight_clustering,
                                                 clustered_convs, strip)
from toolchain.models import build_model, count_params
from toolchain.pipeline import ExportConfig, compress_and_tune, export_compressed, load_data, load_source


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet20").eval()


def test_every_conv_weight_is_one_of_16_values_its_nearest(model):
    clustered, info = apply_weight_clustering(model, WeightClusteringConfig(n_init=1))
    convs = dict(clustered_convs(clustered))
    originals = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs.keys() == originals.keys() and len(info["layers"]) == 19
    for name, conv in convs.items():
        weight, original = conv.weight.detach(), originals[name].weight.detach()
        assert len(torch.unique(weight)) <= 16 and conv.index.dtype == torch.uint8 and conv.index.max() <= 15
        # each weight took the value nearest to it (K-Means' last assignment)
        nearest = (original.reshape(-1, 1) - conv.values.detach()).abs().min(1).values
        torch.testing.assert_close((weight - original).abs().flatten(), nearest)
        assert torch.equal(conv.shadow.detach(), original)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(clustered(x), model(x))


def test_training_reassigns_weights_and_trains_values_and_shadow_weights(model):
    """As TFMOT's wrapper: in training each weight goes to its nearest value at every step; the gradient
    reaches the values (averaged over their weights) and, straight through, the shadow weights."""
    clustered, _ = apply_weight_clustering(model, WeightClusteringConfig(n_init=1))
    conv = clustered.layer2[0].conv1
    with torch.no_grad():
        conv.shadow[0, 0, 0, 0] = conv.values.max() + 1.0  # nearest to the largest value now
    conv.train()
    weight = conv.weight
    assert conv.index[0] == conv.values.argmax()
    upstream = torch.randn_like(weight)
    (weight * upstream).sum().backward()
    torch.testing.assert_close(conv.shadow.grad, upstream)
    summed = torch.zeros(len(conv.values)).index_add_(0, conv.index.long(), upstream.flatten())
    members = torch.bincount(conv.index.long(), minlength=len(conv.values)).clamp_min(1)
    torch.testing.assert_close(conv.values.grad, summed / members)  # averaged: a sum diverges under SGD
    torch.testing.assert_close(weight, conv.values[conv.index.long()].view_as(weight))
    conv.eval()
    assert torch.equal(conv.weight, conv.values[conv.index.long()].view_as(weight))


def test_strip_drops_the_shadow_weights_and_keeps_the_function(model):
    clustered, _ = apply_weight_clustering(model, WeightClusteringConfig(n_init=1))
    x = torch.randn(2, 3, 32, 32)
    before = clustered(x)
    strip(clustered)
    assert all(conv.shadow is None for _, conv in clustered_convs(clustered))
    assert torch.equal(clustered(x), before)
    assert count_params(clustered) < count_params(model) / 50  # 16 values a conv, BN and the classifier
    for _, conv in clustered_convs(clustered):  # in training mode too, the assignment stays
        assert torch.equal(conv.train().weight, conv.eval().weight)


@pytest.mark.parametrize("clusters", [1, 17, 2.5, True])
def test_bad_cluster_counts_are_refused(clusters):
    with pytest.raises(ConfigError, match="2 to 16 values"):
        WeightClusteringConfig(clusters=clusters)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, baseline_path, data_root):
    """A real export: clustered, BN recalibrated and fine-tuned one short epoch on real images."""
    cfg = ExportConfig(method="weight-clustering", checkpoint=str(baseline_path), data=str(data_root),
                       finetune_epochs=1, train_limit=1024, test_limit=1000, stage_accuracy=True)
    ckpt, source = load_source(cfg)
    data = load_data(cfg.data, cfg.train_limit, cfg.test_limit, cfg.seed)
    compressed = compress_and_tune(cfg, ckpt, source, data, print)
    out = tmp_path_factory.mktemp("wc") / "wc.onnx"
    return compressed, export_compressed(compressed, cfg, out, print), data


@pytest.mark.slow
def test_fine_tuning_moves_values_and_assignments_and_keeps_16_per_conv(exported, baseline):
    compressed, _, _ = exported
    first, _ = apply_weight_clustering(baseline.model, WeightClusteringConfig())
    tuned, start = dict(clustered_convs(compressed.model)), dict(clustered_convs(first))
    assert any(not torch.equal(tuned[n].values, start[n].values) for n in tuned)
    assert any(not torch.equal(tuned[n].index, start[n].index) for n in tuned)  # re-assigned while training
    for conv in tuned.values():
        assert len(torch.unique(conv.weight.detach())) <= 16 and conv.shadow is None


@pytest.mark.slow
def test_the_file_stores_16_values_and_4bit_indices_and_runs_as_pytorch(exported, tmp_path):
    compressed, result, data = exported
    proto = onnx.load(str(result.path))
    initializers = {t.name: t for t in proto.graph.initializer}
    names = {v: k for k, v in result.manifest["initializers"].items()}
    convs = dict(clustered_convs(compressed.model))
    for name, conv in convs.items():
        index, values = initializers[names[f"{name}.index"]], initializers[names[f"{name}.values"]]
        assert index.data_type == onnx.TensorProto.UINT4 and len(index.raw_data) == (conv.index.numel() + 1) // 2
        assert numpy_helper.to_array(values).shape == (16,)
        assert np.array_equal(numpy_helper.to_array(index).astype(np.int64), conv.index.numpy())
    conv_shapes = {tuple(conv.shape) for conv in convs.values()}
    assert not any(tuple(t.dims) in conv_shapes for t in proto.graph.initializer)  # no conv weight stored whole
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(result.path), opts, providers=["CPUExecutionProvider"])
    x = to_tensor(data.test.subset(16, 0).images, compressed.ckpt.mean, compressed.ckpt.std)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], compressed.model.eval()(x).numpy(),
                                   atol=1e-4)
    assert not {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node} & {"Gather", "Cast"}
    # a file a sixth of the baseline's that keeps most of the accuracy on real images
    from eval.accuracy import evaluate_onnx
    accuracy = evaluate_onnx(result.path, data.test)["accuracy"]
    assert accuracy == pytest.approx(result.manifest["accuracy"]["finetuned"], abs=0.004)
    assert accuracy > 0.8 and result.manifest["model_bytes"] < 0.16 * 1_082_590


@pytest.mark.parametrize("args, message", [
    (["--ratio", "0.3"], "error: --ratio plays no part in weight-clustering c16 (its options set its size): leave it out"),
    (["--codebook-size", "16"], "error: --codebook-size is an option of method first, not of weight-clustering"),
])
def test_weight_clustering_options_are_one_line_errors(tmp_path, args, message):
    result = run_cli("export", "--method", "weight-clustering", *args, "--out", tmp_path / "w.onnx")
    assert result.returncode == 2 and result.stderr.strip() == message, result.stderr
    assert not list(tmp_path.iterdir())
