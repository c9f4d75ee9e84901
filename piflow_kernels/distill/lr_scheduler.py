"""The learning-rate schedule: linear warm-up, then constant or a cosine decay to a floor.

    >>> sched = build_lr_scheduler(optimizer, cfg.optim, cfg.max_iters)
    >>> optimizer.step(); sched.step()         # once per optimizer step

The multiplier of step ``it`` (0-based) is :func:`lr_factor`; a ``LambdaLR`` applies it, so the
schedule's checkpoint state is the standard one (``last_epoch``, base learning rates).
"""

from __future__ import annotations

import math

import torch

__all__ = ["LR_DECAYS", "warmup_factor", "lr_factor", "build_lr_scheduler"]

LR_DECAYS = ("none", "cosine")


def warmup_factor(iteration: int, warmup_iters: int, warmup_ratio: float) -> float:
    """LR multiplier at step ``iteration``: linear from ``warmup_ratio`` to 1 over ``warmup_iters``, then 1."""
    if warmup_iters <= 0 or iteration >= warmup_iters:
        return 1.0
    return warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup_iters


def lr_factor(
    iteration: int,
    warmup_iters: int,
    warmup_ratio: float,
    max_iters: int,
    decay: str = "none",
    min_ratio: float = 0.0,
) -> float:
    """LR multiplier at step ``iteration``: the warm-up, then 1 (``decay="none"``) or a cosine from 1
    at the end of the warm-up to ``min_ratio`` at ``max_iters`` (``decay="cosine"``)."""
    if decay not in LR_DECAYS:
        raise ValueError(f"decay must be one of {LR_DECAYS}, got {decay!r}")
    if iteration < warmup_iters or decay == "none":
        return warmup_factor(iteration, warmup_iters, warmup_ratio)
    span = max(max_iters - warmup_iters, 1)
    progress = min((iteration - warmup_iters) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of an :class:`~piflow_kernels.distill.config.OptimConfig` over ``max_iters`` steps."""
    o = optim_cfg

    def factor(it: int) -> float:
        return lr_factor(it, o.warmup_iters, o.warmup_ratio, max_iters, o.lr_decay, o.lr_min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
