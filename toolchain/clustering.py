"""K-Means over convolution filters, and how many clusters each layer gets.

A filter is flattened to a vector. With `weights`, K-Means minimises the weighted
error sum_c w_c ||f_c - centroid||^2; method first passes the square of the
following BatchNorm's scale, because that is how the error reaches the output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from .errors import ConfigError


def clusters_for(filters: int, ratio: float) -> int:
    """k = max(1, round(filters x (1 - ratio))): the original work's ratio is the share removed."""
    if not 0 < ratio < 1:
        raise ConfigError(f"ratio must be between 0 and 1 (exclusive), got {ratio}")
    return max(1, min(filters, round(filters * (1 - ratio))))


@dataclass
class Clustering:
    centroids: np.ndarray  # (k, d): weighted means of the members
    assignment: np.ndarray  # (n,) int, cluster of each vector
    inertia: float  # weighted squared error of replacing each vector by its centroid


def kmeans(vectors: np.ndarray, k: int, seed: int = 0, n_init: int = 4,
           weights: np.ndarray | None = None) -> Clustering:
    """Seeded K-Means (k-means++ init, best of n_init runs), deterministic for a seed."""
    n = len(vectors)
    if not 1 <= k <= n:
        raise ConfigError(f"cannot make {k} clusters of {n} filters")
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if k == n:
        labels = np.arange(n)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate filters: fewer distinct points than k
            labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(
                vectors.astype(np.float64), sample_weight=weights).labels_
        labels = _relabel(labels)
    centroids = np.stack([np.average(vectors[labels == j], axis=0, weights=weights[labels == j] + 1e-12)
                          for j in range(labels.max() + 1)])
    inertia = float((weights * ((vectors - centroids[labels]) ** 2).sum(1)).sum())
    return Clustering(centroids.astype(vectors.dtype), labels, inertia)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Number clusters 0..k-1 in order of first appearance, dropping empty ones."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse]


def error_curve(vectors: np.ndarray, weights: np.ndarray | None, seed: int = 0, n_init: int = 2) -> np.ndarray:
    """Clustering error for every k = 1..n (index k-1)."""
    return np.array([kmeans(vectors, k, seed, n_init, weights).inertia for k in range(1, len(vectors) + 1)])


def allocate_budget(curves: list[np.ndarray], costs: list[int], budget: int) -> list[int]:
    """Per-layer k minimising total error with sum(k_i * cost_i) <= budget (greedy on marginal gain).

    Every layer keeps at least one centroid; then the next centroid goes where it lowers the
    error most per parameter it costs.
    """
    ks = [1] * len(curves)
    spent = sum(costs)
    while True:
        best, best_gain = None, 0.0
        for i, (curve, cost) in enumerate(zip(curves, costs)):
            if ks[i] < len(curve) and spent + cost <= budget:
                gain = (curve[ks[i] - 1] - curve[ks[i]]) / cost
                if best is None or gain > best_gain:
                    best, best_gain = i, gain
        if best is None:
            return ks
        ks[best] += 1
        spent += costs[best]
