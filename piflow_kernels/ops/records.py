"""Small argument records the policy ops pass around, instead of eleven- to fourteen-argument lists.

Every op takes its policy as one record and a rollout its substep plan as another; the records are
flattened only at the ``torch.library`` boundary, where each custom op must list its tensors.

Flat layout (the policies reshape to it; ``L`` = prod of the spatial dims):

    x, x_src      (B, C, L)       latents
    means         (B, K, C, L)    GM: velocity-space component means
    logweights    (B, K, L)       GM: log-softmax over K (may hold -inf)
    logstds       (B, K1)         GM: K1 = 1 (one std per sample) or K (per component)
    grid          (B, N, C, L)    DX: velocities at N grid points
    sigma*, r*    (B,)            float32 per-sample scalars

    >>> policy = GMTensors(means, logweights, logstds, x_src, sigma_src)
    >>> plan = RolloutPlan.build(sigma_start, sigma_end, total_substeps=128, shift=3.0)
    >>> x_end = ops.gm_rollout("torch", x_start, policy, plan)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from piflow_kernels.timesteps import DEFAULT_SUBSTEP_RULE, substep_schedule


class GMTensors(NamedTuple):
    """A GMFlow policy in the flat layout (docs/design.md, [eq:gm-velocity])."""

    means: torch.Tensor  # (B, K, C, L)
    logweights: torch.Tensor  # (B, K, L)
    logstds: torch.Tensor  # (B, K1), K1 in {1, K}
    x_src: torch.Tensor  # (B, C, L)
    sigma_src: torch.Tensor  # (B,) float32

    @property
    def per_component_std(self) -> bool:
        return self.logstds.shape[1] > 1


class DXSegment(NamedTuple):
    """The raw-time segment a DX grid spans, under the policy's own shift (docs/design.md, [eq:dx-velocity])."""

    r_src: torch.Tensor  # (B,) unwarp(sigma_src)
    r_dst: torch.Tensor  # (B,) max(r_src - segment_size, 0)
    seg: torch.Tensor  # (B,) max(r_src - r_dst, DX_EPS)
    shift: float  # the policy's shift (intrinsic to the grid)
    polynomial: bool  # x0 = sum_n (r_src - r)^n x0_n instead of linear interpolation
    segment_size: float  # the raw-time length asked for (r_src - r_dst before clamping at 0)

    @property
    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, bool]:
        """(r_src, r_dst, seg, shift, polynomial): what the fused DX ops read."""
        return self.r_src, self.r_dst, self.seg, self.shift, self.polynomial


class DXTensors(NamedTuple):
    """A DX policy in the flat layout."""

    grid: torch.Tensor  # (B, N, C, L)
    x_src: torch.Tensor  # (B, C, L)
    sigma_src: torch.Tensor  # (B,) float32
    segment: DXSegment


class RolloutPlan(NamedTuple):
    """Per-sample substep plan of a rollout from sigma_start to sigma_end (docs/design.md, [eq:substeps]).

    The fused paths read ``sigma_start``, ``n_substeps``, ``substep_size``, ``r_start`` and ``shift``: the per-sample
    counts come from here (:func:`~piflow_kernels.timesteps.substep_schedule`) under ``substep_rule``. The reference
    oracle integrates from ``sigma_start`` to ``sigma_end`` with ``total_substeps`` itself.
    """

    sigma_start: torch.Tensor  # (B,) float32
    n_substeps: torch.Tensor  # (B,) int32, >= 1
    substep_size: torch.Tensor  # (B,) float32, raw time per substep
    r_start: torch.Tensor  # (B,) float32, unwarp(sigma_start)
    shift: float  # time shift of the substep grid
    sigma_end: torch.Tensor  # (B,) float32
    total_substeps: int  # substeps per unit raw time
    substep_rule: str = DEFAULT_SUBSTEP_RULE  # how n_substeps was counted: "ceil" or "round"

    @classmethod
    def build(
        cls,
        sigma_start: torch.Tensor,
        sigma_end: torch.Tensor,
        total_substeps: int,
        shift: float,
        substep_rule: str = DEFAULT_SUBSTEP_RULE,
    ) -> RolloutPlan:
        """The plan of [eq:substeps] under ``substep_rule``, computed on the device without host synchronisation."""
        n, h, r0 = substep_schedule(sigma_start, sigma_end, total_substeps, shift, substep_rule)
        return cls(sigma_start, n, h, r0, float(shift), sigma_end, int(total_substeps), substep_rule)

    @property
    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(sigma_start, n_substeps, substep_size, r_start, shift): what the fused rollouts read."""
        return self.sigma_start, self.n_substeps, self.substep_size, self.r_start, self.shift


__all__ = ["DXSegment", "DXTensors", "GMTensors", "RolloutPlan"]
