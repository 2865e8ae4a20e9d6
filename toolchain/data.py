"""CIFAR-10 in either layout, decoded once into a cache of uint8 arrays.

Layouts, detected automatically:
- torchvision's `cifar-10-batches-py` (the folder itself or a folder holding it);
- an image folder: `train/<class>/*` and `test/<class>/*` (one image file each).
Decoded arrays are cached under the user cache folder, keyed by the source path and
a fingerprint of its files (names, sizes, modification times), so a changed source
is decoded again and `../shared/` is never written to.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, ToolchainError
from .io import atomic_path

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the original CIFAR-10 training split.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}
SPLITS = ("train", "test")


@dataclass
class Split:
    images: np.ndarray  # (N, 32, 32, 3) uint8, RGB
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> "Split":
        """A seeded random subset of n images (all of them when n is None or too large)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return Split(self.images[idx], self.labels[idx], self.classes)


def resolve_root(data: str | os.PathLike | None) -> Path:
    """The --data folder, or CIFAR10_ROOT when none is given."""
    if data is None:
        data = os.environ.get("CIFAR10_ROOT")
        if not data:
            raise DataError("no dataset given: pass --data DIR or set CIFAR10_ROOT")
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist (expected a CIFAR-10 folder: "
                        "cifar-10-batches-py/ or train/<class>/ and test/<class>/)")
    return root


def cache_dir() -> Path:
    base = os.environ.get("TOOLCHAIN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cifar-toolchain")
    return Path(base)


def load_split(data: str | os.PathLike | None, split: str, download: bool = False) -> Split:
    """Load the train or test split of CIFAR-10 found at `data` (or CIFAR10_ROOT)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if download:
        _download(data)
    root = resolve_root(data)
    pickled = _pickle_folder(root)
    if pickled is not None:
        files = [pickled / n for n in (["test_batch"] if split == "test"
                                       else [f"data_batch_{i}" for i in range(1, 6)])]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{pickled} is missing {', '.join(missing)} (expected torchvision's "
                            "cifar-10-batches-py layout)")
        return _cached(root, split, files, lambda: _read_pickled(files))
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{root} has no {split}/ folder and no cifar-10-batches-py/ (expected "
                        f"{split}/<class>/*.jpg or torchvision's cifar-10-batches-py layout)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    labelled = [(f, label) for label, c in enumerate(classes) for f in sorted((folder / c).iterdir())
                if f.suffix.lower() in IMAGE_SUFFIXES]
    if not labelled:
        raise DataError(f"{folder} holds no images (expected {split}/<class>/*.jpg)")
    return _cached(root, split, [f for f, _ in labelled],
                   lambda: _read_image_folder(labelled, tuple(classes), split))


def _pickle_folder(root: Path) -> Path | None:
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "batches.meta").is_file() or (candidate / "test_batch").is_file():
            return candidate
    return None


def _download(data) -> None:
    import torchvision

    root = Path(data or os.environ.get("CIFAR10_ROOT") or "data").expanduser()
    try:
        for train in (True, False):
            torchvision.datasets.CIFAR10(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"could not download CIFAR-10 into {root}: {exc}") from exc


def _cached(root: Path, split: str, files: list[Path], decode) -> Split:
    digest = hashlib.sha256(str(root.resolve()).encode() + split.encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    path = cache_dir() / f"cifar10-{split}-{digest.hexdigest()[:20]}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return Split(z["images"], z["labels"], tuple(str(c) for c in z["classes"]))
        except Exception:  # a damaged cache entry (truncated, zip errors, ...) is simply rebuilt
            pass
    result = decode()
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=result.images, labels=result.labels, classes=np.array(result.classes))
    except (ToolchainError, OSError) as exc:  # no cache is slower, not wrong
        warnings.warn(f"could not cache decoded images in {path.parent}: {exc}", stacklevel=2)
    return result


class _SafeUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles by format: allow numpy arrays and plain containers, nothing
    that could run code (a tampered batch file is refused, never executed)."""

    ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _read_pickled(files: list[Path]) -> Split:
    images, labels = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                batch = _SafeUnpickler(fh, encoding="latin1").load()
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        except Exception as exc:
            raise DataError(f"{f} is not a readable CIFAR-10 batch file: {exc}") from exc
    return Split(np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1)),
                 np.concatenate(labels), CIFAR10_CLASSES)


def _read_image_folder(files: list[tuple[Path, int]], classes: tuple[str, ...], split: str) -> Split:
    from PIL import Image
    from tqdm import tqdm

    images = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for i, (f, _) in enumerate(tqdm(files, desc=f"decoding {split}", unit="img",
                                    leave=False, mininterval=1.0, disable=None)):
        try:
            with Image.open(f) as im:
                array = np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise DataError(f"corrupt image {f}: {exc}") from exc
        if array.shape != (32, 32, 3):
            raise DataError(f"image {f} is {array.shape[1]}x{array.shape[0]}, expected 32x32")
        images[i] = array
    labels = np.array([label for _, label in files], dtype=np.int64)
    return Split(images, labels, classes)


def to_tensor(images: np.ndarray | torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """uint8 NHWC images -> normalised float NCHW tensor."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-image random crop (zero padding of `pad` pixels) and horizontal flip of NHWC uint8."""
    n, h, w, _ = images.shape
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(2), cols)
    return padded[torch.arange(n)[:, None, None], rows, cols]


def batches(split: Split, batch_size: int, *, shuffle: bool = False, augment_images: bool = False,
            seed: int = 0, mean=CIFAR10_MEAN, std=CIFAR10_STD, rank: int = 0, world_size: int = 1):
    """Yield (inputs, labels) batches; with world_size > 1 each rank gets its own shard."""
    images = torch.from_numpy(split.images)
    labels = torch.from_numpy(split.labels)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
    if world_size > 1:  # equal shards: every process must take the same number of steps
        order = order[:len(order) - len(order) % world_size][rank::world_size]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = images[idx]
        if augment_images:
            x = augment(x, generator)
        yield to_tensor(x, mean, std), labels[idx]
