"""Helpers every Triton launcher shares (GM and DX)."""

from __future__ import annotations

import torch


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, looked up at each launch (the tests swap in NaN-filled
    allocations, so an element a kernel never writes fails the comparison)."""
    return torch.empty(shape, dtype=dtype, device=device)


def vec(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (B,) per-sample scalar as a contiguous tensor of ``dtype`` (expanded 0-d sigmas have stride 0)."""
    return t.to(dtype).contiguous()


__all__ = ["alloc", "vec"]
