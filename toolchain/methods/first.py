"""Method first: every conv's filters are replaced by their cluster centroids (weight sharing).

A clustered conv stores `centroids[k, cin, kh, kw]` and a fixed `assignment[filters]`;
its weight is `centroids[assignment]`, so fine-tuning updates the shared centroids and
filters of one cluster stay identical. Exported to ONNX this is an initializer pair plus
a Gather, which ONNX Runtime folds when it loads the file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from ..clustering import allocate_budget, clusters_for, error_curve, kmeans
from ..errors import ConfigError
from ..least_squares import batched, block_inputs, capture, solve_conv_weight
from ..models import CifarResNet, bn_scale, rescale_bn_input
from . import Calibration, Implementation


@dataclass
class FirstConfig:
    ratio: float = settings.RATIO
    seed: int = settings.SEED
    n_init: int = 4
    # raw: plain K-Means on filters; bn-weighted: each filter's error weighted by its BN scale
    # squared; scaled: cluster filter directions and fold each filter's own scale into its BN
    # (the default: the most accurate after the refit and fine-tune, docs/methods.md).
    features: str = settings.FEATURES[0]
    allocation: str = settings.FIRST_ALLOCATIONS[0]  # or "global": per-layer k from one parameter budget
    layers: tuple[str, ...] | None = None  # conv names to cluster; None: all

    def __post_init__(self):
        clusters_for(1, self.ratio)  # validates the ratio
        if self.features not in settings.FEATURES:
            raise ConfigError(f"features must be one of {settings.FEATURES}, got {self.features!r}")
        if self.allocation not in settings.FIRST_ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(settings.FIRST_ALLOCATIONS)} for method first, "
                              f"got {self.allocation!r}")


class SharedConv2d(nn.Module):
    """A bias-free Conv2d whose filters are rows of a centroid table."""

    def __init__(self, conv: nn.Conv2d, centroids: torch.Tensor, assignment: torch.Tensor):
        super().__init__()
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "groups"):
            setattr(self, attr, getattr(conv, attr))
        self.centroids = nn.Parameter(centroids.clone())
        # int32 indices: half the bytes of int64 in the file, and valid Gather indices.
        self.register_buffer("assignment", assignment.to(torch.int32))
        self.register_buffer("scale", None)  # per-centroid scale once centroids are integer codes
        self.bits: int | None = None  # code width once quantized; while fine-tuning, the width trained for

    @property
    def weight(self) -> torch.Tensor:
        if self.scale is not None:
            table = self.centroids.float() * self.scale
        elif self.bits is not None:
            table = fake_quantize(self.centroids, self.bits)
        else:
            table = self.centroids
        return table.index_select(0, self.assignment)

    def forward(self, x):
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, k={len(self.centroids)}"


def _bn_after(modules: dict, name: str) -> nn.BatchNorm2d | None:
    parent, _, leaf = name.rpartition(".")
    return modules.get((parent + "." if parent else "") + leaf.replace("conv", "bn"))


def clusterable_convs(model: nn.Module, layers=None) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """(name, conv, the BatchNorm right after it) for each conv to cluster, in network order."""
    modules = dict(model.named_modules())
    return [(name, m, _bn_after(modules, name)) for name, m in modules.items()
            if isinstance(m, nn.Conv2d) and (layers is None or name in layers)]


def _bn_scale(bn: nn.BatchNorm2d) -> np.ndarray:
    return bn_scale(bn).detach().numpy().astype(np.float64)


def _clustering_inputs(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, features: str):
    """(vectors, weights) K-Means runs on: the error each filter's approximation adds at the BN output."""
    vectors = conv.weight.detach().flatten(1).numpy()
    if features == "raw" or bn is None:
        return vectors, np.ones(len(vectors))
    if features == "bn-weighted":
        return vectors, _bn_scale(bn) ** 2 + 1e-12
    # scaled: filter i becomes s_i * centroid, and s_i moves into the BN after the conv
    # (a per-channel affine the file keeps anyway), so only directions need to cluster.
    norms = np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    return vectors / norms, (_bn_scale(bn) * norms[:, 0]) ** 2 + 1e-12


