import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, random_resnet20
from toolchain.checkpoints import read_payload
from toolchain.models import build_model
from toolchain.training import TrainConfig, evaluate, fit, recalibrate_bn


def test_short_real_training_run_lowers_the_loss(train_split, test_split):
    torch.manual_seed(0)
    model = build_model("resnet20")
    history = fit(model, train_split.subset(1024), test_split.subset(256),
                  TrainConfig(epochs=3, lr=0.05, batch_size=64), log=lambda _: None)
    assert len(history) == 3
    assert history[-1].loss < history[0].loss
    assert history[-1].test_accuracy > 0.15  # above chance (0.10) on real test images


def test_recalibrate_bn_restores_statistics(train_split, test_split, baseline):
    import copy
    model = copy.deepcopy(baseline.model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.add_(0.5)
    broken = evaluate(model, test_split.subset(500))
    recalibrate_bn(model, train_split, images=1024)
    fixed = evaluate(model, test_split.subset(500))
    assert fixed > broken + 0.2 and fixed > 0.8


@torch.no_grad()
def test_recalibration_can_keep_the_function_and_align_train_mode(train_split):
    """keep_outputs: eval-mode logits stay; train mode (batch statistics) then computes the same."""
    from toolchain.data import to_tensor
    model = random_resnet20()  # its running statistics are far from the data's
    x = to_tensor(train_split.subset(256, seed=3).images)
    before = model.eval()(x)

    def train_mode_gap():  # on a copy: a train-mode pass moves the running statistics
        import copy
        return float(((copy.deepcopy(model).train()(x) - model.eval()(x)) ** 2).sum() / (before ** 2).sum())

    assert train_mode_gap() > 0.1
    recalibrate_bn(model, train_split, images=1024, keep_outputs=True)
    assert torch.allclose(model.eval()(x), before, atol=1e-4 * before.abs().max())
    assert train_mode_gap() < 0.01


def _train_command(data_root, out):
    return [sys.executable, "-m", "toolchain", "train", "--data", str(data_root), "--limit", "512", "--test-limit", "200",
            "--epochs", "3", "--batch-size", "64", "--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root, train_split):
    """The weights of the training run of _train_command, left to finish."""
    out = tmp_path_factory.mktemp("uninterrupted") / "ck.pt"
    done = subprocess.run(_train_command(data_root, out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return read_payload(out)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, data_root, uninterrupted, sig):
    out = tmp_path / "ck.pt"
    cmd = _train_command(data_root, out)
    # A background launch (nohup ... &) hands its children an ignored SIGINT, which Python keeps:
    # the run under test gets the default disposition, as in a terminal.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("epoch 1/3"):
            break
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    state = read_payload(out)["training_state"]
    assert 1 <= state["epoch"] < 3
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {out} after epoch {state['epoch']}" in done.stdout
    payload = read_payload(out)
    assert "training_state" not in payload  # finished: nothing left to resume
    assert [r["epoch"] for r in payload["meta"]["training"]["history"]] == [1, 2, 3]
    weights = payload["state_dict"]
    assert weights.keys() == uninterrupted.keys()
    assert all(torch.equal(weights[k], uninterrupted[k]) for k in weights)  # as if never interrupted


def test_warm_start_from_a_checkpoint_records_its_source(tmp_path, data_root, baseline_path):
    from toolchain.io import sha256_of
    from toolchain.training import train_checkpoint
    out = tmp_path / "warm.pt"
    history = train_checkpoint("resnet20", data_root, out, TrainConfig(epochs=1, lr=1e-4, batch_size=64),
                               init=baseline_path, limit=512, test_limit=500, log=lambda _: None)
    assert history[-1].test_accuracy > 0.8  # started from the trained weights, not from scratch
    init = read_payload(out)["meta"]["training"]["init"]
    assert init["sha256"] == sha256_of(baseline_path) and init["training"]["command"].startswith("toolchain train")


@pytest.mark.slow
def test_torchrun_averages_the_gradients(tmp_path, data_root, train_split):
    """DDP on CPU (gloo): 2 processes x batch 64 take the steps 1 process takes with batch 128 (tests/ddp_steps.py),
    and rank 1 holds the same trained weights as rank 0."""
    worker = [str(REPO / "tests" / "ddp_steps.py"), str(data_root)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for command, out in (([sys.executable, *worker, "128"], tmp_path / "one"), ([*launch, *worker, "64"], tmp_path / "two")):
        done = subprocess.run([*command, str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    start, one = torch.load(tmp_path / "one" / "start.pt"), torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    for name, weight in one.items():
        assert (weight - start[name]).abs().max() > 1e-3  # the steps moved the weights
        for rank in ranks:
            torch.testing.assert_close(rank[name], weight, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_torchrun_trains_and_rank_0_alone_writes(tmp_path, data_root, train_split):
    """The real command under torchrun: one report, one checkpoint (what the processes compute: test above)."""
    common = ["train", "--data", str(data_root), "--limit", "512", "--test-limit", "200", "--epochs", "1",
              "--batch-size", "64"]
    out = tmp_path / "two" / "ck.pt"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "toolchain"]
    double = subprocess.run([*launch, *common, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("done: test accuracy") == 1  # rank 0 alone reports and writes
    assert sorted(p.name for p in out.parent.iterdir()) == ["ck.json", "ck.pt"]


@pytest.mark.slow
def test_torchrun_fine_tunes_an_export(tmp_path, data_root, baseline_path, test_split):
    """export under torchrun: both processes fine-tune their shards, rank 0 alone writes the model, which
    keeps what the refit reached (about 67% of these 500 images at ratio 0.5). A gentle learning rate: at
    the default 0.01 one epoch of 1,024 images costs 20-30 points, in one process as in two."""
    import json
    from eval.accuracy import evaluate_onnx
    out = tmp_path / "first.onnx"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "toolchain",
           "export", "--method", "first", "--ratio", "0.5", "--checkpoint", str(baseline_path),
           "--data", str(data_root), "--finetune-epochs", "1", "--finetune-lr", "0.001", "--train-limit", "1024",
           "--test-limit", "500", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote ") == 1 and result.stdout.count("epoch 1/1") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.manifest.json", "first.onnx"]
    manifest = json.loads((tmp_path / "first.manifest.json").read_text())
    accuracy = evaluate_onnx(out, test_split.subset(500))["accuracy"]
    assert accuracy == pytest.approx(manifest["accuracy"]["finetuned"], abs=0.004)  # ONNX Runtime = rank 0's PyTorch
    assert accuracy >= manifest["accuracy"]["reconstructed"] - 0.02, manifest["accuracy"]


def test_block_outputs_and_feature_loss():
    from toolchain.errors import ConfigError
    from toolchain.training import block_outputs, feature_loss
    model, x = random_resnet20(), torch.randn(2, 3, 32, 32)
    with torch.no_grad(), block_outputs(model) as outputs:
        model(x)
    assert len(outputs) == 9 and outputs[-1].shape == (2, 64, 8, 8)
    with torch.no_grad():
        model(x)
    assert len(outputs) == 9  # the hooks are gone once the block is left
    assert float(feature_loss(outputs, outputs)) == 0
    assert float(feature_loss([2 * o for o in outputs], outputs)) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="residual blocks"):
        feature_loss(outputs[:-1], outputs)


def test_feature_distillation_pulls_blocks_towards_the_teacher(baseline, train_split):
    """On real images: with the block outputs in the loss, a spoiled copy's blocks move closer to the teacher's."""
    import copy
    from toolchain.training import block_outputs, feature_loss
    images = train_split.subset(256, seed=3)
    x = torch.from_numpy(images.images[:64]).permute(0, 3, 1, 2).float() / 255

    def block_error(model):
        with torch.no_grad(), block_outputs(model.eval()) as s, block_outputs(baseline.model.eval()) as t:
            model(x), baseline.model(x)
        return float(feature_loss(s, t))

    errors = {}
    for weight in (0.0, 1.0):
        student = copy.deepcopy(baseline.model)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p) * p.abs().mean())
        fit(student, images, None, TrainConfig(epochs=1, batch_size=64, lr=0.01, feature_distill_weight=weight),
            teacher=baseline.model, log=lambda _: None)
        errors[weight] = block_error(student)
    assert errors[1.0] < errors[0.0]


def test_distill_temperature_reaches_the_fine_tune(baseline, train_split, test_split, monkeypatch):
    """--distill-temperature is the temperature the export's fine-tune distils with (real images)."""
    import copy
    from toolchain import training
    from toolchain.pipeline import Data, ExportConfig, finetune
    used, loss = [], training.distillation_loss
    monkeypatch.setattr(training, "distillation_loss", lambda *a: used.append(a[-1].distill_temperature) or loss(*a))
    data = Data(train_split.subset(256, seed=1), test_split.subset(100, seed=1))
    cfg = ExportConfig(method="none", finetune_epochs=1, distill_temperature=8.0)
    history = finetune(copy.deepcopy(baseline.model), baseline.model, baseline, data, cfg, log=lambda _: None)
    assert used == [8.0, 8.0] and history[0]["test_accuracy"] > 0.8  # 2 batches of 128; still a sound model


def test_feature_distillation_is_on_with_the_teacher_by_default(baseline, train_split, test_split, monkeypatch):
    """The block-output term is on by default (weight settings.DISTILL_FEATURES) and reaches the export's fine-tune
    (real images); --no-distill alone turns the teacher's settings off, a value given without one is refused."""
    import copy
    from toolchain import training
    from toolchain.errors import ToolchainError
    from toolchain.pipeline import Data, ExportConfig, finetune
    from toolchain.settings import DISTILL_FEATURES as FEATURE_WEIGHT
    assert FEATURE_WEIGHT > 0 and ExportConfig().distill_features == FEATURE_WEIGHT
    assert ExportConfig().distill_temperature == training.TrainConfig.distill_temperature
    no_teacher = ExportConfig(distill=False)
    assert no_teacher.distill_features is None and no_teacher.distill_temperature is None
    for weight in (FEATURE_WEIGHT, 0.0):  # any value given without a teacher
        with pytest.raises(ToolchainError, match="--distill-features"):
            ExportConfig(distill=False, distill_features=weight)
    with pytest.raises(ToolchainError, match="--distill-features"):
        ExportConfig(distill_features=float("nan"))
    with pytest.raises(ToolchainError, match="--distill-temperature"):
        ExportConfig(distill=False, distill_temperature=training.TrainConfig.distill_temperature)
    terms, loss = [], training.feature_loss
    monkeypatch.setattr(training, "feature_loss", lambda s, t: terms.append(len(t)) or loss(s, t))
    data = Data(train_split.subset(128, seed=1), test_split.subset(100, seed=1))
    finetune(copy.deepcopy(baseline.model), baseline.model, baseline, data, ExportConfig(method="none", finetune_epochs=1),
             log=lambda _: None)
    assert terms == [9]  # one batch, the 9 residual blocks of a ResNet20
