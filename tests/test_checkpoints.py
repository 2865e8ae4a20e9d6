import os

import pytest
import torch

from toolchain.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from toolchain.errors import CheckpointError
from toolchain.models import build_model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def model():
    torch.manual_seed(1)
    return build_model("resnet20")


def test_own_format_round_trip_keeps_metadata(tmp_path, model):
    path = tmp_path / "m.pt"
    save_checkpoint(path, Checkpoint(model, "resnet20", meta={"test_accuracy": 0.5}))
    loaded = load_checkpoint(path)
    assert loaded.arch == "resnet20" and loaded.meta["test_accuracy"] == 0.5
    assert _same_weights(loaded.model, model)


@pytest.mark.parametrize("layout", ["bare", "state_dict", "module_prefix"])
def test_public_layouts_load(tmp_path, model, layout):
    state = model.state_dict()
    if layout == "module_prefix":
        payload = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 91.7}
    elif layout == "state_dict":
        payload = {"state_dict": state}
    else:
        payload = state
    path = tmp_path / f"{layout}.pt"
    torch.save(payload, path)
    loaded = load_checkpoint(path, arch="resnet20")
    assert _same_weights(loaded.model, model)
    # The depth also follows from the keys when --arch is not given.
    assert load_checkpoint(path).arch == "resnet20"


def test_other_depth_is_one_clear_error(tmp_path):
    path = tmp_path / "r32.pt"
    torch.save(build_model("resnet32").state_dict(), path)
    with pytest.raises(CheckpointError, match="unexpected key 'layer1.3"):
        load_checkpoint(path, arch="resnet20")


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, model):
    state = model.state_dict()
    state["layer2.0.conv2.weight"] = torch.zeros(32, 16, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, arch="resnet20")
    assert "'layer2.0.conv2.weight'" in str(err.value)
    assert "(32, 16, 3, 3)" in str(err.value) and "(32, 32, 3, 3)" in str(err.value)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_payload_is_refused_never_run(tmp_path, model):
    marker = tmp_path / "pwned"
    evil = _Payload()
    evil.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "x": evil}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path, arch="resnet20")
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"hello, not a checkpoint\n", "not a readable PyTorch checkpoint"),
])
def test_missing_empty_or_foreign_file(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, arch="resnet20")


def test_truncated_checkpoint(tmp_path, model):
    path = tmp_path / "t.pt"
    save_checkpoint(path, Checkpoint(model, "resnet20"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_unknown_arch_without_hint(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="--arch"):
        load_checkpoint(path)
