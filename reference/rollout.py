"""Policy rollout: uniform substeps in raw time, per-sample substep counts (docs/design.md#rollout)."""

import torch

from .timesteps import unwarp, warp

# raw-time slack of the ceil rule: a product within it above an integer counts as that integer (float rounding)
CEIL_TOL = 1e-5


def num_substeps(delta, total_substeps, substep_rule="ceil"):
    """Substep counts of raw-time lengths ``delta`` (a tensor): [eq:substeps].

    "ceil" (LakonLab v0.2.0): max(1, ceil((delta - 1e-5) * total_substeps));
    "round" (earlier versions): max(1, round(delta * total_substeps)), half to even.
    """
    if substep_rule == "ceil":
        return torch.ceil((delta - CEIL_TOL) * total_substeps).clamp(min=1).long()
    if substep_rule == "round":
        return torch.round(delta * total_substeps).clamp(min=1).long()
    raise ValueError(f"substep_rule must be 'ceil' or 'round', got {substep_rule!r}")


def rollout(velocity_fn, x_start, sigma_start, sigma_end, total_substeps=128, shift=1.0, substep_rule="ceil"):
    """Integrate dx/dsigma = velocity_fn(x, sigma) from sigma_start to sigma_end with Euler substeps.

    ``velocity_fn(x, sigma)`` takes sigma as a (B,) tensor. Sample b takes n_b = num_substeps(r_start - r_end)
    substeps of raw size (r_start - r_end) / n_b; samples with fewer substeps stop early. Literal loop.
    Implements [eq:substeps] and [eq:rollout] (docs/design.md#rollout).
    """
    batch = x_start.shape[0]
    dtype, device = x_start.dtype, x_start.device
    sigma_start = torch.as_tensor(sigma_start, dtype=dtype, device=device).expand(batch)
    sigma_end = torch.as_tensor(sigma_end, dtype=dtype, device=device).expand(batch)
    r_start, r_end = unwarp(sigma_start, shift), unwarp(sigma_end, shift)
    n_substeps = num_substeps(r_start - r_end, total_substeps, substep_rule)
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
