"""Method first at kernel granularity: codebooks of 3x3 kernels shared by the convs of a scope."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from conftest import run_cli
from toolchain.data import to_tensor
from toolchain.methods.first import FirstConfig, apply_first
from toolchain.methods.kernels import CodebookConv2d, drop_shadows, refit_codebooks, scope_key
from toolchain.methods.shared_tables import quantize_centroids
from toolchain.models import build_model
from toolchain.pipeline import ExportConfig, compress_and_tune, export_compressed, load_data, load_source
from toolchain.training import TrainConfig, evaluate, fit


def kernel_config(size=16, scope="stage", **kw):
    return FirstConfig(granularity="kernel", codebook_size=size, codebook_scope=scope, n_init=1, **kw)


def codebook_convs(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, CodebookConv2d)}


def distinct_kernels(convs) -> int:
    return len(torch.unique(torch.cat([c.weight.detach().flatten(0, 1).flatten(1) for c in convs]), dim=0))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet20").eval()


def test_a_fraction_sizes_each_codebook_by_its_kernels(model):
    """--codebook-size 0.25: each conv's codebook a quarter of its kernels, rounded up, so that the
    64x64 convs get 1,024 entries (int16 indices) and the 16x16 ones 64 (uint8)."""
    from toolchain.errors import ConfigError
    from toolchain.methods.kernels import codebook_entries
    clustered, info = apply_first(model, kernel_config(0.25, "layer"))
    convs = codebook_convs(clustered)
    for record in info["codebooks"]:
        conv = convs[record["layers"][0]]
        assert record["k"] == len(conv.codebook.centroids) == -(-record["kernels"] // 4)
        assert distinct_kernels([conv]) <= record["k"]
        assert conv.index.dtype == (torch.uint8 if record["k"] <= 256 else torch.int16)
    assert sorted({r["k"] for r in info["codebooks"]}) == [12, 64, 128, 256, 512, 1024]
    assert (codebook_entries(256, 100), codebook_entries(0.001, 100), codebook_entries(0.5, 3)) == (100, 2, 2)
    assert (codebook_entries(0.07, 100), codebook_entries(0.55, 1840)) == (7, 1012)  # not 7.000000000000001 rounded up
    with pytest.raises(ConfigError, match="beyond the int16 index's 32767"):
        codebook_entries(0.9, 40000)


@pytest.mark.parametrize("scope, books", [("layer", 19), ("stage", 3), ("network", 1)])
def test_every_scope_shares_one_codebook_of_at_most_k_kernels(model, scope, books):
    clustered, info = apply_first(model, kernel_config(16, scope))
    convs = codebook_convs(clustered)
    assert len(convs) == 19
    by_book = {}
    for name, conv in convs.items():
        by_book.setdefault(id(conv.codebook), []).append(name)
        assert {scope_key(n, scope) for n in by_book[id(conv.codebook)]} == {scope_key(name, scope)}
        assert conv.index.dtype == torch.uint8
    assert len(by_book) == len(info["codebooks"]) == books
    for names in by_book.values():
        assert distinct_kernels([convs[n] for n in names]) <= 16
    x = torch.randn(2, 3, 32, 32)
    assert clustered(x).shape == (2, 10) and not torch.equal(clustered(x), model(x))


def test_a_residual_codebook_adds_a_second_entry_to_every_kernel(model):
    """--residual: each kernel is its entry of the codebook plus its entry of a second codebook of as
    many entries, fit to what the first left over (lower clustering error), where the first does not
    already hold every kernel; the scope shares both codebooks."""
    single, single_info = apply_first(model, kernel_config(16, "stage"))
    clustered, info = apply_first(model, kernel_config(16, "stage", residual=True))
    convs = codebook_convs(clustered)
    for record, alone in zip(info["codebooks"], single_info["codebooks"]):
        assert record["k"] == record["residual_k"] == 16 and record["inertia"] < 0.8 * alone["inertia"]
    for name, conv in convs.items():
        assert conv.residuals[0].codebook is convs[f"{scope_key(name, 'stage')}.0.conv1"].residuals[0].codebook
        kernels = conv.eval().weight.detach().flatten(0, 1).flatten(1)
        rebuilt = sum(book.centroids[index.long()] for book, index in conv.stages())
        torch.testing.assert_close(kernels, rebuilt.detach())
    assert distinct_kernels([convs["layer3.1.conv1"]]) > 16  # more kernels than either codebook's entries
    exact, exact_info = apply_first(model, kernel_config(256, "layer", residual=True))
    by_layer = {r["codebook"]: r for r in exact_info["codebooks"]}
    assert by_layer["layer1.0.conv1"]["residual_k"] == 0 and not codebook_convs(exact)["layer1.0.conv1"].residuals
    assert by_layer["layer3.0.conv2"]["residual_k"] == 256


def test_each_residual_codebook_adds_an_entry_to_every_kernel(model):
    """--residual-codebooks 2: three codebooks a scope, each fit to what those before left (the
    clustering error falls with each), and each kernel the sum of its three entries."""
    one, one_info = apply_first(model, kernel_config(16, "stage", residual=True))
    two, info = apply_first(model, kernel_config(16, "stage", residual_codebooks=2))
    for record, fewer in zip(info["codebooks"], one_info["codebooks"]):
        assert record["residual_codebooks"] == 2 and record["inertia"] < 0.9 * fewer["inertia"]
    convs = codebook_convs(two)
    for name, conv in convs.items():
        assert len(conv.stages()) == 3
        scope_first = convs[f"{scope_key(name, 'stage')}.0.conv1"]
        assert all(mine.codebook is theirs.codebook for mine, theirs in zip(conv.residuals, scope_first.residuals))
        rebuilt = sum(book.centroids[index.long()] for book, index in conv.stages()).detach()
        torch.testing.assert_close(conv.eval().weight.detach().flatten(0, 1).flatten(1), rebuilt)


def test_indices_widen_past_256_entries(model):
    clustered, _ = apply_first(model, kernel_config(300, "network"))
    assert {c.index.dtype for c in codebook_convs(clustered).values()} == {torch.int16}


@pytest.mark.parametrize("reassign, residuals", [(True, 0), (False, 0), (True, 1), (True, 2)])
def test_finetuning_trains_the_codebook_and_keeps_kernels_shared(model, train_split, reassign, residuals):
    clustered, _ = apply_first(model, kernel_config(8, "stage", reassign=reassign, residual=residuals > 0,
                                                    residual_codebooks=residuals or None))

    def state(conv):
        return [(book.centroids.detach().clone(), index.clone()) for book, index in conv.stages()]

    before = {n: state(c) for n, c in codebook_convs(clustered).items()}
    # (8 steps: with three codebooks a kernel must move further before another combination is nearer)
    fit(clustered, train_split.subset(512), None, TrainConfig(epochs=1, batch_size=64, lr=0.05), log=lambda _: None)
    convs = codebook_convs(clustered)
    assert all(len(c.stages()) == 1 + residuals for c in convs.values())
    for stage in range(1 + residuals):
        after = {n: state(c)[stage] for n, c in convs.items()}
        assert all(not torch.equal(before[n][stage][0], after[n][0]) for n in convs)  # the codebooks trained
        moved = [not torch.equal(before[n][stage][1], after[n][1]) for n in convs]
        assert any(moved) if reassign else not any(moved)  # kernels changed entries only with reassign
    for scope in ("layer1", "layer2", "layer3"):
        in_scope = [c for n, c in convs.items() if scope_key(n, "stage") == scope]
        assert distinct_kernels(in_scope) <= 8 ** (1 + residuals)
        for conv in in_scope:  # every kernel still the sum of its entries
            rebuilt = sum(book.centroids[index.long()] for book, index in conv.stages()).detach()
            torch.testing.assert_close(conv.eval().weight.detach().flatten(0, 1).flatten(1), rebuilt)


def test_reassigning_kernels_follow_their_shadows_while_training(model):
    """With reassign, training starts from the kernels as they are, each kernel takes the entry nearest
    its shadow, the entries' gradient is averaged over their kernels and the shadows' passes straight
    through; evaluation keeps the last entries, and dropping the shadows keeps the function."""
    clustered, _ = apply_first(model, kernel_config(16, "layer", reassign=True))
    conv = codebook_convs(clustered)["layer2.0.conv2"]
    x = torch.randn(2, conv.in_channels, 8, 8)
    table = conv.codebook.centroids
    start = conv.eval()(x).detach()
    torch.testing.assert_close(conv.train()(x), start)  # the shadows start at the kernels: nothing moves
    with torch.no_grad():
        target = int((conv.index[0] + 1) % len(table))
        conv.shadow[0] = table[target] + 1e-3  # kernel 0 is nearest another entry now
    kernels = conv.weight.flatten(0, 1).flatten(1)
    assert conv.index[0] == target and torch.equal(kernels.detach(), table.detach()[conv.index.long()])
    upstream = torch.randn_like(kernels)
    kernels.backward(upstream)
    torch.testing.assert_close(conv.shadow.grad, upstream)  # straight through
    members = torch.bincount(conv.index.long(), minlength=len(table)).clamp_min(1)
    summed = torch.zeros_like(table).index_add_(0, conv.index.long(), upstream)
    torch.testing.assert_close(table.grad, summed / members[:, None])  # averaged over each entry's kernels
    trained = conv.eval()(x).detach()
    assert conv.index[0] == target and not torch.allclose(trained, start)  # evaluation keeps the last entries
    drop_shadows(clustered)
    assert conv.shadow is None and not any("shadow" in n for n, _ in clustered.named_parameters())
    torch.testing.assert_close(conv.train()(x), trained)  # without shadows the entries stay fixed


@pytest.mark.parametrize("residuals", [1, 2])
def test_reassigning_with_residuals_starts_each_kernel_at_its_own_entries(model, residuals):
    """With residuals the greedy nearest combination (first entry, then residual entries) is often not
    the one a kernel has, nor as near its shadow: training must start from the kernels as they are, and
    a shadow moved onto another combination leaves its own."""
    clustered, _ = apply_first(model, kernel_config(32, "layer", residual_codebooks=residuals, reassign=True))
    conv = codebook_convs(clustered)["layer2.1.conv1"]
    x = torch.randn(2, conv.in_channels, 8, 8)
    start, index = conv.eval()(x).detach(), [i.clone() for _, i in conv.stages()]
    torch.testing.assert_close(conv.train()(x), start)
    assert all(torch.equal(i, j) for i, (_, j) in zip(index, conv.stages()))
    books = [book.centroids.detach() for book, _ in conv.stages()]
    with torch.no_grad():
        conv.shadow[0] = sum(book[(int(i[0]) + 1) % 32] for book, i in zip(books, index))  # another combination
    conv.weight
    assert [int(i[0]) for _, i in conv.stages()] != [int(i[0]) for i in index]


@pytest.mark.parametrize("bits, apart", [(4, 1e-4), (None, 1e-6)])
def test_reassigning_starts_each_kernel_at_its_own_entry(model, bits, apart):
    """Two entries barely apart (4-bit: rounding to the same codes) still keep their kernels when
    training starts: the kernels would move to the first of the two if the rounded table decided,
    or, in float32, where the distances' rounding errors exceed their gap."""
    clustered, _ = apply_first(model, kernel_config(16, "layer", reassign=True))
    conv = codebook_convs(clustered)["layer2.0.conv2"]
    book = conv.codebook
    with torch.no_grad():
        book.centroids[1] = book.centroids[0] + apart
    book.bits = bits
    if bits:
        assert torch.equal(book.table()[0], book.table()[1])  # the same codes
    conv.start_shadow()
    index = conv.index.clone()
    assert (index == 1).any()
    conv.train().weight
    assert torch.equal(conv.index, index)


