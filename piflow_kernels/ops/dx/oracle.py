"""The literal reference (:mod:`piflow_kernels.reference`) as the "reference" backend of the DX ops.

Computes in float32 on the flat layout (the reference itself is dtype-agnostic). Slow by design.
"""

from __future__ import annotations

import torch

from piflow_kernels import reference
from piflow_kernels.ops.records import DXTensors, RolloutPlan
from piflow_kernels.ops.utils import reference_rollout


def dx_velocity_reference(x: torch.Tensor, sigma: torch.Tensor, policy: DXTensors) -> torch.Tensor:
    """[eq:dx-velocity] literally. x (B, C, L); returns u (B, C, L) in x.dtype."""
    grid, x_src, sigma_src, segment = policy
    mode = "polynomial" if segment.polynomial else "grid"
    u = reference.dx_velocity(
        x.float(), sigma, grid.float(), x_src.float(), sigma_src, segment.segment_size, segment.shift, mode
    )
    return u.to(x.dtype)


def dx_rollout_reference(x_start: torch.Tensor, policy: DXTensors, plan: RolloutPlan) -> torch.Tensor:
    """[eq:rollout] literally, one sample's substeps at a time. Returns x_end (B, C, L) in x_start.dtype."""
    return reference_rollout(dx_velocity_reference, x_start, policy, plan)


__all__ = ["dx_rollout_reference", "dx_velocity_reference"]
