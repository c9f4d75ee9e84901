"""Helpers every Triton launcher shares (GM and DX)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, looked up at each launch (the tests swap in NaN-filled
    allocations, so an element a kernel never writes fails the comparison)."""
    return torch.empty(shape, dtype=dtype, device=device)


def vec(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (B,) per-sample scalar as a contiguous tensor of ``dtype`` (expanded 0-d sigmas have stride 0)."""
    return t.to(dtype).contiguous()


@torch.no_grad()
def reference_rollout(velocity: Callable, x_start: torch.Tensor, policy, plan) -> torch.Tensor:
    """[eq:rollout] literally (``piflow_kernels.reference.rollout``) over a reference velocity
    ``velocity(x, sigma, policy)``, in float32. Returns x_end (B, C, L) in x_start.dtype."""
    from piflow_kernels import reference

    def step_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return velocity(x, sigma, policy).float()

    x_end = reference.rollout(step_velocity, x_start.float(), plan.sigma_start, plan.sigma_end, plan.total_substeps,
                              plan.shift, plan.substep_rule)  # fmt: skip
    return x_end.to(x_start.dtype)


__all__ = ["alloc", "reference_rollout", "vec"]
