"""The convs a method compresses, the BatchNorm after each, and how to walk them in network order.

Shared by method first's two granularities (filters, kernels).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..least_squares import batched, block_inputs, capture
from ..models import CifarResNet, bn_scale, rescale_bn_input


def bn_after(modules: dict, name: str) -> nn.BatchNorm2d | None:
    parent, _, leaf = name.rpartition(".")
    return modules.get((parent + "." if parent else "") + leaf.replace("conv", "bn"))


def clusterable_convs(model: nn.Module, layers=None) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """(name, conv, the BatchNorm right after it) for each conv to cluster, in network order."""
    modules = dict(model.named_modules())
    return [(name, m, bn_after(modules, name)) for name, m in modules.items()
            if isinstance(m, nn.Conv2d) and (layers is None or name in layers)]


def bn_scale_of(bn: nn.BatchNorm2d) -> np.ndarray:
    return bn_scale(bn).detach().numpy().astype(np.float64)


def clustering_inputs(filters: np.ndarray, bn: nn.BatchNorm2d | None, features: str):
    """(vectors, weights) K-Means runs on, from a conv's filters (out, in * kh * kw): the error each
    filter's approximation adds at the BN output."""
    if features == "raw" or bn is None:
        return filters, np.ones(len(filters))
    if features == "bn-weighted":
        return filters, bn_scale_of(bn) ** 2 + 1e-12
    # scaled: filter i becomes s_i * centroid, and s_i moves into the BN after the conv
    # (a per-channel affine the file keeps anyway), so only directions need to cluster.
    norms = np.linalg.norm(filters, axis=1, keepdims=True).clip(1e-12)
    return filters / norms, (bn_scale_of(bn) * norms[:, 0]) ** 2 + 1e-12


@torch.no_grad()
def fold_filter_scales(conv: nn.Conv2d, bn: nn.BatchNorm2d, centroids: np.ndarray, assignment: np.ndarray):
    """Least-squares scale s_i of each filter on its centroid, moved into BN: BN'(z) == BN(s*z).

    The running statistics move with the scale (mean / s, variance / s^2), so the BN keeps the
    function in eval mode, in train mode (batch statistics) and after a plain recalibration."""
    vectors = conv.weight.detach().flatten(1).numpy().astype(np.float64)
    c = centroids[assignment].astype(np.float64)
    s = (vectors * c).sum(1) / (c * c).sum(1).clip(1e-12)
    s = np.where(np.abs(s) < 1e-6, 1e-6, s)  # a dead filter keeps a tiny, invertible scale
    s = torch.from_numpy(s).to(bn.weight.dtype)
    rescale_bn_input(bn, 1 / s)  # the conv now outputs z = (s * z) / s


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def output_scale(bn: nn.BatchNorm2d | None, channels: int) -> torch.Tensor:
    """How a conv output channel is scaled on its way through the BN after it (eval mode)."""
    return torch.ones(channels) if bn is None else bn_scale(bn)


def conv_inputs(model: CifarResNet, images: torch.Tensor, batch_size: int):
    """(name, conv, its input) for every conv of a CIFAR ResNet in network order, each input
    computed by the model as it is when the caller gets there (see `block_inputs`), so a conv
    refit in between feeds the convs after it."""
    yield "conv1", model.conv1, images
    for name, block, x in block_inputs(model, images, batch_size):
        yield f"{name}.conv1", block.conv1, x
        yield f"{name}.conv2", block.conv2, batched(block.hidden, x, batch_size)


def conv_targets(model: CifarResNet, original: CifarResNet, names: list[str], images: torch.Tensor, batch_size: int):
    """(name, conv, its input, the original conv's output, a, a_new) for each named conv, in network
    order (inputs as in `conv_inputs`); a and a_new: how each output channel is scaled by the BN
    after the conv in the original and in the model, read when the caller gets there."""
    modules, source = dict(model.named_modules()), dict(original.named_modules())
    targets = dict(zip(names, capture(original, [source[name] for name in names], images, "output", batch_size)))
    for name, conv, x in conv_inputs(model, images, batch_size):
        if name in targets:
            yield (name, conv, x, targets.pop(name), output_scale(bn_after(source, name), conv.out_channels),
                   output_scale(bn_after(modules, name), conv.out_channels))
    if targets:
        raise ValueError(f"the refit walks a CIFAR ResNet's convs and never reached {', '.join(targets)}")
