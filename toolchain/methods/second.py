"""Method second: each residual block's first conv keeps one filter per cluster of its filters.

Per block: cluster the rows [filter, bias] of conv1 with BN1 folded in, keep one original
filter per cluster (by default importance-aware clusters: the filters of largest L1 norm are
the centres and every other filter joins the nearest; or K-Means with its medoid, centroid or
largest member), back at the raw scale with BN1 keeping its scale, and give conv2 one input
channel per cluster: the **sum** of its members' input slices (exact when the members are
identical).
The result is a plain, smaller CifarResNet (narrower blocks), no masks or gathers.

With calibration images, `reconstruct` then refits each block's conv2 by ridge least
squares so that, fed by the compressed network so far, it reproduces the original
block's conv2 output: the biggest accuracy lever before fine-tuning.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from ..clustering import clusters_for, kmeans
from ..cpu import channel_block
from ..errors import ConfigError
from ..least_squares import batched, block_inputs, refit_classifier, relative_error, solve_conv_weight
from ..models import BasicBlock, CifarResNet, bn_affine, bn_scale, count_macs, rescale_bn_input, set_bn_affine
from . import Calibration, Implementation


@dataclass
class SecondConfig:
    ratio: float = settings.RATIO
    seed: int = settings.SEED
    n_init: int = 4
    round_to: int = 1  # round each kept width up to a multiple of this (CPU channel blocks)
    # What stands for a cluster in conv1: its centroid (mean of the members), its medoid (the member
    # closest to the centroid) or its largest member (L1 norm). A member keeps an original feature.
    # salient: importance-aware clusters instead of K-Means: the k filters of largest L1 norm (those
    # L1 pruning keeps) stand for the clusters, and every other filter joins the nearest of them,
    # so its conv2 input is merged rather than lost (the default: the most accurate after the
    # fine-tune, docs/methods.md).
    keep: str = settings.KEEP[0]
    # uniform: every block keeps round(filters x (1 - ratio)). latency: per-stage widths that cost the
    # CPU least (multiply-adds with widths padded to its channel block) within uniform's multiply-adds.
    allocation: str = settings.SECOND_ALLOCATIONS[0]
    channel_block: int | None = None  # allocation latency: the CPU's channel block; None: this CPU's

    def __post_init__(self):
        clusters_for(1, self.ratio)  # validates the ratio
        if self.keep not in settings.KEEP:
            raise ConfigError(f"keep must be one of {', '.join(settings.KEEP)}, got {self.keep!r}")
        if self.allocation not in settings.SECOND_ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(settings.SECOND_ALLOCATIONS)} for method "
                              f"second, got {self.allocation!r}")
        if self.round_to < 1:
            raise ConfigError(f"round_to must be 1 or more, got {self.round_to}")


def kept_width(filters: int, ratio: float, round_to: int) -> int:
    k = clusters_for(filters, ratio)
    return min(filters, math.ceil(k / round_to) * round_to)


def padded_widths(widths: list[int], full: list[int], block: int) -> list[int]:
    """The widths a CPU with this channel block computes: each rounded up to the block (at most full)."""
    return [min(f, math.ceil(w / block) * block) for w, f in zip(widths, full)]


def latency_widths(model: CifarResNet, ratio: float, round_to: int, block: int) -> list[int]:
    """Per-stage widths at uniform widths' multiply-add budget (within one channel of the costliest
    stage) that cost the CPU least: fewest multiply-adds with widths padded to its channel `block`.
    A width below the block costs what the block costs, so filters removed there buy no speed: this
    takes them where they do. Among equally cheap ones: the narrowest stage widest (as a fraction of
    its full width), then the most multiply-adds."""
    full = model.inner_widths()
    n = len(full) // 3
    stage_full = full[::n]

    def macs(stage_widths) -> int:
        return count_macs(CifarResNet(model.depth, model.num_classes, [w for w in stage_widths for _ in range(n)]))

    # Multiply-adds are linear in each stage's width: an offset and a slope per stage.
    offset = macs([1, 1, 1])
    slopes = np.array([macs([2 if s == t else 1 for t in range(3)]) - offset for s in range(3)])
    budget = macs([kept_width(f, ratio, round_to) for f in stage_full])
    widths = np.stack(np.meshgrid(*(np.arange(1, f + 1) for f in stage_full), indexing="ij"), -1).reshape(-1, 3)
    padded = np.minimum(np.ceil(widths / block) * block, stage_full)
    cost, padded_cost = offset + (widths - 1) @ slopes, offset + (padded - 1) @ slopes
    narrowest = (widths / np.array(stage_full)).min(1)
    fits = (cost <= budget) & (cost > budget - slopes.max())
    best = widths[fits][np.lexsort((-cost[fits], -narrowest[fits], padded_cost[fits]))[0]]
    return [int(w) for w in best for _ in range(n)]


def block_widths(model: CifarResNet, cfg: SecondConfig) -> list[int]:
    """The width each block's conv1 keeps under cfg's ratio, rounding and allocation."""
    if cfg.allocation == "latency":
        return latency_widths(model, cfg.ratio, cfg.round_to, cfg.channel_block or channel_block())
    return [kept_width(f, cfg.ratio, cfg.round_to) for f in model.inner_widths()]


def _folded_conv1(block: BasicBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1 with BN1 folded in: (weight, bias) of the pre-ReLU output."""
    scale, shift = bn_affine(block.bn1)
    return block.conv1.weight * scale.view(-1, 1, 1, 1), shift


