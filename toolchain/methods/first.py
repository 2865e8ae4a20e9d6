"""Method first: every conv's filters are replaced by their cluster centroids (weight sharing).

A clustered conv stores `centroids[k, cin, kh, kw]` and a fixed `assignment[filters]`;
its weight is `centroids[assignment]`, so fine-tuning updates the shared centroids and
filters of one cluster stay identical. Exported to ONNX this is an initializer pair plus
a Gather, which ONNX Runtime folds when it loads the file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from ..clustering import allocate_budget, clusters_for, error_curve, kmeans
from ..errors import ConfigError
from ..least_squares import batched, solve_conv_weight
from ..models import CifarResNet, rescale_bn_input
from . import Calibration, Implementation
from .convs import bn_after, clusterable_convs, clustering_inputs, conv_targets, fold_filter_scales, set_module
from .kernels import CodebookConv2d, apply_kernels, drop_shadows, refit_codebooks
from .shared_tables import SharedTable, check_bits, int4_tables, quantize_centroids, train_quantized


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
    # filter: each conv's filters share centroid filters (the ratio sets how many). kernel: every
    # kh x kw kernel is an entry of a codebook of codebook_size entries shared by the convs of codebook_scope
    # (toolchain.methods.kernels); the ratio plays no part.
    granularity: str = settings.GRANULARITIES[0]
    # Kernel granularity only: entries per codebook, or a fraction (0, 1) of each codebook's kernels (so
    # that a large conv gets a larger codebook). None: settings.CODEBOOK_SIZE.
    codebook_size: int | float | None = None
    codebook_scope: str | None = None  # kernel granularity only; None: settings.CODEBOOK_SCOPES[0]
    # Kernel granularity: while fine-tuning, each kernel moves to the entry nearest its shadow
    # weights (kernels.CodebookConv2d); False: every kernel keeps the entry the refit gave it.
    # None: True at kernel granularity (the more accurate after fine-tuning, docs/methods.md).
    reassign: bool | None = None
    # Kernel granularity: residual codebooks of as many entries per scope, K-Means fit to what those
    # before leave over; each kernel is the sum of its entries (an index each). None: False.
    residual: bool | None = None
    # With residual: how many residual codebooks, each fit to what those before leave over (one index
    # each per kernel). None: 1.
    residual_codebooks: int | None = None

    def __post_init__(self):
        clusters_for(1, self.ratio)  # validates the ratio
        self._resolve_granularity()
        if self.features not in settings.FEATURES:
            raise ConfigError(f"features must be one of {settings.FEATURES}, got {self.features!r}")
        if self.allocation not in settings.FIRST_ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(settings.FIRST_ALLOCATIONS)} for method first, "
                              f"got {self.allocation!r}")


    def _resolve_granularity(self) -> None:
        if self.granularity not in settings.GRANULARITIES:
            raise ConfigError(f"granularity must be one of {', '.join(settings.GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity != "kernel":
            if any(v is not None for v in (self.codebook_size, self.codebook_scope, self.reassign, self.residual,
                                           self.residual_codebooks)):
                raise ConfigError("--codebook-size, --codebook-scope, --reassign/--fixed-index, --residual/--no-residual "
                                  "and --residual-codebooks are options of --granularity kernel")
            return
        if self.allocation != settings.FIRST_ALLOCATIONS[0]:
            raise ConfigError(f"--allocation {self.allocation} sizes filter clusters; not with --granularity kernel")
        if self.codebook_size is None:
            self.codebook_size = settings.CODEBOOK_SIZE
        if self.codebook_scope is None:
            self.codebook_scope = settings.CODEBOOK_SCOPES[0]
        if self.reassign is None:
            self.reassign = True
        if self.residual is None:
            self.residual = self.residual_codebooks is not None  # --residual-codebooks alone asks for residuals
        for name in ("reassign", "residual"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} is True or False, got {getattr(self, name)!r}")
        self._resolve_residual_codebooks()
        size = self.codebook_size
        whole = isinstance(size, int) and not isinstance(size, bool)
        if not (whole and 2 <= size <= settings.MAX_CODEBOOK or isinstance(size, float) and 0 < size < 1):
            raise ConfigError(f"codebook size must be a whole number of entries from 2 to {settings.MAX_CODEBOOK} "
                              f"or a fraction of each codebook's kernels between 0 and 1, got {size!r}")
        if self.codebook_scope not in settings.CODEBOOK_SCOPES:
            raise ConfigError(f"codebook scope must be one of {', '.join(settings.CODEBOOK_SCOPES)}, "
                              f"got {self.codebook_scope!r}")

    def _resolve_residual_codebooks(self) -> None:
        if not self.residual:
            if self.residual_codebooks is not None:
                raise ConfigError("--residual-codebooks counts residual codebooks: not with --no-residual")
            return
        if self.residual_codebooks is None:
            self.residual_codebooks = 1
        count = self.residual_codebooks
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= settings.MAX_RESIDUAL_CODEBOOKS:
            raise ConfigError(f"residual codebooks must be a whole number from 1 to {settings.MAX_RESIDUAL_CODEBOOKS}, "
                              f"got {count!r}")

    @property
    def codebooks_per_kernel(self) -> int:
        """How many codebooks each kernel draws an entry from: the first, and its residual ones."""
        return 1 + (self.residual_codebooks if self.residual else 0)

    @property
    def int8_ready(self) -> bool:
        """Whether --quantize int8 keeps this config's sharing (kernel codebooks: not yet)."""
        return self.granularity != "kernel"

    @property
    def label(self) -> str | None:
        """What names this config's files in place of the ratio: None at filter granularity."""
        if self.granularity == "kernel":
            extra = self.codebooks_per_kernel - 1
            residual = "" if extra == 0 else "-residual" + (f"{extra}" if extra > 1 else "")
            return (f"kernel-{self.codebook_scope}{self.codebook_size:g}" + residual
                    + ("" if self.reassign else "-fixed"))
        return None


