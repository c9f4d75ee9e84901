"""Policy ops, organised by op: ``ops/gm`` (GMFlow) and ``ops/dx`` (DX), each with its twins side by side.

| op | reference (``piflow_kernels.reference``) | torch twin | native (CPU) | Triton |
| --- | --- | --- | --- | --- |
| GM velocity | ``gm.gm_velocity`` | ``gm/torch_twin.py`` | | ``gm/triton_velocity.py`` |
| GM rollout | ``rollout.rollout`` | ``gm/torch_twin.py`` | ``gm/native.py`` + ``native.c`` | ``gm/triton_rollout.py`` |
| DX velocity | ``dx.dx_velocity`` | ``dx/torch_twin.py`` | | ``dx/triton_velocity.py`` |
| DX rollout | ``rollout.rollout`` | ``dx/torch_twin.py`` (closed form) | | ``dx/triton_rollout.py`` |

Each op takes the flat policy as one record (:mod:`piflow_kernels.ops.records`); the dispatcher
(:mod:`piflow_kernels.ops.dispatch`) picks the implementation. The tests that join each op to its reference
carry the op's name: ``tests/ops/test_gm_velocity.py``, ``test_gm_rollout.py``, ``test_dx_velocity.py``,
``test_dx_rollout.py``.

    >>> u = ops.gm_velocity("torch", x, sigma, GMTensors(means, logweights, logstds, x_src, sigma_src))
"""

from __future__ import annotations

import torch

from piflow_kernels.ops import dispatch
from piflow_kernels.ops.records import DXSegment, DXTensors, GMTensors, RolloutPlan


def gm_velocity(backend: str, x: torch.Tensor, sigma: torch.Tensor, policy: GMTensors) -> torch.Tensor:
    """GM velocity u(x, sigma) (B, C, L) in x.dtype, differentiable; ``backend`` as resolved by the policy."""
    return dispatch.select("gm_velocity", backend, x, policy).fn(x, sigma, policy)


def gm_rollout(backend: str, x_start: torch.Tensor, policy: GMTensors, plan: RolloutPlan) -> torch.Tensor:
    """Whole GM rollout: x_end (B, C, L) in x_start.dtype, no grad."""
    return dispatch.select("gm_rollout", backend, x_start, policy).fn(x_start, policy, plan)


def dx_velocity(backend: str, x: torch.Tensor, sigma: torch.Tensor, policy: DXTensors) -> torch.Tensor:
    """DX velocity u(x, sigma) (B, C, L) in x.dtype, differentiable w.r.t. grid, x and x_src."""
    return dispatch.select("dx_velocity", backend, x, policy).fn(x, sigma, policy)


def dx_rollout(backend: str, x_start: torch.Tensor, policy: DXTensors, plan: RolloutPlan) -> torch.Tensor:
    """Whole DX rollout: x_end (B, C, L) in x_start.dtype, no grad."""
    return dispatch.select("dx_rollout", backend, x_start, policy).fn(x_start, policy, plan)


__all__ = [
    "DXSegment",
    "DXTensors",
    "GMTensors",
    "RolloutPlan",
    "dispatch",
    "dx_rollout",
    "dx_velocity",
    "gm_rollout",
    "gm_velocity",
]
