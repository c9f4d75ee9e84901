"""DX policy ops, CPU twin ("torch" backend).

Flat layout: x, x_src (B, C, L); grid (B, N, C, L) velocities at N points; per-sample float32 (B,)
tensors r_src = unwarp(sigma_src), r_dst = max(r_src - segment_size, 0), seg = max(r_src - r_dst, 1e-4),
all under the policy's own shift.

x0 at raw time r is a weighted sum of the grid's x0 points, x0_n = x_src - s_src * grid_n, so
    x0 = (sum_n w_n) x_src - s_src * sum_n w_n grid_n
with hat weights w_n = max(0, 1 - |p - n|), p = clamp((r - r_dst) / seg, 0, 1) * (N - 1) (linear
interpolation between floor(p) and floor(p) + 1), or w_n = (r_src - r)^n in polynomial mode.
"""

from __future__ import annotations

import torch

from piflow_kernels.timesteps import sigma_table

EPS = 1e-4


def dx_weights(
    sigma: torch.Tensor,
    n_points: int,
    r_src: torch.Tensor,
    r_dst: torch.Tensor,
    seg: torch.Tensor,
    shift: float,
    polynomial: bool,
) -> torch.Tensor:
    """Interpolation weights (B, N) of the grid's x0 points at noise level sigma (B,)."""
    r = sigma / (shift + (1.0 - shift) * sigma)
    n = torch.arange(n_points, device=sigma.device, dtype=torch.float32)
    if polynomial:
        return (r_src - r)[:, None] ** n
    if n_points == 1:
        return torch.ones_like(sigma)[:, None]
    p = ((r - r_dst) / seg).clamp(0.0, 1.0) * (n_points - 1)
    return (1.0 - (p[:, None] - n).abs()).clamp(min=0.0)


def _dx_x0(w, grid, x_src, sigma_src):
    return w.sum(1)[:, None, None] * x_src - sigma_src[:, None, None] * torch.einsum("bn,bncl->bcl", w, grid)


def dx_velocity_torch(
    x: torch.Tensor,
    sigma: torch.Tensor,
    grid: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    r_src: torch.Tensor,
    r_dst: torch.Tensor,
    seg: torch.Tensor,
    shift: float,
    polynomial: bool,
) -> torch.Tensor:
    """DX velocity u(x, sigma), differentiable w.r.t. grid, x, x_src. Returns (B, C, L) in x.dtype."""
    s = sigma.float()
    w = dx_weights(s, grid.shape[1], r_src.float(), r_dst.float(), seg.float(), shift, polynomial)
    xf = x.float()
    x0 = _dx_x0(w, grid.float(), x_src.float(), sigma_src.float())
    return ((xf - x0) / s.clamp(min=EPS)[:, None, None]).to(x.dtype)


@torch.no_grad()
def dx_rollout_torch(
    x_start: torch.Tensor,
    grid: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    r_src: torch.Tensor,
    r_dst: torch.Tensor,
    seg: torch.Tensor,
    policy_shift: float,
    polynomial: bool,
    sigma_start: torch.Tensor,
    n_substeps: torch.Tensor,
    substep_size: torch.Tensor,
    r_start: torch.Tensor,
    shift: float,
) -> torch.Tensor:
    """Whole DX rollout. Returns x_end (B, C, L) in x_start.dtype.

    x0 is linear in the grid, so each substep costs one (N)-weighted sum: x += (x - x0) / s * ds.
    """
    gridf, xsf, ssf = grid.float(), x_src.float(), sigma_src.float()
    x = x_start.float().clone()
    sigmas = sigma_table(sigma_start, n_substeps, substep_size, r_start, shift)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        w = dx_weights(s, grid.shape[1], r_src.float(), r_dst.float(), seg.float(), policy_shift, polynomial)
        x0 = _dx_x0(w, gridf, xsf, ssf)
        u = (x - x0) / s.clamp(min=EPS)[:, None, None]
        x = x + u * (s_next - s)[:, None, None]
    return x.to(x_start.dtype)