def _picks(rows: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor, keep: str) -> torch.Tensor:
    """(clusters, filters) weights that make each cluster's representative from its members'
    rows: their mean (keep="centroid") or one member chosen by `keep` (see SecondConfig)."""
    members = F.one_hot(assignment, len(centroids)).T.to(rows.dtype)
    if keep == "centroid":
        return members / members.sum(1, keepdim=True)
    score = -(rows - centroids[assignment]).pow(2).sum(1) if keep == "medoid" else rows[:, :-1].abs().sum(1)
    chosen = torch.where(members > 0, score, -torch.inf).argmax(1)
    return F.one_hot(chosen, len(rows)).to(rows.dtype)


def _salient_clusters(rows: torch.Tensor, raw_weight: torch.Tensor, k: int):
    """(assignment, picks, inertia) of clusters centred on the k filters of largest raw L1 norm,
    skipping a filter that duplicates a centre already chosen (it adds nothing: it joins it)."""
    rows = rows.double()
    centres = []
    for i in raw_weight.abs().flatten(1).sum(1).argsort(descending=True).tolist():
        if len(centres) == k:
            break
        if not centres or torch.cdist(rows[i:i + 1], rows[centres]).min() > 1e-6 * rows[i].norm():
            centres.append(i)
    centres += [i for i in range(len(rows)) if i not in centres][: k - len(centres)]  # only duplicates left
    centres = torch.tensor(sorted(centres))
    distances = torch.cdist(rows, rows[centres])
    assignment = distances.argmin(1)
    assignment[centres] = torch.arange(k)  # a centre is its own cluster's member, even if a duplicate is closer
    inertia = float(distances.gather(1, assignment[:, None]).pow(2).sum())
    return assignment, F.one_hot(centres, len(rows)).to(torch.float32), inertia


