"""The two pi-Flow policies: network-free velocity fields built from a student's output.

    >>> pol = GMFlowPolicy(means, logweights, logstds, x_src, sigma_src=0.8)
    >>> u = pol.velocity(x_src, 0.8)                 # (B, C, H, W), differentiable
    >>> x_end = pol.rollout(x_src, 0.8, 0.4)         # 128 substeps per unit raw time, no grad

Both run their math in float32 whatever the input dtype and return the dtype of ``x``.

Domain (docs/design.md#domain-of-the-inputs): policy tensors finite (logweights finite or -inf, with a finite
component at every pixel), sigmas in [0, 1], and a policy is only queried at or below its source point:
``velocity``'s ``sigma`` and ``rollout``'s ``sigma_start`` must not exceed ``sigma_src``. These data checks
run on CPU tensors and are off on CUDA (each is a host sync) unless ``validate=True`` or ``PIFLOW_VALIDATE=1``.

The velocity's floor of sigma (docs/design.md, "Conventions") is GM_EPS = 1e-6 for GMFlow and DX_EPS = 1e-4 for DX,
the defaults of the official policies (and of LakonLab's diffusers pipelines). ``velocity_eps`` (a constructor
keyword, or :meth:`~_PolicyBase.with_velocity_eps`) sets another floor, e.g. 1e-4 for GMFlow as LakonLab's training-side
test sampler passes: u is then computed with sigma, sigma_src (GM, and the posterior's d_k) clamped at it, and DX's
segment length too. The fused kernels keep their built-in floor as a compile-time constant; the eps is applied
around them where that is exact (GM: u_eps(x, sigma) = u(x, max(sigma, eps)) for eps >= GM_EPS and
sigma_src >= eps; DX: u_eps = u * max(sigma, DX_EPS) / max(sigma, eps), the segment through the policy record), and
a rollout that evaluates u below the floor runs as a substep loop over that velocity. Other cases (GM: eps below
GM_EPS or a source below eps; the "reference" backend) use the reference formula at that eps (float64; the
"reference" backend in float32, as its oracle).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch

from piflow_kernels import ops
from piflow_kernels.checks import (
    SigmaLike,
    as_float,
    as_sigma,
    check_finite,
    check_float_tensor,
    check_latent,
    check_logweights,
    check_same_device,
    check_shape,
    check_sigma_at_most,
    check_total_substeps,
    check_unit_interval,
    check_validate,
    validation_on,
)
from piflow_kernels.constants import DEFAULT_TOTAL_SUBSTEPS, DX_EPS, GM_EPS
from piflow_kernels.ops.dispatch import load_triton_ops, require_runnable, resolve_backend
from piflow_kernels.ops.records import DXSegment, DXTensors, GMTensors, RolloutPlan
from piflow_kernels.ops.utils import reference_rollout
from piflow_kernels.timesteps import DEFAULT_SUBSTEP_RULE, check_substep_rule, unwarp, warp

__all__ = ["GMFlowPolicy", "DXPolicy"]

# How far a query sigma may lie above sigma_src and still count as the source point: 1e-6 relative, about 8
# float32 ulps, covers sigmas that reach the policy by different float paths (a float64 schedule cast to
# float32, a warp/unwarp round trip). There the GM posterior has d_k = 1 - 2e-6 * (1 - s) * exp(2 logstd_k) to
# first order: still about 1 for stds up to the hundreds (students predict stds of order 1).
SIGMA_SRC_RTOL = 1e-6

_P = TypeVar("_P", bound="_PolicyBase")


def check_velocity_eps(eps: object) -> float | None:
    """``velocity_eps``: None (the built-in floor) or a finite number > 0, as a float."""
    if eps is None:
        return None
    try:
        value = as_float("velocity_eps", eps)
    except (TypeError, ValueError):
        value = None
    if value is None or not value > 0:
        raise ValueError(f"velocity_eps must be a finite number > 0 or None, got {eps!r}")
    return value


def _no_autocast(device: torch.device):
    """Policy math is float32 by contract: switch off any autocast region of the caller (bf16 training)."""
    return torch.autocast(device_type=device.type, enabled=False)


class _PolicyBase:
    """What both policies share: checks, the substep plan, and velocity/rollout through their ops."""

    x_src: torch.Tensor
    sigma_src: torch.Tensor
    backend: str
    validate: bool | None
    _family: str  # "gm" or "dx": the ops are <family>_velocity and <family>_rollout
    # each policy names the two ops (piflow_kernels.ops) it calls; the dispatcher picks their implementation
    _velocity_op: Callable[..., torch.Tensor]
    _rollout_op: Callable[..., torch.Tensor]
    _default_eps: float  # the floor the ops build in (GM_EPS, DX_EPS)
    #: the velocity's floor of sigma, None for the built-in one (module docstring)
    velocity_eps: float | None = None

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

    def _validating(self) -> bool:
        """Whether the data checks run now (``validate``, ``PIFLOW_VALIDATE``; never while compiling)."""
        return validation_on(self.validate, self.x_src.device)

    def _check_sigma(self, name: str, sigma: torch.Tensor) -> None:
        """A query sigma in [0, sigma_src]: the policy describes the trajectory from its source point down."""
        if sigma.device.type != "cpu":  # as_sigma checked [0, 1] on CPU tensors already
            check_unit_interval(name, sigma)
        check_sigma_at_most(name, sigma, "sigma_src", self.sigma_src, SIGMA_SRC_RTOL)

    @staticmethod
    def _check_stacked(name: str, t: torch.Tensor, x_src: torch.Tensor, count: str) -> int:
        """``t`` of shape (B, ``count``, C, *S) for ``x_src`` of shape (B, C, *S); returns its size along dim 1."""
        b, c, *spatial = x_src.shape
        check_shape(name, t, [b, None, c, *spatial], f"(B, {count}, C, *S) = ({b}, {count}, {c}, {', '.join(map(str, spatial))})")
        return t.shape[1]

    def _check_source(self) -> None:
        """The data checks of x_src and sigma_src (as_sigma checked the range of a CPU sigma_src already)."""
        check_finite("x_src", self.x_src)
        if self.x_src.device.type != "cpu":
            check_unit_interval("sigma_src", self.sigma_src)

    def _replace(self: _P, **changes: torch.Tensor) -> _P:
        """A copy of this policy (same backend and validation settings) with some attributes replaced."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def _plan(self, x_start, sigma_start, sigma_end, total_substeps, shift, substep_rule) -> tuple[torch.Tensor, RolloutPlan]:
        x_start = self._check_x("x_start", x_start)
        total_substeps = check_total_substeps(total_substeps)
        shift = as_float("shift", shift, positive=True)
        substep_rule = check_substep_rule(substep_rule)
        s0 = as_sigma("sigma_start", sigma_start, self.batch_size, x_start.device)
        s1 = as_sigma("sigma_end", sigma_end, self.batch_size, x_start.device)
        if self._validating():
            if s1.device.type != "cpu":
                check_unit_interval("sigma_end", s1)
            if bool((s1 > s0).any()):
                raise ValueError("sigma_end must not exceed sigma_start: a rollout runs from noise towards data")
            self._check_sigma("sigma_start", s0)
            check_finite("x_start", x_start)
        return x_start, RolloutPlan.build(s0, s1, total_substeps, shift, substep_rule)

    def _resolve(self, backend: str | None, device: torch.device) -> None:
        """Pick the backend; one passed explicitly must be able to run this policy (the automatic choice falls back)."""
        self._backend_arg = backend
        self.backend = resolve_backend(backend, device)
        if backend is not None:
            require_runnable(self.backend, f"{self._family}_velocity", self._flat(self.x_src), self._tensors())
        if self.backend == "triton" and not torch.compiler.is_compiling():
            load_triton_ops()

    def _tensors(self):
        raise NotImplementedError

    def with_velocity_eps(self: _P, eps: float | None) -> _P:
        """A copy whose velocity (and rollout) floors sigma at ``eps`` (a finite number > 0) instead of the built-in
        GM_EPS / DX_EPS; None gives the built-in floor back. See the module docstring."""
        new = self._replace()
        new._set_velocity_eps(check_velocity_eps(eps))
        return new

    def _set_velocity_eps(self, eps: float | None) -> None:
        """Set ``velocity_eps`` and what follows from it (once: the check of sigma_src is a host sync)."""
        self.velocity_eps = eps
        self._eps_exact = eps is not None and self.backend != "reference" and self._eps_exact_for(eps)

    def _eps_exact_for(self, eps: float) -> bool:
        return True

    def _eps_exact_around_ops(self) -> bool:
        """Whether the fast ops with the eps applied around them give the velocity at ``velocity_eps`` exactly."""
        return self.__dict__.get("_eps_exact", False)

    def _eps_velocity(self, x: torch.Tensor, sigma: torch.Tensor, tensors) -> torch.Tensor:
        raise NotImplementedError

    def _eps_floor(self) -> float:
        """Below this sigma the velocity at ``velocity_eps`` differs from the built-in one."""
        return self.velocity_eps

    def _rollout_below_floor(self, plan: RolloutPlan) -> bool:
        """Whether a substep of ``plan`` starts below the eps floor (one host sync)."""
        if self.velocity_eps == self._default_eps:
            return False
        n = plan.n_substeps.to(plan.r_start.device)
        last_start = warp((plan.r_start - (n - 1).to(plan.r_start.dtype) * plan.substep_size).clamp(min=0.0), plan.shift)
        return bool((last_start < self._eps_floor()).any())

    def velocity(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """Velocity u(x, sigma) ([eq:gm-velocity], [eq:dx-velocity]), shape and dtype of ``x``; differentiable
        w.r.t. the policy tensors (means, logweights, logstds; or grid), x and x_src.

        Args:
            x: (B, C, *S) like ``x_src``, finite.
            sigma: a number, 0-d or (B,) tensor in [0, sigma_src] (up to ``SIGMA_SRC_RTOL``).
        """
        x = self._check_x("x", x)
        sigma = as_sigma("sigma", sigma, self.batch_size, x.device)
        if self._validating():
            self._check_sigma("sigma", sigma)
            check_finite("x", x)
        with _no_autocast(x.device):
            if self.velocity_eps is None:
                u = self._velocity_op(self.backend, self._flat(x), sigma, self._tensors())
            else:
                u = self._eps_velocity(self._flat(x), sigma, self._tensors())
        return u.reshape(x.shape)

    @torch.no_grad()
    def rollout(
        self,
        x_start: torch.Tensor,
        sigma_start: SigmaLike,
        sigma_end: SigmaLike,
        total_substeps: int = DEFAULT_TOTAL_SUBSTEPS,
        shift: float = 1.0,
        substep_rule: str = DEFAULT_SUBSTEP_RULE,
    ) -> torch.Tensor:
        """Integrate the policy from sigma_start down to sigma_end with Euler substeps uniform in raw time under
        ``shift`` ([eq:rollout]), no grad. Sample b takes max(1, ceil((r_start - r_end) * total_substeps))
        substeps (``substep_rule="ceil"``, LakonLab v0.2.0; a product within 1e-5 raw time above an integer counts
        as that integer) or max(1, round(...)) (``"round"``, earlier versions), [eq:substeps].
        Returns x_end like ``x_start``.

        Args:
            x_start: (B, C, *S) like ``x_src``, finite.
            sigma_start: a number, 0-d or (B,) tensor in [0, sigma_src] (up to ``SIGMA_SRC_RTOL``).
            sigma_end: likewise, in [0, sigma_start].
            total_substeps: an int >= 1 (Python or numpy).
            shift: the rollout's time shift, a positive finite number.
            substep_rule: "ceil" (default) or "round".
        """
        x_start, plan = self._plan(x_start, sigma_start, sigma_end, total_substeps, shift, substep_rule)
        tensors = self._tensors()
        with _no_autocast(x_start.device):
            if self.velocity_eps is None or (self._eps_exact_around_ops() and not self._rollout_below_floor(plan)):
                x_end = self._rollout_op(self.backend, self._flat(x_start), tensors, plan)
            else:  # a substep evaluates u below the floor: Euler substeps over the velocity at velocity_eps
                x_end = reference_rollout(lambda x, s, pol: self._eps_velocity(x, s, pol), self._flat(x_start), tensors, plan)
        return x_end.reshape(x_start.shape)


class GMFlowPolicy(_PolicyBase):
    """Gaussian-mixture (GMFlow) policy: a per-pixel mixture over x0, given in velocity space.

    Args:
        means: (B, K, C, *S) component means of the velocity, S = (H, W) or (T, H, W); finite.
        logweights: (B, K, 1, *S) log-softmax over K: finite or -inf, with a finite entry at every pixel.
        logstds: (B, 1, 1, *1) one std per sample, or (B, K, 1, *1) per component; finite.
        x_src: (B, C, *S) the noisy input the student saw; finite.
        sigma_src: its noise level in [0, 1]: a number, a 0-d or a (B,) tensor. The policy is queried at
            sigmas <= sigma_src only: above it the posterior's denominators ``var_k * zeta + 1`` can be <= 0.
        backend: None (auto), "torch", "triton" or "reference" (see :mod:`piflow_kernels.ops.dispatch`); an
            explicit backend that cannot run these shapes or this device raises a ``ValueError``.
        validate: the data checks (finite tensors, sigma <= sigma_src): None = on for CPU tensors, off on
            CUDA (each check is a host sync); ``PIFLOW_VALIDATE=1``/``0`` overrides it everywhere.
        velocity_eps: the velocity's floor of sigma (keyword only): None (default) the built-in GM_EPS = 1e-6, as
            the official GMFlow policy; e.g. 1e-4 as LakonLab's training-side test sampler (module docstring).

    Example:
        >>> pol = GMFlowPolicy(means, logweights, logstds, x_src, 0.9)
        >>> x_end = pol.temperature(0.7).rollout(x_src, 0.9, 0.0, total_substeps=128)
    """

    _family = "gm"
    _velocity_op = staticmethod(ops.gm_velocity)
    _rollout_op = staticmethod(ops.gm_rollout)
    _default_eps = GM_EPS

    def __init__(
        self,
        means: torch.Tensor,
        logweights: torch.Tensor,
        logstds: torch.Tensor,
        x_src: torch.Tensor,
        sigma_src: SigmaLike,
        backend: str | None = None,
        validate: bool | None = None,
        *,
        velocity_eps: float | None = None,
    ) -> None:
        self.validate = check_validate(validate)
        velocity_eps = check_velocity_eps(velocity_eps)
        x_src = check_latent("x_src", x_src)
        means = check_float_tensor("means", means)
        logweights = check_float_tensor("logweights", logweights)
        logstds = check_float_tensor("logstds", logstds)
        b, c, *spatial = x_src.shape
        nd = len(spatial)
        k = self._check_stacked("means", means, x_src, "K")
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
        if self._validating():
            check_finite("means", means)
            check_logweights("logweights", logweights)
            check_finite("logstds", logstds)
            self._check_source()
        self._resolve(backend, device)
        self._set_velocity_eps(velocity_eps)

    @property
    def num_components(self) -> int:
        return self.means.shape[1]

    def _eps_exact_for(self, eps: float) -> bool:
        # u_eps(x, s) = u(x, max(s, eps)) needs the ops' floors (GM_EPS on s, s_src, d_k) inactive there
        return eps >= GM_EPS and bool((self.sigma_src >= eps).all())

    def _eps_velocity(self, x: torch.Tensor, sigma: torch.Tensor, tensors: GMTensors) -> torch.Tensor:
        eps = self.velocity_eps
        if self._eps_exact_around_ops():
            return self._velocity_op(self.backend, x, sigma.clamp(min=eps), tensors)
        from piflow_kernels import reference

        # the "reference" backend computes in float32 as its oracle does; a fallback of a fast backend in float64
        dt = torch.float32 if self.backend == "reference" else torch.float64
        means, logweights, logstds, x_src, sigma_src = tensors
        u = reference.gm_velocity(
            x.to(dt), sigma.to(dt), means.to(dt), logweights.to(dt).unsqueeze(2), logstds.to(dt)[:, :, None, None],
            x_src.to(dt), sigma_src.to(dt), eps=eps,
        )  # fmt: skip
        return u.to(x.dtype)

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

        ``temperature`` is a finite number > 0 (Python or numpy); T >= 1 returns an unchanged copy (as the
        official sampler does).
        """
        temperature = as_float("temperature", temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if temperature >= 1.0:
            return self._replace()
        lw = torch.log_softmax(self.logweights.float() / temperature, dim=1).to(self.logweights.dtype)
        ls = self.logstds + 0.5 * math.log(temperature)
        return self._replace(logweights=lw, logstds=ls)

    def dropout(self, p: float, generator: torch.Generator | None = None) -> GMFlowPolicy:
        """Drop each (sample, component) with probability p in [0, 1) (logweight -inf), never all of a sample's.

        With validation on, a pixel left without a finite logweight (its only finite components dropped) raises.
        """
        p = as_float("dropout p", p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must lie in [0, 1), got {p}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if p == 0.0:
            return self._replace()
        b, k = self.means.shape[:2]
        gen_device = generator.device if generator is not None else self.means.device
        drop = torch.rand((b, k), generator=generator, device=gen_device).to(self.means.device) < p
        drop &= ~drop.all(dim=1, keepdim=True)
        return self.keep_components(~drop, what="logweights after dropout")

    def keep_components(self, keep: torch.Tensor, what: str = "logweights after keep_components") -> GMFlowPolicy:
        """A copy whose components outside ``keep`` ((B, K) bool) get logweight -inf ([eq:dropout]); backend and
        validation settings are kept. With validation on, a pixel left without a finite logweight raises."""
        mask = keep.to(self.logweights.device).reshape(*keep.shape, *([1] * (self.logweights.dim() - 2)))
        logweights = self.logweights.masked_fill(~mask, float("-inf"))
        if self._validating():
            check_logweights(what, logweights)
        return self._replace(logweights=logweights)

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
        grid: (B, N, C, *S) velocities at N grid points spanning raw time [r_dst, r_src]; finite.
        x_src: (B, C, *S), finite; sigma_src: in [0, 1], a number, 0-d or (B,) tensor. The policy is queried
            at sigmas <= sigma_src only (above it the grid would be extrapolated past its source point); below
            ``sigma_dst`` grid mode holds the first grid point and polynomial mode extrapolates.
        segment_size: raw-time length of the segment, a finite number > 0; the grid spans
            [max(r_src - segment_size, 0), r_src].
        shift: the policy's own time shift, a positive finite number (intrinsic: keep it when changing NFE).
        mode: "grid" (linear interpolation) or "polynomial" (x0 = sum_n (r_src - r)^n x0_n).
        backend: None (auto), "torch", "triton" or "reference"; an explicit backend that cannot run these
            shapes or this device raises a ``ValueError``.
        validate: the data checks, as for :class:`GMFlowPolicy`.
        velocity_eps: the floor of sigma in the velocity and of the segment length (keyword only): None (default)
            the built-in DX_EPS = 1e-4, the official DX policy's eps.

    Example:
        >>> pol = DXPolicy(grid, x_src, 1.0, segment_size=0.5, shift=3.0)
        >>> x_mid = pol.rollout(x_src, 1.0, pol.sigma_dst, shift=3.0)
    """

    _family = "dx"
    _velocity_op = staticmethod(ops.dx_velocity)
    _rollout_op = staticmethod(ops.dx_rollout)
    _default_eps = DX_EPS

    def __init__(
        self,
        grid: torch.Tensor,
        x_src: torch.Tensor,
        sigma_src: SigmaLike,
        segment_size: float = 1.0,
        shift: float = 1.0,
        mode: str = "grid",
        backend: str | None = None,
        validate: bool | None = None,
        *,
        velocity_eps: float | None = None,
    ) -> None:
        self.validate = check_validate(validate)
        velocity_eps = check_velocity_eps(velocity_eps)
        x_src = check_latent("x_src", x_src)
        grid = check_float_tensor("grid", grid)
        b = x_src.shape[0]
        if self._check_stacked("grid", grid, x_src, "N") < 1:
            raise ValueError("grid must have at least one point (N >= 1)")
        if mode not in ("grid", "polynomial"):
            raise ValueError(f"mode must be 'grid' or 'polynomial', got {mode!r}")
        segment_size = as_float("segment_size", segment_size)
        if not segment_size > 0:
            raise ValueError(f"segment_size must be > 0, got {segment_size}")
        device = check_same_device(grid=grid, x_src=x_src)
        self.grid = grid
        self.x_src = x_src
        self.sigma_src = as_sigma("sigma_src", sigma_src, b, device)
        self.segment_size = segment_size
        self.shift = as_float("shift", shift, positive=True)
        self.mode = mode
        if self._validating():
            check_finite("grid", grid)
            self._check_source()
        self.r_src = unwarp(self.sigma_src, self.shift)
        self.r_dst = (self.r_src - segment_size).clamp(min=0.0)
        self.seg = (self.r_src - self.r_dst).clamp(min=DX_EPS if velocity_eps is None else velocity_eps)
        self._resolve(backend, device)
        self._set_velocity_eps(velocity_eps)

    @property
    def num_points(self) -> int:
        return self.grid.shape[1]

    @property
    def sigma_dst(self) -> torch.Tensor:
        """(B,) noise level at the end of the policy's segment."""
        return self.shift * self.r_dst / (1 + (self.shift - 1) * self.r_dst)

    def _tensors(self) -> DXTensors:
        """The policy in the flat layout of the ops (:mod:`piflow_kernels.ops.records`)."""
        b, n, c = self.grid.shape[:3]
        segment = DXSegment(self.r_src, self.r_dst, self.seg, self.shift, self.mode == "polynomial", self.segment_size)
        return DXTensors(self.grid.reshape(b, n, c, -1), self._flat(self.x_src), self.sigma_src, segment)

    def detach(self) -> DXPolicy:
        return self._replace(grid=self.grid.detach(), x_src=self.x_src.detach())

    def _set_velocity_eps(self, eps: float | None) -> None:
        super()._set_velocity_eps(eps)
        # the official DX policy floors its segment length with the same eps
        self.seg = (self.r_src - self.r_dst).clamp(min=DX_EPS if eps is None else eps)

    def _eps_floor(self) -> float:
        return max(self.velocity_eps, DX_EPS)

    def _eps_velocity(self, x: torch.Tensor, sigma: torch.Tensor, tensors: DXTensors) -> torch.Tensor:
        eps = self.velocity_eps
        if self._eps_exact_around_ops():  # u = (x - x0) / max(s, DX_EPS): rescale to the floor eps
            u = self._velocity_op(self.backend, x, sigma, tensors)
            s = sigma.float()
            scale = s.clamp(min=DX_EPS) / s.clamp(min=eps)
            return (u.float() * scale[:, None, None]).to(x.dtype)
        from piflow_kernels import reference

        grid, x_src, sigma_src, segment = tensors
        mode = "polynomial" if segment.polynomial else "grid"
        u = reference.dx_velocity(
            x.float(), sigma.float(), grid.float(), x_src.float(), sigma_src.float(), segment.segment_size, segment.shift,
            mode, eps=eps,
        )  # fmt: skip
        return u.to(x.dtype)

    def __repr__(self) -> str:
        b, n, c = self.grid.shape[:3]
        return (
            f"DXPolicy(B={b}, N={n}, C={c}, spatial={tuple(self.x_src.shape[2:])}, mode={self.mode!r}, "
            f"segment_size={self.segment_size}, shift={self.shift}, backend={self.backend!r})"
        )
