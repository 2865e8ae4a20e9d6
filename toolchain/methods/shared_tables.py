"""Tables of shared weights, in float or stored as integer codes with a scale per row.

Method first shares weights through such tables: a table of centroid filters per conv (filter
granularity), or a codebook of kernels shared by the convs of a scope (kernel granularity). Each
conv rebuilds its weight by indexing its table; the file stores the table and the indices.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import settings
from ..errors import ConfigError


class SharedTable(nn.Module):
    """`centroids`: the table's rows (trained while fine-tuning). Once stored as integer codes,
    `scale` holds one float per row and `bits` the code width; `bits` alone means the rows are
    fine-tuned through that rounding."""

    row_scales = True  # one scale per row when stored as codes; False: one for the whole table

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        self.register_buffer("scale", None)
        self.bits: int | None = None

    def table(self, rounded: bool = True) -> torch.Tensor:
        """The rows as the file will give them back; without `rounded`, as trained (before the rounding
        in the loop, if any)."""
        if self.scale is not None:
            return self.centroids.float() * self.scale
        if self.bits is not None and rounded:
            return fake_quantize(self.centroids, self.bits, self.row_scales)
        return self.centroids


def shared_tables(model: nn.Module) -> list[SharedTable]:
    """Every table of the model once (a codebook shared by several convs included)."""
    return [m for m in model.modules() if isinstance(m, SharedTable)]


BITS = settings.CENTROID_BITS
TRAINED_BITS = settings.TRAINED_BITS  # codes this narrow are fine-tuned with quantization in the loop


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ConfigError(f"centroids are stored with {' or '.join(map(str, BITS))} bits, got {bits}")


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # symmetric codes: -127..127 for 8 bits, -7..7 for 4


@torch.no_grad()
def centroid_scales(centroids: torch.Tensor, bits: int, per_row: bool = True) -> torch.Tensor:
    """One scale per centroid (or, without `per_row`, one for them all), shaped to broadcast over
    them. 8 bits: the largest magnitude maps to the
    largest code. Fewer bits: the clipping of the largest magnitude (100% down to 50%) with the least
    squared error, since with 7 levels a side, one outlier would coarsen the step of every other weight."""
    flat, levels = centroids.detach().float().reshape(len(centroids) if per_row else 1, -1), _levels(bits)
    fractions = torch.tensor([1.0]) if bits == 8 else torch.linspace(1.0, 0.5, 11)
    scales = fractions[:, None] * flat.abs().amax(1).clamp_min(1e-12) / levels  # (fractions, centroids)
    errors = torch.stack([((_round_codes(flat, s[:, None], levels) * s[:, None] - flat) ** 2).sum(1) for s in scales])
    best = scales.gather(0, errors.argmin(0, keepdim=True))[0]  # ties go to the larger range
    return best.view(len(flat), *([1] * (centroids.ndim - 1)))


def _round_codes(values: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round(values / scale).clamp(-levels, levels)


def fake_quantize(centroids: torch.Tensor, bits: int, per_row: bool = True) -> torch.Tensor:
    """The centroids as their `bits`-bit codes will give them back, with a straight-through gradient
    (the rounding counts as the identity, clipped weights included: the clipping moves with the
    weights, since the scale is chosen anew at every step), so fine-tuning learns weights that
    survive the rounding."""
    scale = centroid_scales(centroids, bits, per_row)
    quantized = _round_codes(centroids, scale, _levels(bits)) * scale
    return centroids + (quantized - centroids).detach()


@torch.no_grad()
def nearest_rows(shadow: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the table row nearest each shadow weight (a row: a scalar or a kernel), for
    `through_shadow`. In float64, so that a weight sitting at its own row finds that row rather than
    a neighbour within float32's rounding of the distances."""
    return torch.cdist(shadow.double().reshape(len(shadow), -1), table.double().reshape(len(table), -1)).argmin(1)


def averaged_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index], with the gradient reaching each row averaged over the weights that use it
    (TFMOT's `GradientAggregation.AVG`; summed, a row shared by thousands of weights takes steps
    thousands of times too large under SGD)."""
    members = torch.bincount(index, minlength=len(table)).clamp_min(1).view(-1, *([1] * (table.ndim - 1)))
    averaged = table.detach() + (table - table.detach()) / members
    return averaged[index]


def through_shadow(rows: list[tuple[torch.Tensor, torch.Tensor]], shadow: torch.Tensor) -> torch.Tensor:
    """The sum of table[index] over `rows` (one pair, or a kernel's codebook and its residuals) in the
    forward pass, for weights just assigned to their nearest rows (TFMOT's clustering wrapper): the
    gradient reaches each row averaged over its weights (`averaged_rows`) and, straight through, the
    shadow weights, which keep every small step until one carries a weight over to another row."""
    return sum(averaged_rows(table, index) for table, index in rows) + (shadow - shadow.detach())


def train_quantized(model: nn.Module, bits: int) -> None:
    """Let every shared conv fine-tune through `bits`-bit fake quantization (`quantize_centroids`
    afterwards stores exactly the values trained with)."""
    check_bits(bits)
    for m in shared_tables(model):
        m.bits = bits


def int4_tables(model: nn.Module) -> tuple[str, ...]:
    """Names of the centroid tables stored as 4-bit codes: the exporter writes them as INT4."""
    return tuple(f"{name}.centroids" for name, m in model.named_modules()
                 if isinstance(m, SharedTable) and m.scale is not None and m.bits == 4)


@torch.no_grad()
def quantize_centroids(model: nn.Module, bits: int = 8) -> None:
    """Store each centroid as `bits`-bit integer codes with one float scale (symmetric, per centroid).

    Codes are int8 tensors here (4-bit ones within -7..7; the ONNX file stores those as INT4),
    rebuilt in the graph by Cast + Mul, which ONNX Runtime constant-folds at load (unlike
    DequantizeLinear, which it keeps for its quantized kernels). 8-bit codes are rounded after a
    float fine-tune; 4-bit codes are fine-tuned with the rounding in the loop (`train_quantized`).
    `int4_tables` names the tables the exporter writes as INT4.
    """
    check_bits(bits)
    for m in shared_tables(model):
        if m.scale is not None:
            continue
        c = m.centroids.detach()
        scale = centroid_scales(c, bits, m.row_scales)
        m.centroids = nn.Parameter(_round_codes(c, scale, _levels(bits)).to(torch.int8), requires_grad=False)
        m.scale, m.bits = scale.float(), bits
