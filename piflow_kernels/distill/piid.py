"""pi-ID (policy imitation distillation) loss, DESIGN.md section 6.

One segment: the student sees ``(x_src, sigma_src)`` and outputs a policy; a detached copy of the
policy (GM dropout applied to the copy only) is rolled out, without grad, through ``M`` intermediate
states drawn in the segment; at each state the teacher's velocity (no grad) is the target for the
live policy's velocity (with grad). With a teacher ratio ``q > 0`` part of the segment is walked by
teacher Euler steps instead (scheduled trajectory mixing). The loss is
``0.5 * loss_scale * mean((u_policy - u_teacher)^2)``: the official ``DiffusionMSELoss`` (half the
mean squared error, times a constant ``rescale_cfg.scale``).

Two modes:

- data-dependent (:func:`piid_loss_data_dependent`): the segment start is drawn on the NFE grid and
  ``x_src`` is real data diffused forward with fresh noise;
- data-free (:func:`piid_data_free_segments`): start from noise at raw time 1 and walk all NFE
  segments with the student's own detached rollouts, one loss (and one backward) per segment,
  weighted by its segment size.

    >>> cfg = PiIDConfig(nfe=2, total_substeps=32)
    >>> loss, logs = piid_loss_data_dependent(student, teacher, x0, cfg, iteration=it, generator=g)
    >>> loss.backward()

Every random draw comes from ``generator`` (a ``torch.Generator``), so a run can be replayed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from piflow_kernels.ops.dispatch import BACKENDS
from piflow_kernels.outputs import POLICY_TYPES, make_policy
from piflow_kernels.policies import DXPolicy, GMFlowPolicy
from piflow_kernels.timesteps import dynamic_shift, warp

__all__ = [
    "PiIDConfig",
    "SegmentDraws",
    "teacher_ratio",
    "sample_segment_start",
    "segment_window",
    "draw_segment",
    "student_policy",
    "policy_mean_velocity",
    "piid_segment_loss",
    "piid_segment_loss_from_draws",
    "piid_loss_data_dependent",
    "piid_data_free_segments",
]

Policy = GMFlowPolicy | DXPolicy


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class PiIDConfig:
    """Settings of the pi-ID loss (defaults as the official code; configs there use e.g. ``loss_scale`` 3 or 30).

    Attributes:
        nfe: number of student evaluations (segments) at sampling time.
        policy_type: "GMFlow" or "DX".
        total_substeps: policy substeps per unit raw time for every rollout.
        num_intermediate_states: M, states per segment where the velocities are matched.
        window_substeps: > 0 matches the policy's mean velocity over a window of that many substeps.
        gm_dropout: probability of dropping a component of the detached GM policy (GMFlow only).
        final_step_size_scale: f, the last segment is f times the others (segments 1 / (nfe - 1 + f)).
        shift: time shift of raw time -> sigma (ignored with ``use_dynamic_shifting``).
        use_dynamic_shifting, base_seq_len, max_seq_len, base_logshift, max_logshift: FLUX-style
            resolution-dependent shift from the latent sequence length (prod of spatial dims).
        num_decay_iters: the teacher ratio decays 1 -> 0 linearly over this many iterations (0: always 0).
        loss_scale: constant factor of the loss (the official ``rescale_cfg.scale``).
        num_train_timesteps: timestep = sigma * num_train_timesteps for the student and the teacher.
        dx_segment_size: the DX policy's segment (None: the NFE segment size 1 / (nfe - 1 + f)).
        dx_shift: the DX policy's own shift (None: ``shift``).
        dx_mode: "grid" or "polynomial".
        eps: small value: raw-time floor of the segment start, denominator floor of mean velocities.
        backend: policy backend (None: auto, see :mod:`piflow_kernels.backend`).
    """

    nfe: int = 4
    policy_type: str = "GMFlow"
    total_substeps: int = 128
    num_intermediate_states: int = 2
    window_substeps: int = 0
    gm_dropout: float = 0.0
    final_step_size_scale: float = 1.0
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_logshift: float = 0.5
    max_logshift: float = 1.15
    num_decay_iters: int = 0
    loss_scale: float = 1.0
    num_train_timesteps: float = 1000
    dx_segment_size: float | None = None
    dx_shift: float | None = None
    dx_mode: str = "grid"
    eps: float = 1e-4
    backend: str | None = None

    def __post_init__(self) -> None:
        def need_int(name: str, low: int) -> None:
            v = getattr(self, name)
            if not _is_int(v):
                raise ValueError(f"PiIDConfig.{name} must be an int, got {v!r} ({type(v).__name__})")
            if v < low:
                raise ValueError(f"PiIDConfig.{name} must be >= {low}, got {v}")

        def need_real(name: str, positive: bool = False, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not _is_real(v):
                raise ValueError(f"PiIDConfig.{name} must be a finite number, got {v!r}")
            if positive and not v > 0:
                raise ValueError(f"PiIDConfig.{name} must be > 0, got {v}")
            setattr(self, name, float(v))

        need_int("nfe", 1)
        need_int("total_substeps", 1)
        need_int("num_intermediate_states", 1)
        need_int("window_substeps", 0)
        need_int("num_decay_iters", 0)
        need_int("base_seq_len", 1)
        need_int("max_seq_len", 1)
        if self.policy_type not in POLICY_TYPES:
            raise ValueError(f"PiIDConfig.policy_type must be one of {POLICY_TYPES}, got {self.policy_type!r}")
        need_real("gm_dropout")
        if not 0.0 <= self.gm_dropout < 1.0:
            raise ValueError(f"PiIDConfig.gm_dropout must lie in [0, 1), got {self.gm_dropout}")
        if self.gm_dropout > 0 and self.policy_type != "GMFlow":
            raise ValueError(f"PiIDConfig.gm_dropout applies to GMFlow policies only; set it to 0 for {self.policy_type!r}")
        need_real("final_step_size_scale", positive=True)
        need_real("shift", positive=True)
        need_real("base_logshift")
        need_real("max_logshift")
        if not isinstance(self.use_dynamic_shifting, bool):
            raise ValueError(f"PiIDConfig.use_dynamic_shifting must be a bool, got {self.use_dynamic_shifting!r}")
        if self.use_dynamic_shifting and self.base_seq_len == self.max_seq_len:
            raise ValueError("PiIDConfig: dynamic shifting needs base_seq_len != max_seq_len")
        need_real("loss_scale", positive=True)
        need_real("num_train_timesteps", positive=True)
        need_real("dx_segment_size", positive=True, allow_none=True)
        need_real("dx_shift", positive=True, allow_none=True)
        if self.dx_mode not in ("grid", "polynomial"):
            raise ValueError(f"PiIDConfig.dx_mode must be 'grid' or 'polynomial', got {self.dx_mode!r}")
        need_real("eps", positive=True)
        if not self.eps < 0.1:
            raise ValueError(f"PiIDConfig.eps must be small (< 0.1), got {self.eps}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"PiIDConfig.backend must be None or one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PiIDConfig:
        """Build from a mapping (e.g. a TOML/JSON table); unknown keys raise a ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PiIDConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def base_segment_size(self) -> float:
        """Raw-time length of every segment but the last: 1 / (nfe - 1 + f)."""
        return 1.0 / (self.nfe - 1 + self.final_step_size_scale)

    @property
    def final_segment_size(self) -> float:
        """Raw-time length of the last segment: f / (nfe - 1 + f)."""
        return self.final_step_size_scale * self.base_segment_size

    def segment_sizes(self) -> list[float]:
        """The nfe segment lengths from raw time 1 down to 0 (they sum to 1)."""
        return [self.base_segment_size] * (self.nfe - 1) + [self.final_segment_size]

    def shift_for(self, seq_len: int) -> float:
        """The raw-time -> sigma shift for latents with ``seq_len`` positions."""
        if self.use_dynamic_shifting:
            return dynamic_shift(seq_len, self.base_seq_len, self.max_seq_len, self.base_logshift, self.max_logshift)
        return self.shift

    def dx_policy_kwargs(self) -> dict[str, Any]:
        """segment_size, shift and mode of the DX policy (intrinsic: keep them at sampling time)."""
        return {
            "segment_size": self.base_segment_size if self.dx_segment_size is None else self.dx_segment_size,
            "shift": self.shift if self.dx_shift is None else self.dx_shift,
            "mode": self.dx_mode,
        }


