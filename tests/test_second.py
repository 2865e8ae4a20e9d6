
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import random_resnet20
from toolchain.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from toolchain.data import to_tensor
from toolchain.methods.second import (SecondConfig, apply_second, block_errors, kept_width, latency_widths,
                                      padded_widths, reconstruct)
from toolchain.models import build_model, count_macs
from toolchain.pipeline import ExportConfig, run_export
from toolchain.training import evaluate


def test_pruned_shapes_and_macs():
    pruned, info = apply_second(random_resnet20(), SecondConfig(ratio=0.5))
    assert info["inner_widths"] == [8] * 3 + [16] * 3 + [32] * 3
    for block, width in zip(pruned.blocks(), info["inner_widths"]):
        assert block.conv1.weight.shape[0] == width and block.conv2.weight.shape[1] == width
        assert block.bn1.num_features == width and block.conv2.out_channels in (16, 32, 64)
    assert count_macs(pruned) <= 0.52 * count_macs(random_resnet20())


@pytest.mark.parametrize("ratio, round_to, width16", [(0.5, 1, 8), (0.5, 16, 16), (0.8, 8, 8), (0.9, 1, 2)])
def test_round_to(ratio, round_to, width16):
    assert kept_width(16, ratio, round_to) == width16


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("block", [8, 16])
def test_latency_allocation_costs_no_more_at_the_same_budget(ratio, block):
    model = build_model("resnet20")
    full = model.inner_widths()
    uniform = [kept_width(f, ratio, 1) for f in full]
    widths = latency_widths(model, ratio, 1, block)
    macs = lambda w: count_macs(build_model("resnet20", inner_widths=w))  # noqa: E731
    assert widths[:3] == [widths[0]] * 3 and widths[3:6] == [widths[3]] * 3  # one width per stage
    # the same budget: at most uniform's multiply-adds, less by under one channel of the costliest stage
    channel = macs([2] * 3 + uniform[3:]) - macs([1] * 3 + uniform[3:])  # stage 1: the largest images
    assert macs(uniform) - channel < macs(widths) <= macs(uniform)
    assert macs(padded_widths(widths, full, block)) <= macs(padded_widths(uniform, full, block))


def test_latency_allocation_moves_filters_out_of_blocks_below_the_channel_block():
    # Ratio 0.5 keeps 8 of stage 1's 16 filters: no faster than 16 with AVX-512's block of 16.
    widths = latency_widths(build_model("resnet20"), 0.5, 1, 16)
    assert widths[0] > 8 and widths[-1] < 32
    pruned, info = apply_second(random_resnet20(), SecondConfig(ratio=0.5, allocation="latency", channel_block=16))
    assert pruned.inner_widths() == widths and info["allocation"] == "latency"
    with pytest.raises(ValueError, match="allocation"):
        SecondConfig(allocation="global")


@pytest.mark.parametrize("keep", ["salient", "medoid", "centroid", "largest"])
def test_duplicate_filters_merge_exactly(keep):
    model = random_resnet20()
    with torch.no_grad():
        for block in model.blocks():  # every filter of conv1 (and its BN) appears twice
            half = block.conv1.out_channels // 2
            block.conv1.weight[half:] = block.conv1.weight[:half]
            for t in (block.bn1.weight, block.bn1.bias, block.bn1.running_mean, block.bn1.running_var):
                t[half:] = t[:half]
    pruned, _ = apply_second(model, SecondConfig(ratio=0.5, keep=keep))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(pruned(x), model(x), atol=1e-4, rtol=1e-4)


def test_pruned_checkpoint_round_trip(tmp_path):
    pruned, _ = apply_second(random_resnet20(), SecondConfig(ratio=0.75))
    path = tmp_path / "pruned.pt"
    save_checkpoint(path, Checkpoint(pruned, "resnet20"))
    loaded = load_checkpoint(path)
    assert loaded.model.inner_widths() == pruned.inner_widths()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model.eval()(x), pruned(x))


