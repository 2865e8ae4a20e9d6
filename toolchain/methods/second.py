"""Method second: each residual block's first conv keeps one filter per cluster of its filters.

Per block: cluster the rows [filter, bias] of conv1 with BN1 folded in, with K-Means; keep one
filter per cluster (by default its medoid, the member closest to the centroid: an original
feature, which reconstructs better than the centroid), back at the raw scale with BN1 keeping
its scale, and give conv2 one input channel per cluster: the **sum** of its members' input
slices (exact when the members are identical).
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

from ..clustering import clusters_for, kmeans
from ..errors import ConfigError
from ..least_squares import batched, relative_error, solve_conv_weight
from ..models import BasicBlock, CifarResNet, bn_scale


KEEP = ("centroid", "medoid", "largest")


@dataclass
class SecondConfig:
    ratio: float = 0.5
    seed: int = 0
    n_init: int = 4
    round_to: int = 1  # round each kept width up to a multiple of this (CPU channel blocks)
    # What stands for a cluster in conv1: its centroid (mean of the members), its medoid (the member
    # closest to the centroid) or its largest member (L1 norm). A member keeps an original feature.
    keep: str = "medoid"

    def __post_init__(self):
        clusters_for(1, self.ratio)  # validates the ratio
        if self.keep not in KEEP:
            raise ConfigError(f"keep must be one of {', '.join(KEEP)}, got {self.keep!r}")
        if self.round_to < 1:
            raise ConfigError(f"round_to must be 1 or more, got {self.round_to}")


def cpu_channel_block() -> int:
    """Channels per block of ONNX Runtime's CPU convolutions: 16 with AVX-512, 8 with AVX2."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return 1
    if " avx512f" in flags:
        return 16
    return 8 if " avx2" in flags else 1


def kept_width(filters: int, ratio: float, round_to: int) -> int:
    k = clusters_for(filters, ratio)
    return min(filters, math.ceil(k / round_to) * round_to)


