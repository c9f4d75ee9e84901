"""The random draws of pi-ID: where a segment starts, its window, and where in it the velocities are matched.

    >>> raw_src, segment_size = sample_segment_start(cfg, batch_size=16, generator=g)   # on the NFE grid
    >>> draws = draw_segment(cfg, segment_size, teacher_ratio=0.5, num_components=8, generator=g)

Every draw comes from ``generator`` (a ``torch.Generator``, in the official order), so a run can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from piflow_kernels.distill.piid_config import PiIDConfig

__all__ = ["SegmentDraws", "sample_segment_start", "segment_window", "draw_segment", "uniform_draws", "normal_like"]


@dataclass
class SegmentDraws:
    """The random draws of one segment (all in raw-time units, float32).

    Attributes:
        student_intervals: (B, M) raw-time lengths walked by the detached policy before each state.
        teacher_intervals: (B, M) raw-time lengths of the teacher Euler step after each state.
        keep_mask: (B, K) bool, False for components dropped from the detached GM policy; None: no dropout.
        teacher_ratio: the q the intervals were drawn with, known on the host: it bounds the substeps of
            the mean velocities without reading the intervals back (None: bounded as for q = 1).
    """

    student_intervals: torch.Tensor
    teacher_intervals: torch.Tensor
    keep_mask: torch.Tensor | None = None
    teacher_ratio: float | None = None


def uniform_draws(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws from ``generator`` (on its device), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    # non_blocking: a fresh CPU tensor is staged by the copy itself, the host need not wait for the device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device, non_blocking=True)


def normal_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal draws of the shape of ``x`` from ``generator`` (on its device), moved to ``x``'s device and dtype."""
    gen_device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(x.device, x.dtype, non_blocking=True)


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
    raw = (1.0 - uniform_draws((batch_size,), generator, device)).clamp(min=cfg.eps)
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
        drop = uniform_draws((b, num_components), generator, device) < cfg.gm_dropout
        drop &= ~drop.all(dim=1, keepdim=True)
        keep = ~drop
    span = (segment_size - segment_window(segment_size, cfg)).clamp(min=0.0)
    zeros = torch.zeros((b, 1), device=device)
    student = uniform_draws((b, m), generator, device) * ((1.0 - teacher_ratio) * span)[:, None]
    student = torch.diff(torch.sort(student, dim=1).values, dim=1, prepend=zeros)
    cuts = torch.sort(uniform_draws((b, m - 1), generator, device), dim=1).values
    teacher = torch.diff(cuts, dim=1, prepend=zeros, append=torch.ones((b, 1), device=device))
    teacher = teacher * (teacher_ratio * span)[:, None]
    return SegmentDraws(student, teacher, keep, float(teacher_ratio))