def test_bad_ratio():
    for bad in (0, 1, -1, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            SecondConfig(ratio=bad)


def test_exported_graph_is_smaller_and_matches(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    source = tmp_path / "src.pt"
    save_checkpoint(source, Checkpoint(random_resnet20(), "resnet20"))
    out = tmp_path / "second.onnx"
    result = run_export(ExportConfig(method="second", ratio=0.5, round_to=1, checkpoint=str(source),
                                     out=str(out)), log=print)
    proto = onnx.load(str(out))
    conv_out = sorted(int(t.dims[0]) for t in proto.graph.initializer if len(t.dims) == 4)
    # stem 16; block conv1s 8/16/32 (narrowed); block conv2s 16/32/64 (full)
    assert conv_out == [8] * 3 + [16] * 7 + [32] * 6 + [64] * 3
    assert result.manifest["inner_widths"] == [8] * 3 + [16] * 3 + [32] * 3
    # ONNX Runtime gives the logits of the model apply_second makes from the same checkpoint.
    expected, _ = apply_second(load_checkpoint(source).model, SecondConfig(ratio=0.5, round_to=1))
    x = torch.randn(3, 3, 32, 32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected.eval()(x).detach().numpy(), atol=1e-4)


@torch.no_grad()
@pytest.mark.slow
def test_refit_keeps_an_unpruned_model_and_fixes_its_classifier():
    """Every filter kept: each refit target is what the block already computes (conv1 on the same
    input, conv2 on the inverse of BN2 of the block output less its shortcut), so the refit must
    keep the function; a spoiled classifier must come back from the logits."""
    original = random_resnet20().eval()
    pruned, info = apply_second(original, SecondConfig(ratio=0.005))
    assert info["inner_widths"] == original.inner_widths()
    pruned.linear.weight.mul_(-1)
    x = torch.randn(128, 3, 32, 32)
    errors = reconstruct(pruned, original, x, ridge=1e-9)
    assert errors[-1]["relative_error_before"] > 1
    assert max(e["relative_error_after"] for e in errors) < 1e-6, errors
    torch.testing.assert_close(pruned(x[:8]), original(x[:8]), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_least_squares_helps_on_held_out_real_images(baseline, train_split, test_split):
    pruned, _ = apply_second(baseline.model, SecondConfig(ratio=0.5, n_init=2))
    held_out = to_tensor(test_split.subset(256, seed=1).images)
    before = block_errors(pruned, baseline.model, held_out)
    merged_accuracy = evaluate(pruned, test_split.subset(1000))
    reconstruct(pruned, baseline.model, to_tensor(train_split.subset(512, seed=0).images))
    after = block_errors(pruned, baseline.model, held_out)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert evaluate(pruned, test_split.subset(1000)) > merged_accuracy + 0.2


@pytest.mark.parametrize("keep", ["medoid", "largest", "salient"])
def test_members_kept_are_original_filters(keep):
    model = random_resnet20().eval()
    pruned, info = apply_second(model, SecondConfig(ratio=0.5, keep=keep))
    assert info["keep"] == keep
    for old, new in zip(model.blocks(), pruned.blocks()):
        x = torch.randn(4, old.conv1.in_channels, 8, 8)
        # Every kept filter is one of the originals, at its raw scale (fine-tuning depends on it).
        distances = torch.cdist(new.conv1.weight.detach().flatten(1), old.conv1.weight.detach().flatten(1),
                                compute_mode="donot_use_mm_for_euclid_dist")
        assert distances.min(1).values.max() < 1e-5
        chosen = distances.argmin(1)
        assert len(set(chosen.tolist())) == new.conv1.out_channels
        # ... and its BN1 channel computes what the original channel computed.
        torch.testing.assert_close(new.bn1(new.conv1(x)), old.bn1(old.conv1(x))[:, chosen], atol=1e-5, rtol=1e-5)


def test_rescaled_filters_keep_the_function():
    from toolchain.methods.second import _rescale_filters

    block = random_resnet20().eval().layer2[1]
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    before = block(x)
    norms = torch.rand(block.conv2.out_channels) + 0.1
    _rescale_filters(block.conv2, block.bn2, norms)
    torch.testing.assert_close(block.conv2.weight.flatten(1).norm(dim=1), norms)
    torch.testing.assert_close(block(x), before, atol=1e-5, rtol=1e-5)
