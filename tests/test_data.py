import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from toolchain.data import augment, batches, load_split
from toolchain.errors import DataError


def _write_pickled(root, per_batch=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, per_batch))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": []}))
    return folder


def _write_image_folder(root, per_class=3, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_pickled_layout(tmp_path):
    folder = _write_pickled(tmp_path)
    train = load_split(tmp_path, "train")
    test = load_split(folder, "test")  # the batches folder itself works too
    assert train.images.shape == (100, 32, 32, 3) and test.images.shape == (20, 32, 32, 3)
    raw = pickle.loads((folder / "test_batch").read_bytes())
    # CHW rows become HWC images.
    assert np.array_equal(test.images[0, :, :, 0].ravel(), raw["data"][0, :1024])
    assert len(train.classes) == 10


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


def test_pickled_batch_with_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _write_pickled(tmp_path / "data")
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _Payload(), "labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        load_split(folder, "test")
    assert not (tmp_path / "pwned").exists()


def test_tiny_image_folder_and_cache_invalidation(tmp_path):
    _write_image_folder(tmp_path)
    first = load_split(tmp_path, "test")
    assert first.images.shape == (6, 32, 32, 3) and first.classes == ("cat", "dog")
    assert list(first.labels) == [0, 0, 0, 1, 1, 1]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "test" / "dog" / "9.png")
    assert len(load_split(tmp_path, "test")) == 7  # a changed source is decoded again


def test_real_image_folder_is_read_from_the_cache_after_first_use(data_root, test_split, monkeypatch):
    """The second load decodes no image (how fast that is belongs to benchmarks, not tests)."""
    from toolchain import data
    monkeypatch.setattr(data, "_read_image_folder", lambda *a: pytest.fail("decoded again"))
    split = load_split(data_root, "test")
    assert np.array_equal(split.images, test_split.images)
    assert split.images.shape == (10_000, 32, 32, 3)
    assert np.bincount(split.labels).tolist() == [1000] * 10
    assert split.classes[0] == "airplane" and split.classes[-1] == "truck"


def test_the_cache_is_this_runs_not_the_users(test_split, cache_folder):
    from toolchain.data import cache_dir
    assert cache_dir() == cache_folder and list(cache_folder.glob("cifar10-test-*.npz"))


def _outcome(call) -> str:
    """fail, skip or pass: skips would escape pytest.raises(pytest.fail.Exception) and skip the test itself."""
    try:
        call()
    except pytest.fail.Exception:
        return "fail"
    except pytest.skip.Exception:
        return "skip"
    return "pass"


@pytest.mark.parametrize("ci, outcome", [("true", "fail"), ("True", "fail"), ("1", "fail"), ("yes", "fail"),
                                         ("", "skip"), ("false", "skip"), ("0", "skip")])
def test_missing_data_fails_under_ci_whatever_the_spelling(tmp_path, monkeypatch, ci, outcome):
    from conftest import has_cifar10, require
    monkeypatch.setenv("CI", ci)
    assert _outcome(lambda: require(tmp_path / "nowhere", "the real CIFAR-10 copy", has_cifar10)) == outcome


def test_both_layouts_count_as_the_data(tmp_path):
    from conftest import has_cifar10
    pickled = _write_pickled(tmp_path / "pickled")
    images = _write_image_folder(tmp_path / "images")
    for root in (pickled.parent, pickled, images):
        assert has_cifar10(root) and len(load_split(root, "test")) > 0  # what --data accepts
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "img.png").write_bytes(b"x")
    assert not has_cifar10(tmp_path / "flat")


def test_missing_empty_wrong_layout_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nope", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no test/ folder"):
        load_split(tmp_path / "empty", "test")
    (tmp_path / "noimg" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_split(tmp_path / "noimg", "test")
    root = _write_image_folder(tmp_path / "corrupt")
    (root / "test" / "cat" / "1.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="corrupt image .*1.png"):
        load_split(root, "test")


def test_missing_data_root_and_no_env(monkeypatch):
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    with pytest.raises(DataError, match="CIFAR10_ROOT"):
        load_split(None, "test")


def test_augment_crops_and_flips_per_image():
    # Pixel (r, c) holds r in channel 0 and c in channel 1 (values 1..32; 0 marks padding).
    grid = torch.arange(1, 33, dtype=torch.uint8)
    image = torch.stack([grid.view(32, 1).expand(32, 32), grid.view(1, 32).expand(32, 32),
                         torch.zeros(32, 32, dtype=torch.uint8)], -1)
    out = augment(image.expand(200, 32, 32, 3).contiguous(), torch.Generator().manual_seed(0)).int()
    row_shift, col_step = [], []
    for img in out:
        rows, cols = img[:, 16, 0], img[16, :, 1]
        inside_r, inside_c = rows[rows > 0], cols[cols > 0]
        assert torch.all(inside_r.diff() == 1)  # rows keep their order, shifted by a crop
        row_shift.append(int(inside_r[0]) - int((rows > 0).nonzero()[0]) - 1)
        col_step.append(int(inside_c.diff()[0]))  # +1 as is, -1 when flipped
        assert abs(row_shift[-1]) <= 4 and len(inside_c) >= 28
    assert set(col_step) == {1, -1}  # both flipped and unflipped images
    assert len(set(row_shift)) == 9  # every crop offset -4..4 occurs


def test_batches_cover_split_once(tmp_path):
    _write_pickled(tmp_path)
    split = load_split(tmp_path, "train")
    seen = torch.cat([y for _, y in batches(split, 7, shuffle=True, seed=3)])
    assert sorted(seen.tolist()) == sorted(split.labels.tolist())
    x, _ = next(batches(split, 7))
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32
