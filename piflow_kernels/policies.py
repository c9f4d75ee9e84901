"""The two pi-Flow policies: network-free velocity fields built from a student's output.

    >>> pol = GMFlowPolicy(means, logweights, logstds, x_src, sigma_src=0.8)
    >>> u = pol.velocity(x_src, 0.8)                 # (B, C, H, W), differentiable
    >>> x_end = pol.rollout(x_src, 0.8, 0.4)         # 128 substeps per unit raw time, no grad

Both run their math in float32 whatever the input dtype and return the dtype of ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from piflow_kernels import ops
from piflow_kernels.checks import (
    SigmaLike,
    as_sigma,
    check_float_tensor,
    check_latent,
    check_same_device,
    check_shape,
    check_total_substeps,
    positive_float,
)
from piflow_kernels.constants import DEFAULT_TOTAL_SUBSTEPS, DX_EPS
from piflow_kernels.ops.dispatch import load_triton_ops, resolve_backend
from piflow_kernels.ops.records import DXSegment, DXTensors, GMTensors, RolloutPlan
from piflow_kernels.timesteps import unwarp

__all__ = ["GMFlowPolicy", "DXPolicy"]


def _no_autocast(device: torch.device):
    """Policy math is float32 by contract: switch off any autocast region of the caller (bf16 training)."""
    return torch.autocast(device_type=device.type, enabled=False)


class _PolicyBase:
    """What both policies share: checks, the substep plan, and velocity/rollout through their ops."""

    x_src: torch.Tensor
    sigma_src: torch.Tensor
    backend: str
    # each policy names the two ops (piflow_kernels.ops) it calls; the dispatcher picks their implementation
    _velocity_op: Callable[..., torch.Tensor]
    _rollout_op: Callable[..., torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.x_src.shape[0]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, *S) of the latents this policy acts on."""
        return tuple(self.x_src.shape[1:])

    def _check_x(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = check_latent(name, x)
        if x.shape != self.x_src.shape:
            raise ValueError(f"{name} must have the shape of x_src {tuple(self.x_src.shape)}, got {tuple(x.shape)}")
        if x.device != self.x_src.device:
            raise ValueError(f"{name} is on {x.device} but the policy is on {self.x_src.device}")
        return x

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, L)."""
        return t.reshape(t.shape[0], t.shape[1], -1)

    def _plan(self, x_start, sigma_start, sigma_end, total_substeps, shift) -> tuple[torch.Tensor, RolloutPlan]:
        x_start = self._check_x("x_start", x_start)
        total_substeps = check_total_substeps(total_substeps)
        shift = positive_float("shift", shift)
        s0 = as_sigma("sigma_start", sigma_start, self.batch_size, x_start.device)
        s1 = as_sigma("sigma_end", sigma_end, self.batch_size, x_start.device)
        if s0.device.type == "cpu" and not torch.compiler.is_compiling() and bool((s1 > s0).any()):
            raise ValueError("sigma_end must not exceed sigma_start: a rollout runs from noise towards data")
        return x_start, RolloutPlan.build(s0, s1, total_substeps, shift)

    def _resolve(self, backend: str | None, device: torch.device) -> None:
        self._backend_arg = backend
        self.backend = resolve_backend(backend, device)
        if self.backend == "triton" and not torch.compiler.is_compiling():
            load_triton_ops()

    def _tensors(self):
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """Velocity u(x, sigma) ([eq:gm-velocity], [eq:dx-velocity]), shape and dtype of ``x``; differentiable
        w.r.t. the policy tensors (means, logweights, logstds; or grid), x and x_src."""
        x = self._check_x("x", x)
        sigma = as_sigma("sigma", sigma, self.batch_size, x.device)
        with _no_autocast(x.device):
            u = self._velocity_op(self.backend, self._flat(x), sigma, self._tensors())
        return u.reshape(x.shape)

    @torch.no_grad()
    def rollout(
        self,
        x_start: torch.Tensor,
        sigma_start: SigmaLike,
        sigma_end: SigmaLike,
        total_substeps: int = DEFAULT_TOTAL_SUBSTEPS,
        shift: float = 1.0,
    ) -> torch.Tensor:
        """Integrate the policy from sigma_start down to sigma_end with Euler substeps uniform in raw time under
        ``shift`` ([eq:rollout]), no grad. Sample b takes max(1, round((r_start - r_end) * total_substeps))
        substeps ([eq:substeps]). Returns x_end like ``x_start``."""
        x_start, plan = self._plan(x_start, sigma_start, sigma_end, total_substeps, shift)
        with _no_autocast(x_start.device):
            x_end = self._rollout_op(self.backend, self._flat(x_start), self._tensors(), plan)
        return x_end.reshape(x_start.shape)



class GMFlowPolicy(_PolicyBase):
    """Gaussian-mixture (GMFlow) policy: a per-pixel mixture over x0, given in velocity space.

    Args:
        means: (B, K, C, *S) component means of the velocity, S = (H, W) or (T, H, W).
        logweights: (B, K, 1, *S) log-softmax over K (entries may be -inf).
        logstds: (B, 1, 1, *1) one std per sample, or (B, K, 1, *1) per component.
        x_src: (B, C, *S) the noisy input the student saw.
        sigma_src: its noise level: a float, a 0-d or a (B,) tensor.
        backend: None (auto), "torch", "triton" or "reference" (see :mod:`piflow_kernels.ops.dispatch`).

    Example:
        >>> pol = GMFlowPolicy(means, logweights, logstds, x_src, 0.9)
        >>> x_end = pol.temperature(0.7).rollout(x_src, 0.9, 0.0, total_substeps=128)
    """

    _velocity_op = staticmethod(ops.gm_velocity)
    _rollout_op = staticmethod(ops.gm_rollout)

    def __init__(
        self,
        means: torch.Tensor,
        logweights: torch.Tensor,
        logstds: torch.Tensor,
        x_src: torch.Tensor,
        sigma_src: SigmaLike,
        backend: str | None = None,
    ) -> None:
        x_src = check_latent("x_src", x_src)
        means = check_float_tensor("means", means)
        logweights = check_float_tensor("logweights", logweights)
        logstds = check_float_tensor("logstds", logstds)
        b, c, *spatial = x_src.shape
        nd = len(spatial)
        if means.dim() != x_src.dim() + 1:
            raise ValueError(
                f"means must have shape (B, K, C, *S) = ({b}, K, {c}, {', '.join(map(str, spatial))}), "
                f"got {tuple(means.shape)}"
            )
        k = means.shape[1]
        what = f"(B, K, C, *S) = ({b}, K, {c}, {', '.join(map(str, spatial))})"
        check_shape("means", means, [b, None, c, *spatial], what)
        if k < 1:
            raise ValueError("means must have at least one component (K >= 1)")
        sp = ", ".join(map(str, spatial))
        check_shape("logweights", logweights, [b, k, 1, *spatial], f"(B, K, 1, *S) = ({b}, {k}, 1, {sp})")
        if not (
            logstds.dim() == means.dim()
            and logstds.shape[0] == b
            and logstds.shape[1] in (1, k)
            and all(d == 1 for d in logstds.shape[2:])
        ):
            raise ValueError(
                f"logstds must have shape (B, 1, 1{', 1' * nd}) or (B, K, 1{', 1' * nd}) with B={b}, K={k}, "
                f"got {tuple(logstds.shape)}"
            )
        device = check_same_device(means=means, logweights=logweights, logstds=logstds, x_src=x_src)
        self.means = means
        self.logweights = logweights
        self.logstds = logstds
        self.x_src = x_src
        self.sigma_src = as_sigma("sigma_src", sigma_src, b, device)
        self._resolve(backend, device)

    @property
    def num_components(self) -> int:
        return self.means.shape[1]

    def _replace(self, **changes: torch.Tensor) -> GMFlowPolicy:
        new = GMFlowPolicy.__new__(GMFlowPolicy)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def _tensors(self) -> GMTensors:
        """The policy in the flat layout of the ops (:mod:`piflow_kernels.ops.records`)."""
        b, k = self.means.shape[:2]
        c = self.x_src.shape[1]
        return GMTensors(
            self.means.reshape(b, k, c, -1),
            self.logweights.reshape(b, k, -1),
            self.logstds.reshape(b, self.logstds.shape[1]),
            self._flat(self.x_src),
            self.sigma_src,
        )

    def detach(self) -> GMFlowPolicy:
        """A copy whose tensors are detached from the autograd graph."""
        return self._replace(
            means=self.means.detach(),
            logweights=self.logweights.detach(),
            logstds=self.logstds.detach(),
            x_src=self.x_src.detach(),
        )

    def temperature(self, temperature: float) -> GMFlowPolicy:
        """Sharpen the mixture: logweights <- log_softmax(logweights / T), var <- var * T (T < 1).

        T >= 1 returns an unchanged copy (as the official sampler does).
        """
        temperature = float(temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if temperature >= 1.0:
            return self._replace()
        lw = torch.log_softmax(self.logweights.float() / temperature, dim=1).to(self.logweights.dtype)
        ls = self.logstds + 0.5 * math.log(temperature)
        return self._replace(logweights=lw, logstds=ls)

    def dropout(self, p: float, generator: torch.Generator | None = None) -> GMFlowPolicy:
        """Drop each (sample, component) with probability p (logweight -inf), never all of a sample's."""
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must lie in [0, 1), got {p}")
        if p == 0.0:
            return self._replace()
        b, k = self.means.shape[:2]
        gen_device = generator.device if generator is not None else self.means.device
        drop = torch.rand((b, k), generator=generator, device=gen_device).to(self.means.device) < p
        drop &= ~drop.all(dim=1, keepdim=True)
        mask = drop.reshape(b, k, *([1] * (self.logweights.dim() - 2)))
        return self._replace(logweights=self.logweights.masked_fill(mask, float("-inf")))

    def __repr__(self) -> str:
        b, k, c = self.means.shape[:3]
        per = "component" if self.logstds.shape[1] > 1 else "sample"
        return (
            f"GMFlowPolicy(B={b}, K={k}, C={c}, spatial={tuple(self.x_src.shape[2:])}, std per {per}, "
            f"dtype={self.means.dtype}, backend={self.backend!r})"
        )


