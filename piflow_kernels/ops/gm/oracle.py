"""The literal reference (:mod:`piflow_kernels.reference`) as the "reference" backend of the GM ops.

Adapts the flat layout to the reference's shapes and computes in float32 (the reference itself is
dtype-agnostic: the tests run it in float64 directly). Slow by design: it is the oracle.
"""

from __future__ import annotations

import torch

from piflow_kernels import reference
from piflow_kernels.ops.records import GMTensors, RolloutPlan
from piflow_kernels.ops.utils import reference_rollout


def gm_velocity_reference(x: torch.Tensor, sigma: torch.Tensor, policy: GMTensors) -> torch.Tensor:
    """[eq:gm-velocity] literally. x (B, C, L); returns u (B, C, L) in x.dtype."""
    means, logweights, logstds, x_src, sigma_src = policy
    u = reference.gm_velocity(
        x.float(), sigma, means.float(), logweights.float().unsqueeze(2), logstds.float()[:, :, None, None],
        x_src.float(), sigma_src,
    )  # fmt: skip
    return u.to(x.dtype)


def gm_rollout_reference(x_start: torch.Tensor, policy: GMTensors, plan: RolloutPlan) -> torch.Tensor:
    """[eq:rollout] literally, one sample's substeps at a time. Returns x_end (B, C, L) in x_start.dtype."""
    return reference_rollout(gm_velocity_reference, x_start, policy, plan)


__all__ = ["gm_rollout_reference", "gm_velocity_reference"]