@torch.no_grad()
def _fold_filter_scales(conv: nn.Conv2d, bn: nn.BatchNorm2d, centroids: np.ndarray, assignment: np.ndarray):
    """Least-squares scale s_i of each filter on its centroid, moved into BN: BN'(z) == BN(s*z).

    The running statistics move with the scale (mean / s, variance / s^2), so the BN keeps the
    function in eval mode, in train mode (batch statistics) and after a plain recalibration."""
    vectors = conv.weight.detach().flatten(1).numpy().astype(np.float64)
    c = centroids[assignment].astype(np.float64)
    s = (vectors * c).sum(1) / (c * c).sum(1).clip(1e-12)
    s = np.where(np.abs(s) < 1e-6, 1e-6, s)  # a dead filter keeps a tiny, invertible scale
    s = torch.from_numpy(s).to(bn.weight.dtype)
    rescale_bn_input(bn, 1 / s)  # the conv now outputs z = (s * z) / s


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def apply_first(model: nn.Module, cfg: FirstConfig) -> tuple[nn.Module, dict]:
    """Cluster the filters of every chosen conv of a copy of `model`; returns it and a record per layer."""
    model = copy.deepcopy(model)
    convs = clusterable_convs(model, cfg.layers)
    if not convs:
        raise ValueError("no convolution layer to cluster")
    inputs = [_clustering_inputs(conv, bn, cfg.features) for _, conv, bn in convs]
    ks = [clusters_for(conv.out_channels, cfg.ratio) for _, conv, _ in convs]
    if cfg.allocation == "global":
        costs = [conv.weight[0].numel() for _, conv, _ in convs]
        budget = sum(k * c for k, c in zip(ks, costs))
        # Relative errors: layers differ in scale by orders of magnitude, so absolute errors would
        # starve the layers of small weights down to a single cluster.
        curves = [error_curve(v, w, cfg.seed) / (w * (v * v).sum(1)).sum() for v, w in inputs]
        ks = allocate_budget(curves, costs, budget)
    layers = []
    for (name, conv, bn), (v, w), k in zip(convs, inputs, ks):
        result = kmeans(v, k, cfg.seed, cfg.n_init, w)
        if cfg.features == "scaled" and bn is not None:
            _fold_filter_scales(conv, bn, result.centroids, result.assignment)
        centroids = torch.from_numpy(result.centroids).view(-1, *conv.weight.shape[1:])
        _set_module(model, name, SharedConv2d(conv, centroids, torch.from_numpy(result.assignment)))
        layers.append({"layer": name, "filters": conv.out_channels, "k": len(result.centroids),
                       "inertia": result.inertia})
    return model, {"layers": layers, "first": {"features": cfg.features, "allocation": cfg.allocation,
                                               "n_init": cfg.n_init}}


def _output_scale(bn: nn.BatchNorm2d | None, channels: int) -> torch.Tensor:
    """How a conv output channel is scaled on its way through the BN after it (eval mode)."""
    return torch.ones(channels) if bn is None else bn_scale(bn)


@torch.no_grad()
def refit_centroids(model: CifarResNet, original: CifarResNet, images: torch.Tensor, ridge: float = 1e-3,
                    batch_size: int = 256) -> list[dict]:
    """Data-aware centroids: layer by layer in network order, each centroid becomes the filter
    whose output best reproduces, at the BN output, its members' outputs in the original model.

    Fed by the clustered network so far, so each layer also corrects earlier layers' errors.
    The weighted least-squares centroid of a cluster is the weighted mean of its members'
    own least-squares filters (all share one Gram matrix), so one solve serves the layer.
    Returns each layer's relative squared error at the BN output before and after.
    """
    modules, source = dict(model.named_modules()), dict(original.named_modules())
    names = [name for name, m in modules.items() if isinstance(m, SharedConv2d) and m.scale is None]
    targets = dict(zip(names, capture(original, [source[name] for name in names], images, "output", batch_size)))
    errors = []
    for name, conv, x in _conv_inputs(model, images, batch_size):
        if name not in targets:
            continue
        a = _output_scale(_bn_after(source, name), conv.out_channels)
        a_new = _output_scale(_bn_after(modules, name), conv.out_channels)
        target = targets.pop(name) * a.view(1, -1, 1, 1)

        def error() -> float:
            out = batched(conv, x, batch_size)
            return float(((out * a_new.view(1, -1, 1, 1) - target) ** 2).sum() / (target ** 2).sum())

        before = error()
        per_filter = solve_conv_weight(conv, x, target / a_new.view(1, -1, 1, 1), ridge).flatten(1)
        members = F.one_hot(conv.assignment.long(), len(conv.centroids)).double() * (a_new ** 2).double()[:, None]
        centroids = (members.T @ per_filter.double()) / members.sum(0).clamp_min(1e-12)[:, None]
        conv.centroids.copy_(centroids.view_as(conv.centroids).float())
        errors.append({"layer": name, "relative_error_before": before, "relative_error_after": error()})
        bn = _bn_after(modules, name)
        if bn is not None:  # after the error: `error` holds this BN's scale from before
            _rescale_centroids(conv, bn, _member_norms(source[name].weight, conv.assignment, len(conv.centroids)))
    if targets:
        raise ValueError(f"the refit walks a CIFAR ResNet's convs and never reached {', '.join(targets)}")
    return errors


def _conv_inputs(model: CifarResNet, images: torch.Tensor, batch_size: int):
    """(name, conv, its input) for every conv of a CIFAR ResNet in network order, each input
    computed by the model as it is when the caller gets there (see `block_inputs`), so a conv
    refit in between feeds the convs after it."""
    yield "conv1", model.conv1, images
    for name, block, x in block_inputs(model, images, batch_size):
        yield f"{name}.conv1", block.conv1, x
        yield f"{name}.conv2", block.conv2, batched(block.hidden, x, batch_size)


