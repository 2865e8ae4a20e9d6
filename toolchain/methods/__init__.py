"""Compression methods. Each turns a trained model into a compressed one in PyTorch.

A method's module defines its config dataclass, an apply function and an `IMPLEMENTATION`
describing them to the pipeline; `toolchain.registry` names the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Implementation:
    """What the pipeline calls. Hooks a method does not need stay None."""

    # Config dataclass, with `ratio` and, where it has them, `seed` and `round_to`: ExportConfig sets those.
    config: type | None = None
    apply: Callable | None = None  # (model, config) -> (compressed copy, info dict)
    # Data-aware refit before fine-tuning: (model, original, Calibration) -> per-layer records.
    refit: Callable | None = None
    option_fields: tuple[str, ...] = ()  # config fields a user chooses; result rows record them
    stage: str = "pruned"  # name of the accuracy measured right after apply
    shared_weights: bool = False  # the ONNX file keeps the nodes that rebuild shared weights
    # Narrower storage of the exported weights: check_bits(bits) validates, store_bits(model, bits)
    # converts the model in place (the pipeline hands it a copy).
    check_bits: Callable | None = None
    store_bits: Callable | None = None
    # (model) -> names of the initializers holding 4-bit codes (int8 within -8..7 or uint8 within
    # 0..15), which the file stores two a byte.
    four_bit: Callable | None = None
    trained_bits: tuple[int, ...] = ()  # widths fine-tuned with their rounding in the loop ...
    round_in_loop: Callable | None = None  # ... by this: (model, bits)
    sweep_bits: tuple[int, ...] = ()  # widths a sweep also exports from the same fine-tuned model
    # (model) -> None, once trained: drops what only training needs (weight clustering's shadow weights).
    strip: Callable | None = None
    # File-level peers: (baseline .onnx, out .onnx) -> manifest.
    from_file: Callable | None = None


@dataclass(frozen=True)
class Calibration:
    """Seeded training images for a refit: `images(n, seed_offset)`, normalised like the model's input."""

    count: int
    images: Callable