def teacher_ratio(cfg: PiIDConfig, iteration: int) -> float:
    """Scheduled-mixing teacher ratio: 1 - min(iteration, n) / n for n = num_decay_iters > 0, else 0."""
    n = cfg.num_decay_iters
    if n <= 0:
        return 0.0
    return 1.0 - min(max(int(iteration), 0), n) / n


@dataclass
class SegmentDraws:
    """The random draws of one segment (all in raw-time units, float32).

    Attributes:
        student_intervals: (B, M) raw-time lengths walked by the detached policy before each state.
        teacher_intervals: (B, M) raw-time lengths of the teacher Euler step after each state.
        keep_mask: (B, K) bool, False for components dropped from the detached GM policy; None: no dropout.
    """

    student_intervals: torch.Tensor
    teacher_intervals: torch.Tensor
    keep_mask: torch.Tensor | None = None


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws from ``generator`` (on its device), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device, x.dtype)


def _per_sample(value: float | torch.Tensor, batch: int, device: torch.device, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.dim() == 0:
        return t.expand(batch).clone()
    if t.numel() == batch:
        return t.reshape(batch).to(torch.float32)
    raise ValueError(f"{name} must be a float, a 0-d tensor or a ({batch},) tensor, got shape {tuple(t.shape)}")


def _sigma(raw: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma of raw time, clamped to [0, 1] against float rounding (warp(1) may round above 1)."""
    return warp(raw.clamp(0.0, 1.0), shift).clamp(0.0, 1.0)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(x.shape[0], *([1] * (x.dim() - 1)))


def _seq_len(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


@contextlib.contextmanager
def _eval_mode(module: Any):
    """Put an nn.Module teacher in eval mode for the duration (as the official ``module_eval``)."""
    if isinstance(module, nn.Module) and module.training:
        module.eval()
        try:
            yield
        finally:
            module.train()
    else:
        yield


def _float32_policy_math(device: torch.device):
    """Autocast off around policy ops: a caller's bf16 autocast (for the student and teacher) must not
    lower the policy's float32 math (its einsums would otherwise run in bf16)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _velocity_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    from piflow_kernels.distill.teachers import as_velocity

    return as_velocity(output)


def sample_segment_start(
    cfg: PiIDConfig,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw segment starts on the NFE grid, as the official ``PiFlowImitation.sample_t``.

    A raw time ``r ~ U(0, 1]`` picks the segment containing it; the start is that segment's upper
    end ``(i - (1 - f)) * base`` (i = 1..nfe), the segment size ``base`` (``f * base`` for i = 1).

    Returns:
        raw_src (B,) float32 in [eps, 1], segment_size (B,) float32.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    f = cfg.final_step_size_scale
    base = cfg.base_segment_size
    raw = (1.0 - _rand((batch_size,), generator, device)).clamp(min=cfg.eps)
    idx = torch.ceil(raw / base + (1.0 - f)).clamp(min=1, max=cfg.nfe)
    raw_src = ((idx - (1.0 - f)) * base).clamp(min=cfg.eps, max=1.0)
    segment_size = torch.where(idx == 1, cfg.final_segment_size, base).to(torch.float32)
    return raw_src, segment_size


def segment_window(segment_size: torch.Tensor, cfg: PiIDConfig) -> torch.Tensor:
    """(B,) window length ``min(window_substeps * substep, segment_size)`` with the segment's substep size."""
    n = torch.round(segment_size * cfg.total_substeps).clamp(min=1)
    return torch.minimum(cfg.window_substeps * segment_size / n, segment_size)


def draw_segment(
    cfg: PiIDConfig,
    segment_size: torch.Tensor,
    teacher_ratio: float = 0.0,
    num_components: int | None = None,
    generator: torch.Generator | None = None,
) -> SegmentDraws:
    """Draw one segment's randomness, in the official order: dropout mask, student then teacher intervals.

    With ``span = segment_size - window``: M sorted uniforms in ``[0, (1 - q) span]`` give the student
    intervals (their differences, starting from 0); M - 1 sorted uniforms in [0, 1] split ``q span``
    into the M teacher intervals. The dropout mask draws as :meth:`GMFlowPolicy.dropout`.

    Args:
        segment_size: (B,) raw-time segment lengths.
        teacher_ratio: q in [0, 1].
        num_components: K of the GM policy (needed when ``cfg.gm_dropout > 0``).
    """
    if not 0.0 <= teacher_ratio <= 1.0:
        raise ValueError(f"teacher_ratio must lie in [0, 1], got {teacher_ratio}")
    b = segment_size.shape[0]
    m = cfg.num_intermediate_states
    device = segment_size.device
    keep = None
    if cfg.policy_type == "GMFlow" and cfg.gm_dropout > 0:
        if num_components is None:
            raise ValueError("draw_segment needs num_components for GM dropout")
        drop = _rand((b, num_components), generator, device) < cfg.gm_dropout
        drop &= ~drop.all(dim=1, keepdim=True)
        keep = ~drop
    span = (segment_size - segment_window(segment_size, cfg)).clamp(min=0.0)
    zeros = torch.zeros((b, 1), device=device)
    student = _rand((b, m), generator, device) * ((1.0 - teacher_ratio) * span)[:, None]
    student = torch.diff(torch.sort(student, dim=1).values, dim=1, prepend=zeros)
    cuts = torch.sort(_rand((b, m - 1), generator, device), dim=1).values
    teacher = torch.diff(cuts, dim=1, prepend=zeros, append=torch.ones((b, 1), device=device))
    teacher = teacher * (teacher_ratio * span)[:, None]
    return SegmentDraws(student, teacher, keep)


def student_policy(output: Any, x_src: torch.Tensor, sigma_src: torch.Tensor, cfg: PiIDConfig) -> Policy:
    """The policy of a student output (GMFlowOutput, DXOutput or a mapping) at (x_src, sigma_src)."""
    return make_policy(output, x_src, sigma_src, cfg.policy_type, backend=cfg.backend, **cfg.dx_policy_kwargs())


def _apply_keep_mask(policy: GMFlowPolicy, keep: torch.Tensor) -> GMFlowPolicy:
    mask = keep.to(policy.logweights.device).reshape(*keep.shape, *([1] * (policy.logweights.dim() - 2)))
    return GMFlowPolicy(
        policy.means,
        policy.logweights.masked_fill(~mask, float("-inf")),
        policy.logstds,
        policy.x_src,
        policy.sigma_src,
        backend=policy.backend,
    )


def policy_mean_velocity(
    policy: Policy,
    x_start: torch.Tensor,
    raw_start: torch.Tensor,
    sigma_start: torch.Tensor,
    raw_end: torch.Tensor,
    shift: float,
    total_substeps: int,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Mean policy velocity from raw_start to raw_end, differentiable (the official ``policy_average_u``).

    Samples whose interval rounds to fewer than 2 substeps get the local velocity at the start;
    the others ``(x_start - x_end) / max(sigma_start - sigma_end, eps)`` through an Euler rollout
    written in torch ops on ``policy.velocity`` (gradients reach the policy tensors through every
    substep).

    Args:
        x_start: (B, C, *S); raw_start, sigma_start, raw_end: (B,).
    Returns:
        (B, C, *S) in the dtype of ``x_start``.
    """
    delta = raw_start - raw_end
    rounded = torch.round(delta * total_substeps)
    small = rounded < 2
    mean_u = local_u = None
    if not bool(small.all()):
        n = rounded.clamp(min=1)
        h = delta / n
        x, r, s = x_start, raw_start, sigma_start
        for step in range(int(n.max())):
            u = policy.velocity(x, s)
            r_next = (r - h).clamp(min=0.0)
            s_next = _sigma(r_next, shift)
            x_next = x + u * _bcast(s_next - s, x).to(u.dtype)
            active = n > step
            x = torch.where(_bcast(active, x), x_next, x)
            s = torch.where(active, s_next, s)
            r = torch.where(active, r_next, r)
        mean_u = (x_start - x) / _bcast((sigma_start - s).clamp(min=eps), x).to(x.dtype)
    if bool(small.any()):
        local_u = policy.velocity(x_start, sigma_start)
    if mean_u is None:
        return local_u
    if local_u is None:
        return mean_u
    return torch.where(_bcast(small, x_start), local_u, mean_u)


def piid_segment_loss_from_draws(
    policy: Policy,
    teacher: Any,
    x_src: torch.Tensor,
    raw_src: float | torch.Tensor,
    segment_size: float | torch.Tensor,
    cfg: PiIDConfig,
    draws: SegmentDraws,
    teacher_kwargs: Mapping[str, Any] | None = None,
    return_x_dst: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The pi-ID loss of one segment for a live policy and explicit random draws (see :func:`piid_segment_loss`).

    Args:
        policy: the student's policy built at (x_src, warp(raw_src)), with grad.
        teacher: ``teacher(x_t, timestep, **teacher_kwargs) -> velocity``, queried without grad in eval mode.
        x_src: (B, C, *S); raw_src, segment_size: float or (B,).
        draws: from :func:`draw_segment` (their teacher ratio is baked into the intervals).
    Returns:
        loss (0-d float32), x_dst (B, C, *S) at raw_dst (detached) or None, raw_dst (B,) = max(raw_src - segment_size, 0).
    """
    teacher_kwargs = dict(teacher_kwargs or {})
    b, device = x_src.shape[0], x_src.device
    m = cfg.num_intermediate_states
    if draws.student_intervals.shape != (b, m) or draws.teacher_intervals.shape != (b, m):
        raise ValueError(
            f"draws must hold ({b}, {m}) intervals, got {tuple(draws.student_intervals.shape)} and "
            f"{tuple(draws.teacher_intervals.shape)}"
        )
    shift = cfg.shift_for(_seq_len(x_src))
    raw_src = _per_sample(raw_src, b, device, "raw_src")
    segment_size = _per_sample(segment_size, b, device, "segment_size")
    window = segment_window(segment_size, cfg)
    student_iv = draws.student_intervals.to(device)
    teacher_iv = draws.teacher_intervals.to(device)

    detached = policy.detach()
    if draws.keep_mask is not None:
        if not isinstance(detached, GMFlowPolicy):
            raise ValueError("a dropout keep_mask applies to GMFlow policies only")
        detached = _apply_keep_mask(detached, draws.keep_mask)

    x_last = x_src.detach()
    raw_last = raw_src
    sigma_last = _sigma(raw_src, shift)
    sq_errors = []
    for i in range(m):
        raw_a = (raw_last - student_iv[:, i]).clamp(min=0.0)
        raw_b = (raw_a - teacher_iv[:, i]).clamp(min=0.0)
        # min(): warp is monotone, but float rounding could put sigma_a a hair above sigma_last
        sigma_a = torch.minimum(_sigma(raw_a, shift), sigma_last)
        with torch.no_grad():
            with _float32_policy_math(device):
                x_a = detached.rollout(x_last, sigma_last, sigma_a, total_substeps=cfg.total_substeps, shift=shift)
            with _eval_mode(teacher):  # under the caller's autocast, if any
                target = _velocity_of(teacher(x_a, sigma_a * cfg.num_train_timesteps, **teacher_kwargs)).detach()
        if target.shape != x_a.shape:
            raise ValueError(f"the teacher returned shape {tuple(target.shape)}, expected {tuple(x_a.shape)}")
        with _float32_policy_math(device):
            pred = policy_mean_velocity(policy, x_a, raw_a, sigma_a, raw_b - window, shift, cfg.total_substeps, cfg.eps)
            sq_errors.append((pred.float() - target.float()).square().mean())
            sigma_b = torch.minimum(_sigma(raw_b, shift), sigma_a)
            x_last = x_a + target.to(x_a.dtype) * _bcast(sigma_b - sigma_a, x_a).to(x_a.dtype)
        raw_last, sigma_last = raw_b, sigma_b
    # every state has B*C*prod(S) entries, so the mean of per-state means is the mean over all
    loss = 0.5 * cfg.loss_scale * torch.stack(sq_errors).mean()

    raw_dst = (raw_src - segment_size).clamp(min=0.0)
    x_dst = None
    if return_x_dst:
        sigma_dst = torch.minimum(_sigma(raw_dst, shift), sigma_last)
        with _float32_policy_math(device):
            x_dst = detached.rollout(x_last, sigma_last, sigma_dst, total_substeps=cfg.total_substeps, shift=shift)
    return loss, x_dst, raw_dst


def piid_segment_loss(
    student: Any,
    teacher: Any,
    x_src: torch.Tensor,
    raw_src: float | torch.Tensor,
    segment_size: float | torch.Tensor,
    cfg: PiIDConfig,
    teacher_ratio: float = 0.0,
    generator: torch.Generator | None = None,
    student_kwargs: Mapping[str, Any] | None = None,
    teacher_kwargs: Mapping[str, Any] | None = None,
    return_x_dst: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """pi-ID loss of one segment starting at (x_src, raw_src), as the official ``piid_segment``.

    Calls ``student(x_src, sigma_src * num_train_timesteps, **student_kwargs)`` (a GMFlowOutput,
    DXOutput or mapping), builds its policy, draws the segment's randomness from ``generator``
    (:func:`draw_segment`) and evaluates :func:`piid_segment_loss_from_draws`.

    Args:
        student, teacher: callables ``f(x_t, timestep, **kwargs)``; the teacher returns a velocity.
        x_src: (B, C, *S) noisy latents at raw time ``raw_src`` (float or (B,)).
        segment_size: raw-time length of the segment (float or (B,)).
        teacher_ratio: q in [0, 1] (see :func:`teacher_ratio`).
        return_x_dst: also roll the detached policy to the segment end (data-free mode).
    Returns:
        (loss 0-d, x_dst (B, C, *S) or None, raw_dst (B,)).

    Example:
        >>> loss, _, _ = piid_segment_loss(student, teacher, x_src, 1.0, 0.5, PiIDConfig(nfe=2))
    """
    b, device = x_src.shape[0], x_src.device
    raw_src = _per_sample(raw_src, b, device, "raw_src")
    segment_size = _per_sample(segment_size, b, device, "segment_size")
    sigma_src = _sigma(raw_src, cfg.shift_for(_seq_len(x_src)))
    output = student(x_src, sigma_src * cfg.num_train_timesteps, **dict(student_kwargs or {}))
    policy = student_policy(output, x_src, sigma_src, cfg)
    k = policy.num_components if isinstance(policy, GMFlowPolicy) else None
    draws = draw_segment(cfg, segment_size, teacher_ratio, k, generator)
    return piid_segment_loss_from_draws(policy, teacher, x_src, raw_src, segment_size, cfg, draws, teacher_kwargs, return_x_dst)


def piid_loss_data_dependent(
    student: Any,
    teacher: Any,
    x0: torch.Tensor,
    cfg: PiIDConfig,
    iteration: int = 0,
    generator: torch.Generator | None = None,
    student_kwargs: Mapping[str, Any] | None = None,
    teacher_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Data-dependent pi-ID loss (official ``PiFlowImitation.forward_train``).

    Draws, from ``generator`` and in this order: the segment start (:func:`sample_segment_start`),
    the noise ``eps`` of ``x_src = (1 - sigma_src) x0 + sigma_src eps``, then the segment's draws.

    Args:
        x0: (B, C, *S) real data (latents).
        iteration: the training iteration, for the teacher-ratio decay.
    Returns:
        (loss 0-d, logs {"loss", "teacher_ratio"}).
    """
    q = teacher_ratio(cfg, iteration)
    b = x0.shape[0]
    raw_src, segment_size = sample_segment_start(cfg, b, generator, x0.device)
    sigma_src = _sigma(raw_src, cfg.shift_for(_seq_len(x0)))
    noise = _randn_like(x0, generator)
    s = _bcast(sigma_src, x0).to(x0.dtype)
    x_src = (1 - s) * x0 + s * noise
    loss, _, _ = piid_segment_loss(
        student, teacher, x_src, raw_src, segment_size, cfg, q, generator, student_kwargs, teacher_kwargs
    )
    return loss, {"loss": float(loss.detach()), "teacher_ratio": q}


def piid_data_free_segments(
    student: Any,
    teacher: Any,
    noise: torch.Tensor,
    cfg: PiIDConfig,
    iteration: int = 0,
    generator: torch.Generator | None = None,
    student_kwargs: Mapping[str, Any] | None = None,
    teacher_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[tuple[torch.Tensor, dict[str, float]]]:
    """Data-free pi-ID (official ``PiFlowImitationDataFree``): walk all nfe segments from noise at raw time 1.

    Yields ``(weighted_loss, logs)`` per segment, ``weighted_loss = segment_size * segment_loss`` (the
    sizes sum to 1). Call ``backward()`` on each yielded loss before asking for the next: the next
    segment starts from the detached policy rollout, so no graph spans two segments.

    Args:
        noise: (B, C, *S) pure noise (x at sigma = 1).
    Logs:
        "loss" (weighted), "loss_step{i}" (unweighted), "teacher_ratio", "segment_size", "step".

    Example:
        >>> for loss, logs in piid_data_free_segments(student, teacher, noise, cfg, it, g):
        ...     loss.backward()
    """
    q = teacher_ratio(cfg, iteration)
    b = noise.shape[0]
    x_src = noise.detach()
    raw_src = torch.ones((b,), dtype=torch.float32, device=noise.device)
    sizes = cfg.segment_sizes()
    for step, size in enumerate(sizes):
        last = step == len(sizes) - 1
        loss, x_dst, raw_dst = piid_segment_loss(
            student,
            teacher,
            x_src,
            raw_src,
            size,
            cfg,
            q,
            generator,
            student_kwargs,
            teacher_kwargs,
            return_x_dst=not last,
        )
        weighted = loss * size
        logs = {
            "loss": float(weighted.detach()),
            f"loss_step{step}": float(loss.detach()),
            "teacher_ratio": q,
            "segment_size": size,
            "step": float(step),
        }
        yield weighted, logs
        if not last:
            x_src, raw_src = x_dst.detach(), raw_dst