class SharedConv2d(SharedTable):
    """A bias-free Conv2d whose filters are rows of a centroid table."""

    def __init__(self, conv: nn.Conv2d, centroids: torch.Tensor, assignment: torch.Tensor):
        super().__init__(centroids)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "groups"):
            setattr(self, attr, getattr(conv, attr))
        # int32 indices: half the bytes of int64 in the file, and valid Gather indices.
        self.register_buffer("assignment", assignment.to(torch.int32))

    @property
    def weight(self) -> torch.Tensor:
        return self.table().index_select(0, self.assignment)

    def forward(self, x):
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, k={len(self.centroids)}"


@torch.no_grad()
def apply_first(model: nn.Module, cfg: FirstConfig) -> tuple[nn.Module, dict]:
    """Cluster the filters (or the kernels, by cfg.granularity) of every chosen conv of a copy of `model`;
    returns it and a record per layer (per codebook)."""
    if cfg.granularity == "kernel":
        return apply_kernels(model, cfg)
    model = copy.deepcopy(model)
    convs = clusterable_convs(model, cfg.layers)
    if not convs:
        raise ValueError("no convolution layer to cluster")
    inputs = [clustering_inputs(conv.weight.detach().flatten(1).numpy(), bn, cfg.features) for _, conv, bn in convs]
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
            fold_filter_scales(conv, bn, result.centroids, result.assignment)
        centroids = torch.from_numpy(result.centroids).view(-1, *conv.weight.shape[1:])
        set_module(model, name, SharedConv2d(conv, centroids, torch.from_numpy(result.assignment)))
        layers.append({"layer": name, "filters": conv.out_channels, "k": len(result.centroids),
                       "inertia": result.inertia})
    return model, {"layers": layers, "first": {"features": cfg.features, "allocation": cfg.allocation,
                                               "n_init": cfg.n_init}}


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
    errors = []
    for name, conv, x, output, a, a_new in conv_targets(model, original, names, images, batch_size):
        target = output * a.view(1, -1, 1, 1)

        def error() -> float:
            out = batched(conv, x, batch_size)
            return float(((out * a_new.view(1, -1, 1, 1) - target) ** 2).sum() / (target ** 2).sum())

        before = error()
        per_filter = solve_conv_weight(conv, x, target / a_new.view(1, -1, 1, 1), ridge).flatten(1)
        members = F.one_hot(conv.assignment.long(), len(conv.centroids)).double() * (a_new ** 2).double()[:, None]
        centroids = (members.T @ per_filter.double()) / members.sum(0).clamp_min(1e-12)[:, None]
        conv.centroids.copy_(centroids.view_as(conv.centroids).float())
        errors.append({"layer": name, "relative_error_before": before, "relative_error_after": error()})
        bn = bn_after(modules, name)
        if bn is not None:  # after the error: `error` holds this BN's scale from before
            _rescale_centroids(conv, bn, _member_norms(source[name].weight, conv.assignment, len(conv.centroids)))
    return errors


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


def refit(model: CifarResNet, original: CifarResNet, calibration: Calibration) -> list[dict]:
    images = calibration.images(calibration.count, 0)
    if any(isinstance(m, CodebookConv2d) for m in model.modules()):
        return refit_codebooks(model, original, images)
    return refit_centroids(model, original, images)


IMPLEMENTATION = Implementation(
    config=FirstConfig, apply=apply_first, refit=refit, option_fields=("features", "allocation", "reassign", "residual", "residual_codebooks"),
    stage="clustered", shared_weights=True, check_bits=check_bits, store_bits=quantize_centroids, four_bit=int4_tables,
    trained_bits=(settings.TRAINED_BITS,), round_in_loop=train_quantized, sweep_bits=(8,), strip=drop_shadows)
