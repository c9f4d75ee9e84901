"""DX policy ops on plain PyTorch (the "torch" backend), any device.

At raw time r the policy's x0 is a weighted sum of the grid's x0 points, x0_n = x_src - s_src * grid_n
(docs/design.md, [eq:dx-velocity]):
    x0 = (sum_n w_n) x_src - s_src * sum_n w_n grid_n
evaluated as x - x0 = (x - x_src) - (sum_n w_n - 1) x_src + s_src * sum_n w_n grid_n, so that a tiny sigma_src
does not turn the rounding of x0 into a velocity error,
with hat weights w_n = max(0, 1 - |p - n|), p = clamp((r - r_dst) / seg, 0, 1) * (N - 1) (linear
interpolation between floor(p) and floor(p) + 1), or w_n = (r_src - r)^n in polynomial mode
([eq:dx-polynomial]).

    >>> u = dx_velocity_torch(x, sigma, DXTensors(grid, x_src, sigma_src, DXSegment(r_src, r_dst, seg, 1.0, False, 1.0)))
"""

from __future__ import annotations

import torch

from piflow_kernels.constants import DX_EPS
from piflow_kernels.ops.records import DXSegment, DXTensors, RolloutPlan
from piflow_kernels.timesteps import sigma_table


def dx_weights(sigma: torch.Tensor, n_points: int, segment: DXSegment) -> torch.Tensor:
    """Interpolation weights (B, N) of the grid's x0 points at noise level sigma (B,) (any float dtype)."""
    r_src, r_dst, seg, shift, polynomial = segment.kernel_args
    r = sigma / (shift + (1.0 - shift) * sigma)
    n = torch.arange(n_points, device=sigma.device, dtype=torch.float32)
    if polynomial:
        return (r_src - r)[:, None] ** n
    if n_points == 1:
        return torch.ones_like(sigma)[:, None]
    p = ((r - r_dst) / seg).clamp(0.0, 1.0) * (n_points - 1)
    return (1.0 - (p[:, None] - n).abs()).clamp(min=0.0)


def _float_segment(segment: DXSegment, dtype: torch.dtype) -> DXSegment:
    return segment._replace(r_src=segment.r_src.to(dtype), r_dst=segment.r_dst.to(dtype), seg=segment.seg.to(dtype))


def dx_velocity_torch(x: torch.Tensor, sigma: torch.Tensor, policy: DXTensors) -> torch.Tensor:
    """DX velocity u(x, sigma), differentiable w.r.t. grid, x, x_src.

    Args:
        x: (B, C, L) any float dtype; sigma: (B,) float32; policy: the flat DX policy.
    Returns:
        u (B, C, L) in x.dtype, computed in float32.
    """
    grid, x_src, sigma_src, segment = policy
    s = sigma.float()
    w = dx_weights(s, grid.shape[1], _float_segment(segment, torch.float32))
    xs = x_src.float()
    # x - x0 = (x - x_src) - (sum_n w_n - 1) x_src + s_src sum_n w_n grid_n, formed in that order: x0 itself is
    # within a rounding of x_src when sigma_src is tiny, and (x - x0) / sigma would then carry that rounding
    # divided by sigma. The hat weights sum to exactly 1; the polynomial ones to 1 + sum_{n >= 1} (r_src - r)^n.
    d = x.float() - xs
    if segment.polynomial and grid.shape[1] > 1:
        d = d - w[:, 1:].sum(1)[:, None, None] * xs
    d = d + sigma_src.float()[:, None, None] * torch.einsum("bn,bncl->bcl", w, grid.float())
    return (d / s.clamp(min=DX_EPS)[:, None, None]).to(x.dtype)


@torch.no_grad()
def dx_rollout_torch(x_start: torch.Tensor, policy: DXTensors, plan: RolloutPlan) -> torch.Tensor:
    """Whole DX rollout ([eq:rollout]) in closed form. Returns x_end (B, C, L) in x_start.dtype.

    x0 is linear in the grid's x0 points x0_n = x_src - s_src grid_n, so every Euler substep
    x <- x + (x - x0) g, g = (s_next - s) / s, keeps x affine in x_start and the x0_n:
    x = alpha x_start + sum_n beta_n x0_n with alpha <- alpha (1 + g), beta_n <- beta_n (1 + g) - g w_n.
    The coefficients of all substeps are computed at once, per sample, in float64 (tiny: (T, B, N));
    the (B, N, C, L) grid is then read once, as the Triton kernel does.
    """
    grid, x_src, sigma_src, segment = policy
    sigmas = torch.stack(sigma_table(*plan.kernel_args)).double()  # (T + 1, B)
    s, s_next = sigmas[:-1], sigmas[1:]
    n_points = grid.shape[1]
    t, b = s.shape
    seg64 = _float_segment(segment, torch.float64)
    repeated = seg64._replace(r_src=seg64.r_src.repeat(t), r_dst=seg64.r_dst.repeat(t), seg=seg64.seg.repeat(t))
    w = dx_weights(s.reshape(-1), n_points, repeated).reshape(t, b, n_points)
    g = (s_next - s) / s.clamp(min=DX_EPS)  # (T, B); a finished sample has g = 0
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


__all__ = ["dx_rollout_torch", "dx_velocity_torch", "dx_weights"]
