"""Sample-based metrics of the demo: a distribution distance and k-NN precision / recall.

All functions take two sample sets as ``(N, D)`` tensors (flatten images first) and return Python floats.

    >>> d = energy_distance(generated, reference)          # >= 0; near 0 for samples of one distribution
    >>> p, r = knn_precision_recall(generated, reference)  # in [0, 1]; 1 = every sample on the other's manifold
"""

from __future__ import annotations

import torch

__all__ = ["energy_distance", "sliced_wasserstein2", "knn_precision_recall"]


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two (N, D) sample sets with the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("each sample set needs at least two samples")
    return x.double(), y.double()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance between the empirical distributions of two sample sets, float64.

    ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Euclidean norms, Szekely's D^2) with every expectation a
    mean over all pairs, the pairs of a sample with itself included (a V-statistic). It is >= 0 and
    0 only for identical sets; two independent sets from one distribution score a small positive
    floor that shrinks as 1/N, which is what a method's score should be compared with.

    Args:
        x: (N, D) samples; y: (M, D) samples.
    """
    x, y = _check_pair(x, y)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance: the root mean over random unit directions of the 1-D W2^2.

    The 1-D W2 between the projected sets is computed from their quantiles at N = max(len(x), len(y))
    levels. Directions come from a private generator seeded by ``seed`` (deterministic).

    Args:
        x: (N, D) samples; y: (M, D) samples.
    """
    x, y = _check_pair(x, y)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, py = x @ dirs, y @ dirs
    n = max(px.shape[0], py.shape[0])
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    qx = torch.quantile(px, q, dim=0)
    qy = torch.quantile(py, q, dim=0)
    return float(((qx - qy) ** 2).mean().sqrt())


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
        generated: (N, D); reference: (M, D); k: neighbourhood size (k < N and k < M).
    """
    g, r = _check_pair(generated, reference)
    if not 1 <= k < min(g.shape[0], r.shape[0]):
        raise ValueError(f"k must lie in [1, min(N, M)), got k={k} for N={g.shape[0]}, M={r.shape[0]}")
    r_radii = _knn_radii(r, k)
    g_radii = _knn_radii(g, k)
    d = torch.cdist(g, r)  # (N, M)
    precision = (d <= r_radii[None, :]).any(dim=1).double().mean()
    recall = (d <= g_radii[:, None]).any(dim=0).double().mean()
    return float(precision), float(recall)
