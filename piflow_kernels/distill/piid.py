"""pi-ID (policy imitation distillation) loss, docs/design.md "pi-ID loss" (``[eq:piid-loss]``).

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

Every random draw comes from ``generator`` (a ``torch.Generator``), so a run can be replayed. The
settings live in :mod:`.piid_config`, the random draws of a segment in :mod:`.piid_draws`; both are
re-exported here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from piflow_kernels.checks import is_real, per_sample
from piflow_kernels.distill.piid_config import PiIDConfig, teacher_ratio
from piflow_kernels.distill.piid_draws import (
    SegmentDraws,
    draw_segment,
    normal_like,
    sample_segment_start,
    segment_window,
)
from piflow_kernels.outputs import make_policy
from piflow_kernels.policies import DXPolicy, GMFlowPolicy
from piflow_kernels.timesteps import DEFAULT_SUBSTEP_RULE, SUBSTEP_CEIL_TOL, substep_count, warp

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


def _sigma(raw: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma of raw time, clamped to [0, 1] against float rounding (warp(1) may round above 1)."""
    return warp(raw.clamp(0.0, 1.0), shift).clamp(0.0, 1.0)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(x.shape[0], *([1] * (x.dim() - 1)))


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


def student_policy(output: Any, x_src: torch.Tensor, sigma_src: torch.Tensor, cfg: PiIDConfig) -> Policy:
    """The policy of a student output (GMFlowOutput, DXOutput or a mapping) at (x_src, sigma_src)."""
    return make_policy(output, x_src, sigma_src, cfg.policy_type, backend=cfg.backend, **cfg.dx_policy_kwargs())


def policy_mean_velocity(
    policy: Policy,
    x_start: torch.Tensor,
    raw_start: torch.Tensor,
    sigma_start: torch.Tensor,
    raw_end: torch.Tensor,
    shift: float,
    total_substeps: int,
    eps: float = 1e-4,
    max_steps: int | None = None,
    substep_rule: str = DEFAULT_SUBSTEP_RULE,
) -> torch.Tensor:
    """Mean policy velocity from raw_start to raw_end, differentiable (the official ``policy_average_u``).

    Samples whose interval rounds to fewer than 2 substeps (``round``, whatever the rule, as the official
    code) get the local velocity at the start; the others ``(x_start - x_end) / max(sigma_start - sigma_end, eps)``
    through an Euler rollout written in torch ops on ``policy.velocity`` (gradients reach the policy tensors
    through every substep), of as many substeps as a rollout counts under ``substep_rule`` ([eq:substeps]:
    LakonLab v0.2.0 integrates with ceil here).

    Args:
        x_start: (B, C, *S); raw_start, sigma_start, raw_end: (B,).
        max_steps: an upper bound, known on the host, of every sample's substep count under ``substep_rule``:
            the rollout runs that many substeps (a sample past its own count stays put, so the result is the
            same) and nothing is read back from the device; a count above it fails a device-side assert.
            None: the counts are read (a host sync on a GPU).
        substep_rule: "ceil" (default) or "round".
    Returns:
        (B, C, *S) in the dtype of ``x_start``.
    """
    delta = raw_start - raw_end
    small = torch.round(delta * total_substeps) < 2
    n = substep_count(delta, total_substeps, substep_rule)
    if max_steps is None:
        need_mean, need_local = not bool(small.all()), bool(small.any())
        steps = int(n.max()) if need_mean else 0
    else:
        # the count before its floor of 1: a zero-length interval (local velocity) needs no substep
        counted = torch.where(small, torch.zeros_like(n), n)
        torch._assert_async(counted.max() <= max_steps, "policy_mean_velocity: a substep count exceeds max_steps")
        need_mean, need_local, steps = max_steps >= 2, True, max_steps
    mean_u = local_u = None
    if need_mean:
        h = delta / n
        x, r, s = x_start, raw_start, sigma_start
        for step in range(steps):
            u = policy.velocity(x, s)
            r_next = (r - h).clamp(min=0.0)
            s_next = _sigma(r_next, shift)
            x_next = x + u * _bcast(s_next - s, x).to(u.dtype)
            active = n > step
            x = torch.where(_bcast(active, x), x_next, x)
            s = torch.where(active, s_next, s)
            r = torch.where(active, r_next, r)
        mean_u = (x_start - x) / _bcast((sigma_start - s).clamp(min=eps), x).to(x.dtype)
    if need_local:
        local_u = policy.velocity(x_start, sigma_start)
    if mean_u is None:
        return local_u
    if local_u is None:
        return mean_u
    return torch.where(_bcast(small, x_start), local_u, mean_u)