def _unfolding_scale(pick: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The BN1 scale each kept filter is divided by to get back to the raw scale of conv filters:
    a member's own, or the members' mean magnitude for a centroid. Clustering happens on folded
    filters, but fine-tuning needs raw ones: BN makes conv1 scale-invariant, so SGD's effective
    step on it grows as 1 / |w|^2, and folded filters fine-tune worse than raw ones
    (docs/experiments/)."""
    sign = torch.where(pick @ scale < 0, -1.0, 1.0)
    return sign * (pick @ scale.abs()).clamp_min(1e-6)


@torch.no_grad()
def shrink_block(block: BasicBlock, k: int, cfg: SecondConfig) -> tuple[BasicBlock, dict]:
    """A new block whose conv1 keeps one filter per cluster (cfg.keep) and whose conv2 sums the merged inputs."""
    weight, bias = _folded_conv1(block)
    rows = torch.cat([weight.flatten(1), bias[:, None]], 1)
    if cfg.keep == "salient":
        assignment, pick, inertia = _salient_clusters(rows, block.conv1.weight, k)
    else:
        result = kmeans(rows.numpy(), k, cfg.seed, cfg.n_init)
        assignment, inertia = torch.from_numpy(result.assignment).long(), result.inertia
        pick = _picks(rows, assignment, torch.from_numpy(result.centroids), cfg.keep)
    kept, scale = pick @ rows, _unfolding_scale(pick, bn_scale(block.bn1))
    k = len(kept)
    new = BasicBlock(block.conv1.in_channels, block.conv2.out_channels, block.conv1.stride[0], k)
    new.conv1.weight.copy_(kept[:, :-1].view(k, *weight.shape[1:]) / scale.view(-1, 1, 1, 1))
    set_bn_affine(new.bn1, scale, kept[:, -1])
    merge = F.one_hot(assignment, k).to(weight.dtype)  # (filters, k): member -> cluster
    new.conv2.weight.copy_(torch.einsum("oikl,ij->ojkl", block.conv2.weight, merge))
    new.bn2.load_state_dict(block.bn2.state_dict())
    new.shortcut = copy.deepcopy(block.shortcut)
    new.train(block.training)
    return new, {"filters": block.conv1.out_channels, "kept": k, "inertia": inertia}


def apply_second(model: CifarResNet, cfg: SecondConfig) -> tuple[CifarResNet, dict]:
    """Shrink every block of a copy of `model`; returns it and a record per block."""
    model = copy.deepcopy(model).eval()
    widths = iter(block_widths(model, cfg))
    blocks = []
    for stage in (model.layer1, model.layer2, model.layer3):
        for i, block in enumerate(stage):
            stage[i], record = shrink_block(block, next(widths), cfg)
            blocks.append(record)
    return model, {"blocks": blocks, "inner_widths": model.inner_widths(), "keep": cfg.keep,
                   "allocation": cfg.allocation}


def _paired_blocks(pruned: CifarResNet, original: CifarResNet, images: torch.Tensor, batch_size: int):
    """(index, pruned block, original block, its input, the original's input) in network order,
    each network fed by its own earlier blocks (`block_inputs`: a block refit before the caller
    asks for the next pair feeds the blocks after it)."""
    pairs = zip(block_inputs(pruned, images, batch_size), block_inputs(original, images, batch_size))
    for index, ((_, p_block, p_in), (_, o_block, o_in)) in enumerate(pairs):
        yield index, p_block, o_block, p_in, o_in


def _residual(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    """What the block adds to its shortcut: BN2 of conv2 of the hidden layer."""
    return block.bn2(block.conv2(block.hidden(x)))


def _block_sum(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's output before its final ReLU: residual plus shortcut."""
    return _residual(block, x) + block.shortcut(x)


@torch.no_grad()
def _rescale_filters(conv: nn.Conv2d, bn: nn.BatchNorm2d, norms: torch.Tensor) -> None:
    """Give `conv`'s filters these norms, `bn` keeping the function. BN makes the scale free for
    the function but not for SGD: its effective step on the filters goes as 1 / |w|^2."""
    c = norms / conv.weight.flatten(1).norm(dim=1).clamp_min(1e-12)
    conv.weight.mul_(c.view(-1, 1, 1, 1))
    rescale_bn_input(bn, c)


@torch.no_grad()
def _refit_conv1(p_block: BasicBlock, p_in: torch.Tensor, o_in: torch.Tensor, ridge: float, batch_size: int):
    """conv1 on the pruned network's input reproduces what its kept filters computed on the
    original's input (the drift of earlier blocks corrected); filter norms and BN1's function kept."""
    norms = p_block.conv1.weight.flatten(1).norm(dim=1)
    target = batched(p_block.conv1, o_in, batch_size)
    p_block.conv1.weight.copy_(solve_conv_weight(p_block.conv1, p_in, target, ridge))
    _rescale_filters(p_block.conv1, p_block.bn1, norms)


@torch.no_grad()
def reconstruct(pruned: CifarResNet, original: CifarResNet, images: torch.Tensor,
                classifier_images: torch.Tensor | None = None, ridge: float = 1e-3,
                batch_size: int = 256) -> list[dict]:
    """Refit each block by ridge least squares, block by block in network order, then the classifier.

    Each block is fed by the pruned network's own earlier blocks, so their errors are corrected
    too: conv1 first reproduces its kept filters' outputs on the original's input, then conv2 is
    refit so that the block's output (residual plus shortcut, before the ReLU) matches the
    original block's: the shortcut carries the earlier blocks' error, and conv2 makes up for it.
    BN1 statistics are set from the same images. The refit conv2 then gets the filter norms the
    original's would have with the dropped inputs removed (BN2 keeping the function), as the L1
    peer's plainly cut conv2 has: least squares leaves them larger. Last, the classifier is refit
    to the original's logits (see `refit_classifier`) on `classifier_images` (default: `images`).
    Each of these steps raised the accuracy before fine-tuning (docs/experiments/).
    Returns the relative squared error of each block's output and of the logits, before and after.
    """
    errors = []
    for index, p_block, o_block, p_in, o_in in _paired_blocks(pruned, original, images, batch_size):
        target = batched(lambda x: _block_sum(o_block, x), o_in, batch_size)
        before = relative_error(lambda x: _block_sum(p_block, x), p_in, target, batch_size)
        _refit_conv1(p_block, p_in, o_in, ridge, batch_size)
        scale, shift = bn_affine(p_block.bn1)  # BN1 computes scale * conv1 output + shift
        z = batched(p_block.conv1, p_in, batch_size)
        stats = z.transpose(0, 1).flatten(1)
        set_bn_affine(p_block.bn1, scale, shift, stats.mean(1), stats.var(1))  # same function, real statistics
        hidden = F.relu(p_block.bn1(z))
        # BN2 is still the original's here: conv2's target is its inverse applied to what the
        # residual must add to the pruned shortcut.
        scale2, shift2 = bn_affine(p_block.bn2)
        residual = target - batched(p_block.shortcut, p_in, batch_size)
        conv2_target = (residual - shift2.view(1, -1, 1, 1)) / scale2.view(1, -1, 1, 1)
        p_block.conv2.weight.copy_(solve_conv_weight(p_block.conv2, hidden, conv2_target, ridge))
        kept_share = p_block.conv2.in_channels / o_block.conv2.in_channels
        _rescale_filters(p_block.conv2, p_block.bn2, o_block.conv2.weight.flatten(1).norm(dim=1) * kept_share ** 0.5)
        errors.append({"block": index, "relative_error_before": before,
                       "relative_error_after": relative_error(lambda x: _block_sum(p_block, x), p_in, target,
                                                               batch_size)})
    classifier_images = images if classifier_images is None else classifier_images
    errors.append({"classifier": True, **refit_classifier(pruned, original, classifier_images, ridge, batch_size)})
    return errors


@torch.no_grad()
def block_errors(pruned: CifarResNet, original: CifarResNet, images: torch.Tensor,
                 batch_size: int = 256) -> list[float]:
    """Relative squared error of each pruned block's output (before its ReLU) against the
    original's, each network fed by its own earlier blocks (as in `reconstruct`)."""
    return [relative_error(lambda x: _block_sum(p_block, x), p_in,
                            batched(lambda x: _block_sum(o_block, x), o_in, batch_size), batch_size)
            for _, p_block, o_block, p_in, o_in in _paired_blocks(pruned, original, images, batch_size)]


def refit(model: CifarResNet, original: CifarResNet, calibration: Calibration) -> list[dict]:
    """The blocks on the calibration images; the classifier on other images, four times as many:
    fit on the blocks' own images, its features would be fit to those very images."""
    return reconstruct(model, original, calibration.images(calibration.count, 0),
                       calibration.images(4 * calibration.count, 1))


IMPLEMENTATION = Implementation(config=SecondConfig, apply=apply_second, refit=refit,
                                option_fields=("allocation", "keep"), stage="clustered")