class DXPolicy(_PolicyBase):
    """DX policy: x0 piecewise linear (or polynomial) in raw time over the policy's segment.

    Args:
        grid: (B, N, C, *S) velocities at N grid points spanning raw time [r_dst, r_src].
        x_src: (B, C, *S); sigma_src: float, 0-d or (B,) tensor.
        segment_size: raw-time length of the segment; the grid spans [max(r_src - segment_size, 0), r_src].
        shift: the policy's own time shift (intrinsic: keep it when changing NFE at test time).
        mode: "grid" (linear interpolation) or "polynomial" (x0 = sum_n (r_src - r)^n x0_n).
        backend: None (auto), "torch", "triton" or "reference".

    Example:
        >>> pol = DXPolicy(grid, x_src, 1.0, segment_size=0.5, shift=3.0)
        >>> x_mid = pol.rollout(x_src, 1.0, pol.sigma_dst, shift=3.0)
    """

    _velocity_op = staticmethod(ops.dx_velocity)
    _rollout_op = staticmethod(ops.dx_rollout)

    def __init__(
        self,
        grid: torch.Tensor,
        x_src: torch.Tensor,
        sigma_src: SigmaLike,
        segment_size: float = 1.0,
        shift: float = 1.0,
        mode: str = "grid",
        backend: str | None = None,
    ) -> None:
        x_src = check_latent("x_src", x_src)
        grid = check_float_tensor("grid", grid)
        b, c, *spatial = x_src.shape
        if grid.dim() != x_src.dim() + 1:
            raise ValueError(
                f"grid must have shape (B, N, C, *S) = ({b}, N, {c}, {', '.join(map(str, spatial))}), got {tuple(grid.shape)}"
            )
        check_shape("grid", grid, [b, None, c, *spatial], f"(B, N, C, *S) = ({b}, N, {c}, {', '.join(map(str, spatial))})")
        if grid.shape[1] < 1:
            raise ValueError("grid must have at least one point (N >= 1)")
        if mode not in ("grid", "polynomial"):
            raise ValueError(f"mode must be 'grid' or 'polynomial', got {mode!r}")
        segment_size = float(segment_size)
        if not segment_size > 0:
            raise ValueError(f"segment_size must be > 0, got {segment_size}")
        device = check_same_device(grid=grid, x_src=x_src)
        self.grid = grid
        self.x_src = x_src
        self.sigma_src = as_sigma("sigma_src", sigma_src, b, device)
        self.segment_size = segment_size
        self.shift = positive_float("shift", shift)
        self.mode = mode
        self._resolve(backend, device)
        self.r_src = unwarp(self.sigma_src, self.shift)
        self.r_dst = (self.r_src - segment_size).clamp(min=0.0)
        self.seg = (self.r_src - self.r_dst).clamp(min=DX_EPS)

    @property
    def num_points(self) -> int:
        return self.grid.shape[1]

    @property
    def sigma_dst(self) -> torch.Tensor:
        """(B,) noise level at the end of the policy's segment."""
        return self.shift * self.r_dst / (1 + (self.shift - 1) * self.r_dst)

    def _replace(self, **changes) -> DXPolicy:
        new = DXPolicy.__new__(DXPolicy)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def _tensors(self) -> DXTensors:
        """The policy in the flat layout of the ops (:mod:`piflow_kernels.ops.records`)."""
        b, n, c = self.grid.shape[:3]
        segment = DXSegment(self.r_src, self.r_dst, self.seg, self.shift, self.mode == "polynomial", self.segment_size)
        return DXTensors(self.grid.reshape(b, n, c, -1), self._flat(self.x_src), self.sigma_src, segment)

    def detach(self) -> DXPolicy:
        return self._replace(grid=self.grid.detach(), x_src=self.x_src.detach())

    def __repr__(self) -> str:
        b, n, c = self.grid.shape[:3]
        return (
            f"DXPolicy(B={b}, N={n}, C={c}, spatial={tuple(self.x_src.shape[2:])}, mode={self.mode!r}, "
            f"segment_size={self.segment_size}, shift={self.shift}, backend={self.backend!r})"
        )