def _member_norms(weight: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Root mean square of the original filter norms of each cluster's members."""
    squares = weight.detach().flatten(1).pow(2).sum(1)
    total = torch.zeros(k, dtype=squares.dtype).index_add_(0, assignment.long(), squares)
    count = torch.bincount(assignment.long(), minlength=k).clamp_min(1)
    return (total / count).sqrt()


@torch.no_grad()
def _rescale_centroids(conv: SharedConv2d, bn: nn.BatchNorm2d, norms: torch.Tensor) -> None:
    """Give the centroids these norms, the BN after the conv keeping the function. BN makes the
    scale free for the function but not for SGD: its effective step goes as 1 / |w|^2, and the
    least-squares refit leaves centroids larger than the filters they replace."""
    factor = norms.to(conv.centroids.dtype) / conv.centroids.flatten(1).norm(dim=1).clamp_min(1e-12)
    conv.centroids.mul_(factor.view(-1, *([1] * (conv.centroids.ndim - 1))))
    rescale_bn_input(bn, factor[conv.assignment.long()])


def shared_convs(model: nn.Module) -> list[SharedConv2d]:
    return [m for m in model.modules() if isinstance(m, SharedConv2d)]


BITS = settings.CENTROID_BITS
TRAINED_BITS = settings.TRAINED_BITS  # codes this narrow are fine-tuned with quantization in the loop


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ConfigError(f"centroids are stored with {' or '.join(map(str, BITS))} bits, got {bits}")


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # symmetric codes: -127..127 for 8 bits, -7..7 for 4


@torch.no_grad()
def centroid_scales(centroids: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per centroid, shaped to broadcast over it. 8 bits: the largest magnitude maps to the
    largest code. Fewer bits: the clipping of the largest magnitude (100% down to 50%) with the least
    squared error, since with 7 levels a side, one outlier would coarsen the step of every other weight."""
    flat, levels = centroids.detach().float().flatten(1), _levels(bits)
    fractions = torch.tensor([1.0]) if bits == 8 else torch.linspace(1.0, 0.5, 11)
    scales = fractions[:, None] * flat.abs().amax(1).clamp_min(1e-12) / levels  # (fractions, centroids)
    errors = torch.stack([((_round_codes(flat, s[:, None], levels) * s[:, None] - flat) ** 2).sum(1) for s in scales])
    best = scales.gather(0, errors.argmin(0, keepdim=True))[0]  # ties go to the larger range
    return best.view(-1, *([1] * (centroids.ndim - 1)))


def _round_codes(values: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round(values / scale).clamp(-levels, levels)


def fake_quantize(centroids: torch.Tensor, bits: int) -> torch.Tensor:
    """The centroids as their `bits`-bit codes will give them back, with a straight-through gradient
    (the rounding counts as the identity, clipped weights included: the clipping moves with the
    weights, since the scale is chosen anew at every step), so fine-tuning learns weights that
    survive the rounding."""
    scale = centroid_scales(centroids, bits)
    quantized = _round_codes(centroids, scale, _levels(bits)) * scale
    return centroids + (quantized - centroids).detach()


def train_quantized(model: nn.Module, bits: int) -> None:
    """Let every shared conv fine-tune through `bits`-bit fake quantization (`quantize_centroids`
    afterwards stores exactly the values trained with)."""
    check_bits(bits)
    for m in shared_convs(model):
        m.bits = bits


def int4_tables(model: nn.Module) -> tuple[str, ...]:
    """Names of the centroid tables stored as 4-bit codes: the exporter writes them as INT4."""
    return tuple(f"{name}.centroids" for name, m in model.named_modules()
                 if isinstance(m, SharedConv2d) and m.scale is not None and m.bits == 4)


@torch.no_grad()
def quantize_centroids(model: nn.Module, bits: int = 8) -> tuple[str, ...]:
    """Store each centroid as `bits`-bit integer codes with one float scale (symmetric, per centroid).

    Codes are int8 tensors here (4-bit ones within -7..7; the ONNX file stores those as INT4),
    rebuilt in the graph by Cast + Mul, which ONNX Runtime constant-folds at load (unlike
    DequantizeLinear, which it keeps for its quantized kernels). 8-bit codes are rounded after a
    float fine-tune; 4-bit codes are fine-tuned with the rounding in the loop (`train_quantized`).
    Returns the names of the tables the exporter writes as INT4.
    """
    check_bits(bits)
    for m in shared_convs(model):
        if m.scale is not None:
            continue
        c = m.centroids.detach()
        scale = centroid_scales(c, bits)
        m.centroids = nn.Parameter(_round_codes(c, scale, _levels(bits)).to(torch.int8), requires_grad=False)
        m.scale, m.bits = scale.float(), bits
    return int4_tables(model)


def refit(model: CifarResNet, original: CifarResNet, calibration: Calibration) -> list[dict]:
    return refit_centroids(model, original, calibration.images(calibration.count, 0))


IMPLEMENTATION = Implementation(
    config=FirstConfig, apply=apply_first, refit=refit, option_fields=("features", "allocation"),
    stage="clustered", shared_weights=True, check_bits=check_bits, store_bits=quantize_centroids,
    trained_bits=(TRAINED_BITS,), round_in_loop=train_quantized, sweep_bits=(8,))
