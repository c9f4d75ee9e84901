"""Shared pieces of the DX Triton kernels: range, jit helpers, block sizes.

Flat layout as in :mod:`piflow_kernels.ops.records` (``DXTensors``, ``DXSegment``); the velocity kernels live
in :mod:`piflow_kernels.ops.dx.triton_velocity`, the rollout kernel in :mod:`piflow_kernels.ops.dx.triton_rollout`.
Algebra (docs/design.md, [eq:dx-velocity]), as in the torch twin :mod:`piflow_kernels.ops.dx.torch_twin`:
x, x_src (B, C, L); grid (B, N, C, L); per-sample (B,) tensors sigma, sigma_src, r_src, r_dst, seg.
At noise level s the policy's x0 is a weighted sum of the grid's x0 points with per-sample scalar weights
w_n (hat weights in grid mode, (r_src - r)^n in polynomial mode):

    x0 = (sum_n w_n) x_src - s_src * sum_n w_n grid_n,    u = (x - x0) / max(s, 1e-4)

Kernels:
    _dx_velocity_fwd_kernel   u, one program per (sample, L tile), looping over C; in grid mode only the
                              two grid points with non-zero weight are read (masked loads)
    _dx_velocity_bwd_kernel   grad_x = gu / s, grad_x_src = -(sum_n w_n) gu / s, grad_grid_n = s_src w_n gu / s
                              (nothing is saved: the weights are recomputed from the per-sample scalars)
    _dx_rollout_kernel        a whole rollout in one launch. Every Euler substep is linear in x and in the
                              grid, x <- (1 + g) x - g x0 with g = (s_next - s) / max(s, 1e-4), so each program
                              first runs the per-sample substep recurrence on scalars (the coefficient alpha of
                              x_start and beta_n of each grid point), then reads its tile of the grid once:
                              x_end = alpha x_start + sum_n beta_n (x_src - s_src grid_n).
                              Substep counts, sizes and start times are loaded in-kernel (no host sync);
                              samples with fewer substeps simply run fewer scalar iterations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from piflow_kernels.constants import DX_EPS

DX_EPS_K = tl.constexpr(DX_EPS)  # the library's sigma floor as a compile-time constant of the kernels
MAX_POINTS = 64  # BLOCK_N <= 64 keeps the (N, BLOCK_L) grid tile and the beta vector in registers
_TILE_ELEMENTS = 4096  # BLOCK_N * BLOCK_L: 32 fp32 registers per thread at 4 warps
_MAX_BLOCK_L = 512


@triton.jit
def _dx_weights(s, r_src, r_dst, seg, shift, o_n, N, POLYNOMIAL: tl.constexpr):
    """Weights (BLOCK_N,) of the N grid points at noise level s (scalar), zero past N.

    Grid mode: hat weights max(0, 1 - |p - n|), p = clamp((r - r_dst) / seg, 0, 1) * (N - 1), which is
    linear interpolation between floor(p) and floor(p) + 1 (and the single point when N = 1).
    Polynomial mode: (r_src - r)^n by binary exponentiation (n < 64: six squarings).
    """
    r = s / (shift + (1.0 - shift) * s)
    if POLYNOMIAL:
        base = r_src - r
        w = tl.full(o_n.shape, 1.0, tl.float32)
        for bit in tl.static_range(6):
            w = tl.where(((o_n >> bit) & 1) != 0, w * base, w)
            base = base * base
    else:
        p = tl.minimum(tl.maximum((r - r_dst) / seg, 0.0), 1.0) * tl.cast(N - 1, tl.float32)
        w = tl.maximum(1.0 - tl.abs(p - o_n.to(tl.float32)), 0.0)
    return tl.where(o_n < N, w, 0.0)


@triton.jit
def _dx_program(L, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's sample (int64), pixel offsets (BLOCK_L,) int64 with their mask, grid-point offsets (BLOCK_N,)."""
    i_b = tl.program_id(0).to(tl.int64)
    o_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    m_l = o_l < L
    return i_b, o_l.to(tl.int64), m_l, tl.arange(0, BLOCK_N)


@triton.jit
def _dx_step_weights(p_sigma, p_ssrc, p_rsrc, p_rdst, p_seg, i_b, stride_sig, stride_ss, stride_rs, stride_rd, stride_seg,
                     shift, o_n, N, POLYNOMIAL: tl.constexpr):  # fmt: skip
    """The velocity's per-sample scalars: sigma_src, clamped sigma, the grid weights (BLOCK_N,) and their sum."""
    s = tl.load(p_sigma + i_b * stride_sig).to(tl.float32)
    s_src = tl.load(p_ssrc + i_b * stride_ss).to(tl.float32)
    r_src = tl.load(p_rsrc + i_b * stride_rs).to(tl.float32)
    r_dst = tl.load(p_rdst + i_b * stride_rd).to(tl.float32)
    seg = tl.load(p_seg + i_b * stride_seg).to(tl.float32)
    b_w = _dx_weights(s, r_src, r_dst, seg, tl.cast(shift, tl.float32), o_n, N, POLYNOMIAL)
    return s_src, tl.maximum(s, DX_EPS_K), b_w, tl.sum(b_w, axis=0)



def interpreted() -> bool:
    """Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return type(_dx_weights).__name__ == "InterpretedFunction"


def range_problem(n_points: int, device: torch.device, numel: int) -> str | None:
    """Why the DX kernels cannot run an N-point grid on ``device`` (None when they can). Shapes only."""
    if n_points > MAX_POINTS:
        return f"N = {n_points} grid points > {MAX_POINTS}"
    if device.type != "cuda" and not interpreted():
        return f"tensors on {device.type} and TRITON_INTERPRET=1 was not set before import"
    if numel == 0:
        return "empty input"
    return None


def blocks(n_points: int, length: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_L) of a launch."""
    block_n = triton.next_power_of_2(n_points)
    block_l = min(triton.next_power_of_2(length), max(16, _TILE_ELEMENTS // block_n), _MAX_BLOCK_L)
    return block_n, block_l
