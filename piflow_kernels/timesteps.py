"""Time shift between raw time ``r`` in [0, 1] and noise level ``sigma`` (docs/design.md#conventions).

    >>> warp(0.5, shift=3.0)
    0.75
    >>> unwarp(warp(0.3, 3.0), 3.0)  # doctest: +ELLIPSIS
    0.3...
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch

T = TypeVar("T", float, torch.Tensor)


def warp(r: T, shift: float | torch.Tensor = 1.0) -> T:
    """sigma = shift * r / (1 + (shift - 1) * r); works elementwise on floats and tensors."""
    return shift * r / (1 + (shift - 1) * r)


def unwarp(sigma: T, shift: float | torch.Tensor = 1.0) -> T:
    """r = sigma / (shift + (1 - shift) * sigma), the inverse of :func:`warp`."""
    return sigma / (shift + (1 - shift) * sigma)


def dynamic_shift(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_logshift: float = 0.5,
    max_logshift: float = 1.15,
) -> float:
    """FLUX-style resolution-dependent shift: ``log(shift)`` linear in the sequence length.

    ``seq_len`` is the number of latent positions (H*W or T*H*W).
    """
    if max_seq_len == base_seq_len:
        raise ValueError("dynamic_shift: max_seq_len must differ from base_seq_len")
    slope = (max_logshift - base_logshift) / (max_seq_len - base_seq_len)
    return math.exp(base_logshift + (seq_len - base_seq_len) * slope)


def substep_schedule(
    sigma_start: torch.Tensor, sigma_end: torch.Tensor, total_substeps: int, shift: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample substep plan of a rollout (docs/design.md#rollout), without host synchronisation.

    Args:
        sigma_start, sigma_end: (B,) float32.
    Returns:
        n_substeps (B,) int32 = max(1, round((r_start - r_end) * total_substeps)),
        substep_size (B,) float32 = (r_start - r_end) / n_substeps, r_start (B,) float32.
    """
    r_start = unwarp(sigma_start, shift)
    r_end = unwarp(sigma_end, shift)
    delta = r_start - r_end
    n_substeps = torch.round(delta * total_substeps).clamp(min=1)
    substep_size = delta / n_substeps
    return n_substeps.to(torch.int32), substep_size, r_start


def sigma_table(
    sigma_start: torch.Tensor, n_substeps: torch.Tensor, substep_size: torch.Tensor, r_start: torch.Tensor, shift: float
) -> list[torch.Tensor]:
    """Every substep's sigma at once: rows 0..max(n) of (B,) float32, sample b frozen after its n_b substeps.

    Row k is warp(max(r_start - k h, 0)); built in one vectorised step instead of ~8 tiny ops per substep
    (measured 224 -> 200 ms for the B=16, K=32, C=4, 32x32, 128-substep rollout on 2 cores). The CPU path
    reads max(n) on the host; the Triton path never does.
    """
    n = n_substeps.long()
    n_max = int(n.max())
    k = torch.arange(1, n_max + 1, dtype=torch.float32, device=sigma_start.device)[:, None]
    r = (r_start.float()[None] - k * substep_size.float()[None]).clamp(min=0.0)
    table = shift * r / (1.0 + (shift - 1.0) * r)
    table = torch.cat([sigma_start.float()[None], table])  # (n_max + 1, B)
    frozen = table.gather(0, n[None]).expand_as(table)
    steps = torch.arange(n_max + 1, device=sigma_start.device)[:, None]
    table = torch.where(steps <= n[None], table, frozen)
    return list(table.unbind(0))