def _mean_velocity_max_steps(cfg: PiIDConfig, segment_sizes: list[float], teacher_ratio: float) -> int:
    """Host-side upper bound of the substeps of every mean velocity in a segment of one of ``segment_sizes``.

    A matched state's interval is its teacher step plus the window, at most ``q (size - window) + window``
    (:func:`draw_segment`), and :func:`policy_mean_velocity` takes ``round(interval * total_substeps)``
    substeps (``ceil((interval - SUBSTEP_CEIL_TOL) * total_substeps)`` under the ceil rule). float32 rounding
    moves raw times (<= 1) by a few 2^-24: the margin of 1e-6 substeps per unit of ``total_substeps`` covers it.
    With q = 0 the bound is the window's own count (0 without one).
    """
    t = cfg.total_substeps
    margin = 1e-6 * t
    bound = 0
    for size in segment_sizes:
        # segment_window's count round(size * T) at its lowest under rounding: the widest window
        n = max(math.ceil(size * t - 0.5 - margin), 1)
        window = min(cfg.window_substeps * size / n, size)
        interval = teacher_ratio * max(size - window, 0.0) + window
        if cfg.substep_rule == "ceil":
            bound = max(bound, math.ceil((interval - SUBSTEP_CEIL_TOL) * t + margin))
        else:
            bound = max(bound, math.floor(interval * t + margin + 0.5))
    return bound


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
        x_src: (B, C, *S); raw_src: float or (B,).
        segment_size: a float, or (B,) sizes of the NFE grid (``cfg.segment_sizes()``, as
            :func:`sample_segment_start` draws them): they bound the mean velocities' substeps on the host.
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
    shift = cfg.shift_for(cfg.seq_len_of(x_src))
    sizes = [float(segment_size)] if is_real(segment_size) else sorted(set(cfg.segment_sizes()))
    q = 1.0 if draws.teacher_ratio is None else draws.teacher_ratio
    max_steps = _mean_velocity_max_steps(cfg, sizes, q)
    raw_src = per_sample("raw_src", raw_src, b, device)
    segment_size = per_sample("segment_size", segment_size, b, device)
    window = segment_window(segment_size, cfg)
    student_iv = draws.student_intervals.to(device)
    teacher_iv = draws.teacher_intervals.to(device)

    detached = policy.detach()
    if draws.keep_mask is not None:
        if not isinstance(detached, GMFlowPolicy):
            raise ValueError("a dropout keep_mask applies to GMFlow policies only")
        detached = detached.keep_components(draws.keep_mask)

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
                x_a = detached.rollout(
                    x_last, sigma_last, sigma_a, cfg.total_substeps, shift=shift, substep_rule=cfg.substep_rule
                )
            with _eval_mode(teacher):  # under the caller's autocast, if any
                target = _velocity_of(teacher(x_a, sigma_a * cfg.num_train_timesteps, **teacher_kwargs)).detach()
        if target.shape != x_a.shape:
            raise ValueError(f"the teacher returned shape {tuple(target.shape)}, expected {tuple(x_a.shape)}")
        with _float32_policy_math(device):
            pred = policy_mean_velocity(
                policy, x_a, raw_a, sigma_a, raw_b - window, shift, cfg.total_substeps, cfg.eps,
                max_steps=max_steps, substep_rule=cfg.substep_rule,
            )  # fmt: skip
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
            x_dst = detached.rollout(
                x_last, sigma_last, sigma_dst, cfg.total_substeps, shift=shift, substep_rule=cfg.substep_rule
            )
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
        segment_size: raw-time length of the segment: a float, or (B,) sizes of the NFE grid
            (see :func:`piid_segment_loss_from_draws`).
        teacher_ratio: q in [0, 1] (see :func:`teacher_ratio`).
        return_x_dst: also roll the detached policy to the segment end (data-free mode).
    Returns:
        (loss 0-d, x_dst (B, C, *S) or None, raw_dst (B,)).

    Example:
        >>> loss, _, _ = piid_segment_loss(student, teacher, x_src, 1.0, 0.5, PiIDConfig(nfe=2))
    """
    b, device = x_src.shape[0], x_src.device
    raw_src = per_sample("raw_src", raw_src, b, device)
    sizes = per_sample("segment_size", segment_size, b, device)
    sigma_src = _sigma(raw_src, cfg.shift_for(cfg.seq_len_of(x_src)))
    output = student(x_src, sigma_src * cfg.num_train_timesteps, **dict(student_kwargs or {}))
    policy = student_policy(output, x_src, sigma_src, cfg)
    k = policy.num_components if isinstance(policy, GMFlowPolicy) else None
    draws = draw_segment(cfg, sizes, teacher_ratio, k, generator)
    # segment_size as given: a float tells piid_segment_loss_from_draws the exact size on the host
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """Data-dependent pi-ID loss (official ``PiFlowImitation.forward_train``).

    Draws, from ``generator`` and in this order: the segment start (:func:`sample_segment_start`),
    the noise ``eps`` of ``x_src = (1 - sigma_src) x0 + sigma_src eps``, then the segment's draws.

    Args:
        x0: (B, C, *S) real data (latents).
        iteration: the training iteration, for the teacher-ratio decay.
    Returns:
        (loss 0-d, logs {"loss": the detached loss (0-d tensor: not read back), "teacher_ratio": float}).
    """
    q = teacher_ratio(cfg, iteration)
    b = x0.shape[0]
    raw_src, segment_size = sample_segment_start(cfg, b, generator, x0.device)
    sigma_src = _sigma(raw_src, cfg.shift_for(cfg.seq_len_of(x0)))
    noise = normal_like(x0, generator)
    s = _bcast(sigma_src, x0).to(x0.dtype)
    x_src = (1 - s) * x0 + s * noise
    loss, _, _ = piid_segment_loss(
        student, teacher, x_src, raw_src, segment_size, cfg, q, generator, student_kwargs, teacher_kwargs
    )
    return loss, {"loss": loss.detach(), "teacher_ratio": q}


def piid_data_free_segments(
    student: Any,
    teacher: Any,
    noise: torch.Tensor,
    cfg: PiIDConfig,
    iteration: int = 0,
    generator: torch.Generator | None = None,
    student_kwargs: Mapping[str, Any] | None = None,
    teacher_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor | float]]]:
    """Data-free pi-ID (official ``PiFlowImitationDataFree``): walk all nfe segments from noise at raw time 1.

    Yields ``(weighted_loss, logs)`` per segment, ``weighted_loss = segment_size * segment_loss`` (the
    sizes sum to 1). Call ``backward()`` on each yielded loss before asking for the next: the next
    segment starts from the detached policy rollout, so no graph spans two segments.

    Args:
        noise: (B, C, *S) pure noise (x at sigma = 1).
    Logs:
        "loss" (weighted), "loss_step{i}" (unweighted): detached 0-d tensors (not read back);
        "teacher_ratio", "segment_size", "step": floats.

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
            "loss": weighted.detach(),
            f"loss_step{step}": loss.detach(),
            "teacher_ratio": q,
            "segment_size": size,
            "step": float(step),
        }
        yield weighted, logs
        if not last:
            x_src, raw_src = x_dst.detach(), raw_dst
