"""Deterministic KMeans and clustering purity in torch (used by Re-learning's diagnosis).

Every process that calls `kmeans` with the same data and seed gets the same labels: the initialisation
(k-means++) draws from a private generator, and the Lloyd iterations are plain deterministic CPU float64 math.
"""
from __future__ import annotations

import torch


def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Scale every column to [-1, 1] (a constant column becomes 0)."""
    lo, hi = x.min(0).values, x.max(0).values
    span = (hi - lo).clamp_min(1e-12)
    return 2 * (x - lo) / span - 1


def _plus_plus_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = len(x)
    centers = [x[torch.randint(n, (1,), generator=gen).item()]]
    dist = torch.cdist(x, centers[0][None]).squeeze(1).square()
    for _ in range(1, k):
        total = dist.sum()
        if total <= 0:  # fewer distinct points than clusters
            idx = torch.randint(n, (1,), generator=gen).item()
        else:
            idx = torch.multinomial(dist / total, 1, generator=gen).item()
        centers.append(x[idx])
        dist = torch.minimum(dist, torch.cdist(x, x[idx][None]).squeeze(1).square())
    return torch.stack(centers)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, n_init: int = 3, max_iter: int = 100, tol: float = 1e-6):
    """Cluster rows of x into k clusters; returns (labels [N], inertia). Best of `n_init` k-means++ runs."""
    x = x.detach().double().cpu()
    k = max(1, min(k, len(x)))
    gen = torch.Generator().manual_seed(int(seed))
    best_labels, best_inertia = None, float("inf")
    for _ in range(n_init):
        centers = _plus_plus_init(x, k, gen)
        for _ in range(max_iter):
            labels = torch.cdist(x, centers).argmin(1)
            new = centers.clone()
            for j in range(k):
                members = x[labels == j]
                if len(members):
                    new[j] = members.mean(0)
            shift = (new - centers).square().sum().item()
            centers = new
            if shift <= tol:
                break
        labels = torch.cdist(x, centers).argmin(1)
        inertia = (x - centers[labels]).square().sum().item()
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels, best_inertia


def purity(clusters: torch.Tensor, labels: torch.Tensor) -> float:
    """(1/N) sum over clusters of the count of the cluster's most frequent class."""
    if len(labels) == 0:
        return 0.0
    total = 0
    for c in clusters.unique():
        total += torch.bincount(labels[clusters == c]).max().item()
    return total / len(labels)
