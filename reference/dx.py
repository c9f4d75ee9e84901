"""DX policy velocity (piecewise-linear or polynomial x0 over the segment), docs/design.md#dx-policy.

Shapes: grid (B, N, C, *S); x, x_src (B, C, *S); sigmas floats, 0-d or (B,) tensors.
"""

import torch

from ._util import per_sample
from .timesteps import unwarp

EPS = 1e-4


def dx_velocity(x, sigma, grid, x_src, sigma_src, segment_size=1.0, shift=1.0, mode="grid", eps=EPS):
    """u(x, sigma) of the DX policy built at (x_src, sigma_src).

    Implements [eq:dx-segment], [eq:dx-grid], [eq:dx-polynomial] and [eq:dx-velocity] (docs/design.md#dx-policy).
    """
    n_points = grid.shape[1]
    s = per_sample(sigma, x)
    s_src = per_sample(sigma_src, x)
    x0_points = x_src.unsqueeze(1) - s_src.unsqueeze(1) * grid  # (B, N, C, *S)

    r_src = unwarp(s_src, shift)
    r_dst = (r_src - segment_size).clamp(min=0)
    seg = (r_src - r_dst).clamp(min=eps)
    r = unwarp(s, shift)

    if mode == "grid":
        if n_points == 1:
            x0 = x0_points[:, 0]
        else:
            p = ((r - r_dst) / seg).clamp(0, 1) * (n_points - 1)  # (B, 1, *1)
            x0 = torch.zeros_like(x)
            for b in range(x.shape[0]):
                p_b = float(p[b].reshape(()))
                i0 = min(int(p_b // 1), n_points - 2)  # floor, the last interval closed on the right
                frac = p_b - i0
                x0[b] = (1 - frac) * x0_points[b, i0] + frac * x0_points[b, i0 + 1]
    elif mode == "polynomial":
        diff = r_src - r  # (B, 1, *1)
        x0 = sum(diff**n * x0_points[:, n] for n in range(n_points))
    else:
        raise ValueError(f"unknown DX mode {mode!r}")
    return (x - x0) / s.clamp(min=eps)