def _folded_conv1(block: BasicBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1 with BN1 folded in: (weight, bias) of the pre-ReLU output."""
    bn = block.bn1
    scale = bn_scale(bn)
    return block.conv1.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _set_affine(bn: nn.BatchNorm2d, scale: torch.Tensor, shift: torch.Tensor,
                mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> None:
    """Make `bn` compute scale * x + shift, with the given statistics (so recalibration keeps it exact)."""
    mean = torch.zeros_like(shift) if mean is None else mean
    var = torch.full_like(shift, 1 - bn.eps) if var is None else var
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.data.copy_(scale * torch.sqrt(var + bn.eps))
    bn.bias.data.copy_(scale * mean + shift)


def _picks(rows: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor, keep: str) -> torch.Tensor:
    """(clusters, filters) weights that make each cluster's representative from its members'
    rows: their mean (keep="centroid") or one member chosen by `keep` (see SecondConfig)."""
    members = F.one_hot(assignment, len(centroids)).T.to(rows.dtype)
    if keep == "centroid":
        return members / members.sum(1, keepdim=True)
    score = -(rows - centroids[assignment]).pow(2).sum(1) if keep == "medoid" else rows[:, :-1].abs().sum(1)
    chosen = torch.where(members > 0, score, -torch.inf).argmax(1)
    return F.one_hot(chosen, len(rows)).to(rows.dtype)


def _unfolding_scale(pick: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The BN1 scale each kept filter is divided by to get back to the raw scale of conv filters:
    a member's own, or the members' mean magnitude for a centroid. Clustering happens on folded
    filters, but fine-tuning needs raw ones: BN makes conv1 scale-invariant, so SGD's effective
    step on it grows as 1 / |w|^2, and folded filters (smaller here) lost 2 points of accuracy
    in the first fine-tuning epoch."""
    sign = torch.where(pick @ scale < 0, -1.0, 1.0)
    return sign * (pick @ scale.abs()).clamp_min(1e-6)


@torch.no_grad()
def shrink_block(block: BasicBlock, k: int, cfg: SecondConfig) -> tuple[BasicBlock, dict]:
    """A new block whose conv1 keeps one filter per cluster (cfg.keep) and whose conv2 sums the merged inputs."""
    weight, bias = _folded_conv1(block)
    rows = torch.cat([weight.flatten(1), bias[:, None]], 1)
    result = kmeans(rows.numpy(), k, cfg.seed, cfg.n_init)
    assignment = torch.from_numpy(result.assignment).long()
    pick = _picks(rows, assignment, torch.from_numpy(result.centroids), cfg.keep)
    kept, scale = pick @ rows, _unfolding_scale(pick, bn_scale(block.bn1))
    k = len(kept)
    new = BasicBlock(block.conv1.in_channels, block.conv2.out_channels, block.conv1.stride[0], k)
    new.conv1.weight.copy_(kept[:, :-1].view(k, *weight.shape[1:]) / scale.view(-1, 1, 1, 1))
    _set_affine(new.bn1, scale, kept[:, -1])
    merge = F.one_hot(assignment, k).to(weight.dtype)  # (filters, k): member -> cluster
    new.conv2.weight.copy_(torch.einsum("oikl,ij->ojkl", block.conv2.weight, merge))
    new.bn2.load_state_dict(block.bn2.state_dict())
    new.shortcut = copy.deepcopy(block.shortcut)
    new.train(block.training)
    return new, {"filters": block.conv1.out_channels, "kept": k, "inertia": result.inertia}


def apply_second(model: CifarResNet, cfg: SecondConfig) -> tuple[CifarResNet, dict]:
    """Shrink every block of a copy of `model`; returns it and a record per block."""
    model = copy.deepcopy(model).eval()
    blocks = []
    for stage in (model.layer1, model.layer2, model.layer3):
        for i, block in enumerate(stage):
            k = kept_width(block.conv1.out_channels, cfg.ratio, cfg.round_to)
            stage[i], record = shrink_block(block, k, cfg)
            blocks.append(record)
    return model, {"blocks": blocks, "inner_widths": model.inner_widths(), "keep": cfg.keep}


def _stem(model: CifarResNet, x: torch.Tensor) -> torch.Tensor:
    return F.relu(model.bn1(model.conv1(x)))


def _conv2_input(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    return F.relu(block.bn1(block.conv1(x)))


def _paired_blocks(pruned: CifarResNet, original: CifarResNet, images: torch.Tensor, batch_size: int):
    """(index, pruned block, original block, its input, the original's input) in network order,
    each network fed by its own earlier blocks. The next inputs are computed after the caller
    is done with a pair, so a block refit in between feeds the blocks after it."""
    pruned.eval()
    original.eval()
    p_in = batched(lambda x: _stem(pruned, x), images, batch_size)
    o_in = batched(lambda x: _stem(original, x), images, batch_size)
    for index, (p_block, o_block) in enumerate(zip(pruned.blocks(), original.blocks())):
        yield index, p_block, o_block, p_in, o_in
        p_in = batched(p_block, p_in, batch_size)
        o_in = batched(o_block, o_in, batch_size)


def _conv2_target(block: BasicBlock, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return batched(lambda v: block.conv2(_conv2_input(block, v)), x, batch_size)


@torch.no_grad()
def reconstruct(pruned: CifarResNet, original: CifarResNet, images: torch.Tensor,
                ridge: float = 1e-3, batch_size: int = 256) -> list[dict]:
    """Refit each block's conv2 by ridge least squares, block by block in network order.

    Features: the pruned block's conv2 input, computed from the pruned network's own block
    input (so earlier blocks' errors are corrected too). Target: the original block's conv2
    output on the original network's block input. BN1 statistics are set from the same images.
    Returns the relative squared error of each block's conv2 output before and after.
    """
    errors = []
    for index, p_block, o_block, p_in, o_in in _paired_blocks(pruned, original, images, batch_size):
        scale = bn_scale(p_block.bn1)  # BN1 computes scale * conv1 output + shift
        shift = p_block.bn1.bias - p_block.bn1.running_mean * scale
        z = batched(p_block.conv1, p_in, batch_size)
        stats = z.transpose(0, 1).flatten(1)
        _set_affine(p_block.bn1, scale, shift, stats.mean(1), stats.var(1))  # same function, real statistics
        hidden = F.relu(p_block.bn1(z))
        target = _conv2_target(o_block, o_in, batch_size)
        before = relative_error(p_block.conv2, hidden, target, batch_size)
        p_block.conv2.weight.copy_(solve_conv_weight(p_block.conv2, hidden, target, ridge, batch_size))
        errors.append({"block": index, "relative_error_before": before,
                       "relative_error_after": relative_error(p_block.conv2, hidden, target, batch_size)})
    return errors


@torch.no_grad()
def block_errors(pruned: CifarResNet, original: CifarResNet, images: torch.Tensor,
                 batch_size: int = 256) -> list[float]:
    """Relative squared error of each pruned block's conv2 output against the original's,
    each network fed by its own earlier blocks (as in `reconstruct`)."""
    return [relative_error(p_block.conv2, batched(lambda x: _conv2_input(p_block, x), p_in, batch_size),
                           _conv2_target(o_block, o_in, batch_size), batch_size)
            for _, p_block, o_block, p_in, o_in in _paired_blocks(pruned, original, images, batch_size)]
