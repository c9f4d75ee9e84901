"""Policy rollout: uniform substeps in raw time, per-sample substep counts (docs/design.md#rollout)."""

import torch

from .timesteps import unwarp, warp


def rollout(velocity_fn, x_start, sigma_start, sigma_end, total_substeps=128, shift=1.0):
    """Integrate dx/dsigma = velocity_fn(x, sigma) from sigma_start to sigma_end with Euler substeps.

    ``velocity_fn(x, sigma)`` takes sigma as a (B,) tensor. Sample b takes
    n_b = max(1, round((r_start - r_end) * total_substeps)) substeps of raw size (r_start - r_end) / n_b;
    samples with fewer substeps stop early. Literal loop, one sample at a time.
    Implements [eq:substeps] and [eq:rollout] (docs/design.md#rollout); LakonLab v0.2.0 counts substeps with
    ceil instead of round (see there).
    """
    batch = x_start.shape[0]
    dtype, device = x_start.dtype, x_start.device
    sigma_start = torch.as_tensor(sigma_start, dtype=dtype, device=device).expand(batch)
    sigma_end = torch.as_tensor(sigma_end, dtype=dtype, device=device).expand(batch)
    r_start, r_end = unwarp(sigma_start, shift), unwarp(sigma_end, shift)
    n_substeps = torch.round((r_start - r_end) * total_substeps).clamp(min=1).long()
    h = (r_start - r_end) / n_substeps

    x = x_start.clone()
    r = r_start.clone()
    s = sigma_start.clone()
    for step in range(int(n_substeps.max())):
        active = n_substeps > step
        u = velocity_fn(x, s)
        r_next = (r - h).clamp(min=0)
        s_next = warp(r_next, shift)
        x_next = x + u * (s_next - s).reshape(batch, *([1] * (x.dim() - 1)))
        mask = active.reshape(batch, *([1] * (x.dim() - 1)))
        x = torch.where(mask, x_next, x)
        s = torch.where(active, s_next, s)
        r = torch.where(active, r_next, r)
    return x
