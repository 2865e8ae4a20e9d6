"""The size peer of method first at kernel granularity: weight clustering as TensorFlow Model
Optimization does it (`tfmot.clustering.keras.cluster_weights`).

Every weight of a conv becomes one of the layer's `clusters` scalar values (16: a 4-bit index per
weight). Fine-tuning works as TFMOT's wrapper does: the original weights stay as trainable shadow
weights, each forward pass (in training) assigns every weight to its nearest value, and the
gradient reaches both the values (averaged over a value's weights: TFMOT's `GradientAggregation.AVG`,
not its default sum, which diverges under SGD) and, straight through, the shadow weights
(`shared_tables.through_shadow`); `strip` then drops the shadow weights and keeps the last assignment. The file holds a
16-value table and 4-bit indices per conv, rebuilt by Cast + Gather + Reshape, which ONNX Runtime
folds at load. Unlike TFMOT, the values start from a full K-Means (TFMOT stops at the k-means++
seeding), and the BatchNorm statistics are recalibrated as for every method here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from ..clustering import kmeans
from ..errors import ConfigError
from . import Implementation
from .convs import clusterable_convs, set_module
from .shared_tables import nearest_rows, through_shadow


@dataclass
class WeightClusteringConfig:
    seed: int = settings.SEED
    n_init: int = 4
    clusters: int = settings.WEIGHT_CLUSTERS  # values per layer; at most 16, so that an index fits 4 bits

    def __post_init__(self):
        if isinstance(self.clusters, bool) or not isinstance(self.clusters, int) or not 2 <= self.clusters <= 16:
            raise ConfigError(f"weight clustering keeps 2 to 16 values per layer (a 4-bit index), got {self.clusters!r}")

    @property
    def label(self) -> str:
        """What names this config's files in place of a ratio, which it does not have."""
        return f"c{self.clusters}"


class ClusteredConv2d(nn.Module):
    """A bias-free Conv2d whose every weight is one of `values`, picked by a fixed-size `index`."""

    def __init__(self, conv: nn.Conv2d, values: torch.Tensor, index: torch.Tensor):
        super().__init__()
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, attr, getattr(conv, attr))
        self.shape = tuple(conv.weight.shape)
        self.values = nn.Parameter(values.clone().float())
        self.shadow = nn.Parameter(conv.weight.detach().clone())  # TFMOT's original weights; None once stripped
        self.register_buffer("index", index.flatten().to(torch.uint8))  # 0..15: stored as 4 bits

    @property
    def weight(self) -> torch.Tensor:
        if self.training and self.shadow is not None:
            # every weight to its nearest value, as TFMOT does at each step
            self.index.copy_(nearest_rows(self.shadow.flatten(), self.values))
            return through_shadow([(self.values, self.index.long())], self.shadow.flatten()).view(self.shape)
        return self.values.index_select(0, self.index.int()).view(self.shape)  # Gather wants int32/int64

    def forward(self, x):
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, values={len(self.values)}"


@torch.no_grad()
def apply_weight_clustering(model: nn.Module, cfg: WeightClusteringConfig) -> tuple[nn.Module, dict]:
    """Cluster each conv's weights of a copy of `model` into cfg.clusters values; returns it and a record per layer."""
    model = copy.deepcopy(model)
    layers = []
    for name, conv, _ in clusterable_convs(model):
        weights = conv.weight.detach().numpy().astype(np.float64).reshape(-1, 1)
        result = kmeans(weights, min(cfg.clusters, len(weights)), cfg.seed, cfg.n_init)
        set_module(model, name, ClusteredConv2d(conv, torch.from_numpy(result.centroids[:, 0]),
                                                torch.from_numpy(result.assignment)))
        layers.append({"layer": name, "weights": len(weights), "values": len(result.centroids),
                       "inertia": result.inertia})
    if not layers:
        raise ValueError("no convolution layer to cluster")
    return model, {"layers": layers, "weight_clustering": {"clusters": cfg.clusters, "n_init": cfg.n_init}}


def clustered_convs(model: nn.Module) -> list[tuple[str, ClusteredConv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ClusteredConv2d)]


def strip(model: nn.Module) -> None:
    """Drop the shadow weights (TFMOT's strip_clustering): the model keeps its values and last assignment."""
    for _, conv in clustered_convs(model):
        conv.shadow = None


def four_bit_indices(model: nn.Module) -> tuple[str, ...]:
    """The index buffers, which the file stores as UINT4."""
    return tuple(f"{name}.index" for name, _ in clustered_convs(model))


IMPLEMENTATION = Implementation(
    config=WeightClusteringConfig, apply=apply_weight_clustering, stage="clustered", shared_weights=True,
    strip=strip, four_bit=four_bit_indices)