def test_int8_codebook_has_one_scale_and_stays_close(model):
    clustered, _ = apply_first(model, kernel_config(64, "layer"))
    x = torch.randn(4, 3, 32, 32)
    before = clustered(x)
    quantize_centroids(clustered, 8)
    for conv in codebook_convs(clustered).values():
        assert conv.codebook.centroids.dtype == torch.int8 and conv.codebook.scale.numel() == 1
    assert torch.allclose(before, clustered(x), atol=0.05 * before.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("size, scope, books", [(64, "layer", 19), (0.25, "layer", 19), (1024, "network", 1)])
def test_refit_fits_the_original_outputs_on_real_images(baseline, train_split, test_split, size, scope, books):
    """The data-aware refit (assignment by output error, entries by least squares) lowers every
    codebook's error at the BN outputs and recovers accuracy that plain K-Means lost; for a large
    codebook shared by every conv too (once solved entry by entry, its error grew tenfold)."""
    clustered, _ = apply_first(baseline.model.eval(), kernel_config(size, scope))
    test = test_split.subset(500)
    clustered_accuracy = evaluate(clustered, test, mean=baseline.mean, std=baseline.std)
    images = to_tensor(train_split.subset(256, 0).images, baseline.mean, baseline.std)
    records = refit_codebooks(clustered, baseline.model, images, rounds=1)
    assert len(records) == books
    assert all(r["relative_error_after"] < r["relative_error_before"] for r in records)
    refit_accuracy = evaluate(clustered, test, mean=baseline.mean, std=baseline.std)
    assert refit_accuracy > clustered_accuracy + 0.05, (clustered_accuracy, refit_accuracy)
    for conv in codebook_convs(clustered).values():  # the fine-tune starts from the refit's kernels
        refit_weight, refit_index = conv.eval().weight.detach(), conv.index.clone()
        assert torch.equal(conv.train().weight.detach(), refit_weight) and torch.equal(conv.index, refit_index)


def test_channel_correction_undoes_a_gain_per_output_channel(model):
    """Each output channel's gain and offset are fit to the original's output and folded into the BN:
    a conv whose channels were scaled and shifted gets its function back exactly."""
    from toolchain.methods.kernels import correct_channels
    original = copy.deepcopy(model)
    for m in original.modules():  # statistics away from the defaults, so that the BN's shift matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    changed = copy.deepcopy(original)
    with torch.no_grad():
        changed.layer2[1].conv1.weight.mul_(torch.linspace(0.5, 2.0, 32).view(-1, 1, 1, 1))

    class Shifted(torch.nn.Module):  # the conv's output plus a constant per channel
        def __init__(self, conv):
            super().__init__()
            self.conv, self.out_channels = conv, conv.out_channels

        def forward(self, x):
            return self.conv(x) + torch.linspace(-1.0, 1.0, 32).view(1, -1, 1, 1)

    changed.layer2[1].conv1 = Shifted(changed.layer2[1].conv1)
    x = torch.randn(16, 3, 32, 32)
    assert not torch.allclose(changed(x), original(x), atol=1e-3)
    correct_channels(changed, original, ["layer2.1.conv1"], x)
    torch.testing.assert_close(changed(x), original(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_shared_codebooks_refit_beats_plain_recalibration_on_real_images(baseline, train_split, test_split):
    """At stage scope the convs after a codebook's first see entries that change after them: without
    the channel correction the refit fell below plain BN recalibration (60.8% against 71.5% here)."""
    from toolchain.training import recalibrate_bn
    test = test_split.subset(500)
    images = to_tensor(train_split.subset(1024, 0).images, baseline.mean, baseline.std)
    accuracy = {}
    for refit in (False, True):
        clustered, _ = apply_first(baseline.model.eval(), kernel_config(256, "stage"))
        if refit:
            refit_codebooks(clustered, baseline.model, images)
        recalibrate_bn(clustered, train_split, mean=baseline.mean, std=baseline.std, keep_outputs=refit)
        accuracy[refit] = evaluate(clustered, test, mean=baseline.mean, std=baseline.std)
    assert accuracy[True] > accuracy[False] + 0.02, accuracy


def test_kernels_take_the_entry_with_the_least_output_error():
    """Each kernel's entry minimises (w - e)^T S_c (w - e), S_c its input channel's patch moments: with
    channels of very different scales that is not the nearest entry by weight distance."""
    from toolchain.least_squares import normal_equations
    from toolchain.methods.kernels import _assign, _Layer
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(8, 3, 6, 6) * torch.tensor([0.1, 1.0, 5.0]).view(1, 3, 1, 1)
    x[:, 2:] += torch.randn(8, 1, 6, 6)  # correlated taps
    gram, cross = normal_equations(conv, x, conv(x).detach())
    layer = _Layer("conv", conv, gram, cross, torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    entries = torch.randn(5, 9, dtype=torch.float64)
    w = conv.weight.detach().double().flatten(1)
    got = _assign(layer, entries, w)
    s = layer.channel_grams(9)
    kernels = w.view(4, 3, 9)
    for o in range(4):
        for c in range(3):
            d = kernels[o, c][None] - entries  # (entries, taps)
            assert got[o, c] == torch.einsum("ka,ab,kb->k", d, s[c], d).argmin()
    nearest = torch.cdist(kernels.reshape(-1, 9), entries).argmin(1).view(4, 3)
    assert not torch.equal(got, nearest)


def _export(tmp_path, baseline_path, data_root, name, bits=None, **options):
    cfg = ExportConfig(method="first", checkpoint=str(baseline_path), data=str(data_root), finetune_epochs=0,
                       test_limit=500, calibration_images=256, out=str(tmp_path / f"{name}.onnx"),
                       options=kernel_config(**options), centroid_bits=bits)
    ckpt, source = load_source(cfg)
    data = load_data(cfg.data, None, cfg.test_limit, cfg.seed)
    compressed = compress_and_tune(cfg, ckpt, source, data, log=print)
    result = export_compressed(compressed, cfg, tmp_path / f"{name}.onnx", log=print)
    return compressed, result, data


@pytest.mark.slow
@pytest.mark.parametrize("bits", [None, 8])
def test_onnx_file_holds_codebooks_and_indices_on_real_images(tmp_path, baseline_path, data_root, bits):
    compressed, result, data = _export(tmp_path, baseline_path, data_root, "k", bits, size=256, scope="stage")
    out = result.path
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("BatchNormalization") == 19 and ops.count("Gather") == 19
    named = result.manifest["initializers"]  # short name in the file -> module path
    inits = {named[t.name]: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert not any(n.input[1] in named for n in proto.graph.node if n.op_type == "Conv")  # no full conv weight
    books = [name for name in inits if name.endswith("codebook.centroids")]
    assert len(books) == 3  # one per stage, shared by its convs
    assert all(inits[b].shape == (256, 9) and inits[b].dtype == (np.int8 if bits else np.float32) for b in books)
    indices = [a for name, a in inits.items() if name.endswith(".index")]
    assert len(indices) == 19 and all(a.dtype == np.uint8 for a in indices)
    assert sum(a.size for a in indices) == sum(c.out_channels * c.in_channels
                                               for c in codebook_convs(compressed.model).values())
    # ONNX Runtime folds Cast/Gather/Reshape at load and gives the PyTorch model's logits.
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    x = to_tensor(data.test.subset(16, 0).images, compressed.ckpt.mean, compressed.ckpt.std)
    got = session.run(None, {"input": x.numpy()})[0]
    optimized = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    assert not optimized & {"Gather", "Cast", "BatchNormalization"}
    model = compressed.model
    if bits:
        model = copy.deepcopy(model)
        quantize_centroids(model, bits)
    with torch.no_grad():
        np.testing.assert_allclose(got, model.eval()(x).numpy(), atol=1e-4)
    # the file's accuracy is the one the export measured; its bytes add up by part
    from eval.accuracy import evaluate_onnx
    accuracy = result.manifest["accuracy"]["quantized" if bits else "reconstructed"]
    assert evaluate_onnx(out, data.test)["accuracy"] == pytest.approx(accuracy, abs=0.004)
    parts = result.manifest["bytes_by_part"]
    assert sum(parts.values()) == result.manifest["model_bytes"] == out.stat().st_size
    assert parts["conv_weights"] == sum(t.ByteSize() for t in proto.graph.initializer
                                        if named[t.name].endswith((".index", ".centroids", ".scale")))


@pytest.mark.slow
def test_residual_codebooks_in_the_onnx_file_on_real_images(tmp_path, baseline_path, data_root):
    """With --residual the file holds each conv's two indices and its scope's two codebooks, ONNX
    Runtime folds both Gathers and their sum at load and gives PyTorch's logits, and the refit fits the
    original outputs better than one codebook of as many entries as the two together."""
    compressed, result, data = _export(tmp_path, baseline_path, data_root, "r", 8, size=64, scope="layer", residual=True)
    convs = codebook_convs(compressed.model)
    residual = [name for name, conv in convs.items() if conv.residuals]
    assert len(residual) == 18 and "conv1" not in residual  # the stem's 48 kernels fit in 64 entries
    proto = onnx.load(str(result.path))
    named = result.manifest["initializers"]
    inits = {named[t.name]: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert [n.op_type for n in proto.graph.node].count("Gather") == 19 + 18
    assert not any(n.input[1] in named for n in proto.graph.node if n.op_type == "Conv")  # no full conv weight
    assert sorted(name for name in inits if name.endswith("residuals.0.codebook.centroids")) == \
        sorted(f"{name}.residuals.0.codebook.centroids" for name in residual)
    assert all(inits[f"{name}.residuals.0.index"].dtype == np.uint8 for name in residual)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(result.path), opts, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert "Gather" not in optimized and "Cast" not in optimized
    x = to_tensor(data.test.subset(16, 0).images, compressed.ckpt.mean, compressed.ckpt.std)
    model = copy.deepcopy(compressed.model)
    quantize_centroids(model, 8)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model.eval()(x).numpy(), atol=1e-4)
    single = _export(tmp_path, baseline_path, data_root, "s", 8, size=128, scope="layer")[1].manifest
    for two, one in zip(result.manifest["reconstruction"], single["reconstruction"]):
        if two["layers"][0] in residual:
            assert two["relative_error_after"] < one["relative_error_after"], (two, one)


@pytest.mark.slow
def test_kernel_export_is_deterministic(tmp_path, baseline_path, data_root):
    first = _export(tmp_path, baseline_path, data_root, "a", size=16, scope="network")[1].path
    second = _export(tmp_path, baseline_path, data_root, "b", size=16, scope="network")[1].path
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("args, start", [
    (["--codebook-size", "1"], "error: codebook size must be a whole number of entries from 2 to 32767 or a "
                               "fraction of each codebook's kernels between 0 and 1, got 1"),
    (["--codebook-size", "40000"], "error: codebook size must be a whole number of entries from 2 to 32767"),
    (["--codebook-size", "1.5"], "error: codebook size must be a whole number of entries from 2 to 32767"),
    (["--codebook-size", "0.0"], "error: codebook size must be a whole number of entries from 2 to 32767"),
    (["--codebook-size", "quarter"], "error: Invalid value for '--codebook-size': 'quarter' is neither a number"),
    (["--codebook-scope", "block"], "error: Invalid value for '--codebook-scope': 'block' is not one of"),
    (["--ratio", "0.3"], "error: --ratio plays no part in first kernel-layer256"),
    (["--quantize", "int8"], "error: --quantize int8 is not available for kernel-layer256 yet"),
    (["--no-residual", "--residual-codebooks", "2"],
     "error: --residual-codebooks counts residual codebooks: not with --no-residual"),
    (["--residual-codebooks", "0"], "error: Invalid value for '--residual-codebooks': 0 is not in the range 1<=x<=7"),
])
def test_bad_codebook_options_are_one_line_errors(tmp_path, args, start):
    result = run_cli("export", "--method", "first", "--granularity", "kernel", *args, "--finetune-epochs", "0",
                     "--out", tmp_path / "k.onnx")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(start), result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


KERNEL_ONLY = ("error: --codebook-size, --codebook-scope, --reassign/--fixed-index, --residual/--no-residual and "
               "--residual-codebooks are options of --granularity kernel")


@pytest.mark.parametrize("args, message", [
    (["--method", "first", "--codebook-size", "64"],
     KERNEL_ONLY),
    (["--method", "first", "--fixed-index"],
     KERNEL_ONLY),
    (["--method", "first", "--residual"],
     KERNEL_ONLY),
    (["--method", "second", "--reassign"], "error: --reassign/--fixed-index is an option of method first, not of second"),
    (["--method", "first", "--residual-codebooks", "2"],
     KERNEL_ONLY),
    (["--method", "second", "--residual"], "error: --residual/--no-residual is an option of method first, not of second"),
    (["--method", "second", "--residual-codebooks", "2"],
     "error: --residual-codebooks is an option of method first, not of second"),
])
def test_codebook_options_need_kernel_granularity(tmp_path, args, message):
    result = run_cli("export", *args, "--out", tmp_path / "k.onnx")
    assert result.returncode == 2
    assert result.stderr.strip() == message and not list(tmp_path.iterdir())


@pytest.mark.parametrize("size, stages", [(6, 1), (40, 1), (40, 2)])
def test_codebook_entries_solve_the_ridge_least_squares(size, stages):
    """The entries' solve (conjugate gradients, no matrix formed) gives what ridge_solve gives on the
    matrix written out from its definition: weight = J entries, J placing each entry at its kernels
    (a kernel the sum of its stages' entries with a residual codebook), so the normal equations are
    J^T (a^2 x gram per output) J. Two convs share the codebook; the small size has outputs drawing
    from one entry at several inputs; unused entries stay."""
    from toolchain.least_squares import normal_equations, ridge_solve
    from toolchain.methods.kernels import _Layer, _solve_entries
    torch.manual_seed(0)
    layers, indices, taps = [], [], 9
    for out in (8, 4):
        conv = torch.nn.Conv2d(16, out, 3, padding=1, bias=False)
        x = torch.randn(32, 16, 8, 8)
        x[:, 1:] += 0.8 * x[:, :1]  # correlated channels: the entries' equations couple
        target = conv(x).detach() + 0.1 * torch.randn(32, out, 8, 8)
        gram, cross = normal_equations(conv, x, target)
        layers.append(_Layer("c", conv, gram, cross, target.double().pow(2).sum((0, 2, 3)),
                             torch.rand(out, dtype=torch.float64) + 0.5))
        per_stage = (size - 2) // stages  # each stage its own range of entries, the last two unused
        indices.append(torch.stack([torch.randint(0, per_stage, (out, 16)) + s * per_stage for s in range(stages)], 2))
    entries = torch.randn(size, taps, dtype=torch.float64)
    matrix, rhs = 0, 0
    for layer, index in zip(layers, indices):
        placing = torch.nn.functional.one_hot(index, size).double().sum(2).flatten(0, 1)  # (kernels, size)
        j = torch.kron(placing, torch.eye(taps, dtype=torch.float64))  # (kernels * taps, size * taps)
        per_output = torch.block_diag(*[a * layer.gram for a in layer.weight])
        matrix = matrix + j.T @ per_output @ j
        rhs = rhs + j.T @ (layer.cross.T * layer.weight[:, None]).flatten()
    expected = ridge_solve(matrix, rhs[:, None], 1e-3, entries.reshape(-1, 1)).view(size, taps)
    got = _solve_entries(layers, indices, entries, 1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-8 * float(expected.abs().max()))
    torch.testing.assert_close(got[size - 2:], entries[size - 2:])
