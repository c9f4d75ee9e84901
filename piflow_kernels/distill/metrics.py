"""Sample-based metrics between generated and reference sample sets (the trainer's evaluation and the demo's table).

Every function takes two sample sets of shape ``(N, ...)`` (flattened to ``(N, D)`` here), computes in
float64 and returns Python floats: they run at evaluation time, never in a training step.

    >>> d = energy_distance(generated, reference)          # >= 0; near 0 for samples of one distribution
    >>> w = sliced_w2(generated, reference)                # >= 0, in the units of the data
    >>> p, r = knn_precision_recall(generated, reference)  # in [0, 1]; 1 = every sample on the other's manifold
"""

from __future__ import annotations

import torch

__all__ = ["energy_distance", "sliced_w2", "knn_precision_recall"]


def _flat_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, ...) and (M, ...) as float64 (N, D) and (M, D), checked to hold at least two samples of one D."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two sample sets with the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("each sample set needs at least two samples")
    return x, y


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance between the empirical distributions of two sample sets, float64.

    ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Euclidean norms, Szekely's D^2) with every expectation a
    mean over all pairs, the pairs of a sample with itself included (a V-statistic). It is >= 0 and
    0 only for identical sets; two independent sets from one distribution score a small positive
    floor that shrinks as 1/N, which is what a method's score should be compared with.

    Args:
        x: (N, ...) samples; y: (M, ...) samples of the same per-sample shape.
    """
    x, y = _flat_pair(x, y)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def sliced_w2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size sample sets, over fixed random unit directions.

    The root mean over directions of the 1-D W2^2 between the projected sets; for equal sizes the 1-D
    optimal transport pairs the sorted projections, so each 1-D distance is exact (no quantile
    interpolation). Directions come from a private generator seeded by ``seed`` (deterministic).

    Args:
        x, y: (N, ...) samples each.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_w2 needs equal sample counts, got {x.shape[0]} and {y.shape[0]}")
    x, y = _flat_pair(x, y)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64).to(x.device)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = torch.sort(x @ dirs, dim=0).values
    py = torch.sort(y @ dirs, dim=0).values
    return float(((px - py) ** 2).mean().sqrt())


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row. x (N, D) -> (N,)."""
    d = torch.cdist(x, x)
    # k + 1: the nearest "neighbour" of a point is itself at distance 0
    return d.kthvalue(k + 1, dim=1).values


def knn_precision_recall(generated: torch.Tensor, reference: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls as manifold estimates.

    precision: fraction of generated samples inside some reference sample's k-NN ball (quality).
    recall: fraction of reference samples inside some generated sample's k-NN ball (diversity).

    Args:
        generated: (N, ...); reference: (M, ...); k: neighbourhood size (k < N and k < M).
    """
    g, r = _flat_pair(generated, reference)
    if not 1 <= k < min(g.shape[0], r.shape[0]):
        raise ValueError(f"k must lie in [1, min(N, M)), got k={k} for N={g.shape[0]}, M={r.shape[0]}")
    r_radii = _knn_radii(r, k)
    g_radii = _knn_radii(g, k)
    d = torch.cdist(g, r)  # (N, M)
    precision = (d <= r_radii[None, :]).any(dim=1).double().mean()
    recall = (d <= g_radii[:, None]).any(dim=0).double().mean()
    return float(precision), float(recall)
