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

    x0 is linear in the grid's x0 points x0_n = x_src - s_src grid_n, so every Euler substep
    x <- x + (x - x0) g, g = (s_next - s) / s, keeps x affine in x_start and the x0_n:
    x = alpha x_start + sum_n beta_n x0_n with alpha <- alpha (1 + g), beta_n <- beta_n (1 + g) - g w_n.
    The coefficients of all substeps are computed at once, per sample, in float64 (tiny: (T, B, N));
    the (B, N, C, L) grid is then read once, as the Triton kernel does.
    """
    sigmas = torch.stack(sigma_table(sigma_start, n_substeps, substep_size, r_start, shift)).double()  # (T + 1, B)
    s, s_next = sigmas[:-1], sigmas[1:]
    n_points = grid.shape[1]
    t, b = s.shape
    w = dx_weights(
        s.reshape(-1), n_points, r_src.double().repeat(t), r_dst.double().repeat(t), seg.double().repeat(t),
        policy_shift, polynomial,
    ).reshape(t, b, n_points)  # fmt: skip
    g = (s_next - s) / s.clamp(min=EPS)  # (T, B); a finished sample has g = 0
    growth = 1.0 + g
    # later[t] = prod over the substeps after t of (1 + g): suffix products, no division
    later = torch.cat([torch.flip(torch.cumprod(torch.flip(growth[1:], [0]), 0), [0]), torch.ones_like(growth[:1])])
    alpha = torch.prod(growth, 0)  # (B,)
    beta = -(g * later)[:, :, None].mul(w).sum(0)  # (B, N)
    ssf = sigma_src.double()
    coef_x, coef_xs, coef_grid = alpha.float(), beta.sum(1).float(), (-ssf[:, None] * beta).float()
    out = coef_x[:, None, None] * x_start.float() + coef_xs[:, None, None] * x_src.float()
    out = out + torch.einsum("bn,bncl->bcl", coef_grid, grid.float())
    return out.to(x_start.dtype)
