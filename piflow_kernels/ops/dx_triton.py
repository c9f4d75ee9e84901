"""DX policy ops as Triton kernels ("triton" backend), registered as torch ops.

Flat layout and algebra as in :mod:`piflow_kernels.ops.dx_torch`: x, x_src (B, C, L); grid (B, N, C, L);
per-sample (B,) tensors sigma, sigma_src, r_src, r_dst, seg. At noise level s the policy's x0 is a
weighted sum of the grid's x0 points with per-sample scalar weights w_n (hat weights in grid mode,
(r_src - r)^n in polynomial mode):

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

Public functions (same signatures as the CPU twins) go through the torch ops ``piflow::dx_velocity``
(with autograd) and ``piflow::dx_rollout``, so ``torch.compile(fullgraph=True)`` traces them as single
nodes and a sampling loop using them can be captured in a CUDA graph. N > 64 grid points, or CPU
tensors without ``TRITON_INTERPRET=1``, fall back to the torch twin with one logged reason.

    >>> u = dx_velocity_triton(x, sigma, grid, x_src, sigma_src, r_src, r_dst, seg, 1.0, False)
    >>> x_end = dx_rollout_triton(x, grid, x_src, sigma_src, r_src, r_dst, seg, 1.0, False,
    ...                           sigma_start, n_substeps, substep_size, r_start, 1.0)
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from piflow_kernels.ops.dx_torch import dx_rollout_torch, dx_velocity_torch

logger = logging.getLogger(__name__)

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
    return s_src, tl.maximum(s, 1e-4), b_w, tl.sum(b_w, axis=0)


@triton.jit
def _dx_velocity_fwd_kernel(
    p_x,  # (B, C, L) latent at which the velocity is evaluated
    p_grid,  # (B, N, C, L) velocities at the N grid points
    p_xs,  # (B, C, L) x_src
    p_sigma,  # (B,) noise level of x
    p_ssrc,  # (B,) sigma_src
    p_rsrc,  # (B,) r_src = unwarp(sigma_src)
    p_rdst,  # (B,) r_dst, start of the segment in raw time
    p_seg,  # (B,) segment length in raw time, >= 1e-4
    p_u,  # (B, C, L) output, contiguous
    stride_xb, stride_xc, stride_xl,
    stride_gb, stride_gn, stride_gc, stride_gl,
    stride_sb, stride_sc, stride_sl,
    stride_sig, stride_ss, stride_rs, stride_rd, stride_seg,
    C, L, N,
    shift,  # the policy's own time shift
    POLYNOMIAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    i_b, o_l, m_l, o_n = _dx_program(L, BLOCK_N, BLOCK_L)
    s_src, s_c, b_w, w_sum = _dx_step_weights(p_sigma, p_ssrc, p_rsrc, p_rdst, p_seg, i_b, stride_sig, stride_ss, stride_rs,
                                              stride_rd, stride_seg, shift, o_n, N, POLYNOMIAL)  # fmt: skip
    # grid points with zero weight are never read: in grid mode only two rows of the tile move
    m_g = ((o_n < N) & (b_w != 0.0))[:, None] & m_l[None, :]
    o_g = o_n.to(tl.int64)[:, None] * stride_gn + o_l[None, :] * stride_gl

    for c in range(C):
        c64 = tl.cast(c, tl.int64)
        b_x = tl.load(p_x + i_b * stride_xb + c64 * stride_xc + o_l * stride_xl, mask=m_l, other=0.0).to(tl.float32)
        b_xs = tl.load(p_xs + i_b * stride_sb + c64 * stride_sc + o_l * stride_sl, mask=m_l, other=0.0).to(tl.float32)
        b_g = tl.load(p_grid + i_b * stride_gb + c64 * stride_gc + o_g, mask=m_g, other=0.0).to(tl.float32)
        b_x0 = w_sum * b_xs - s_src * tl.sum(b_w[:, None] * b_g, axis=0)
        b_u = (b_x - b_x0) / s_c
        tl.store(p_u + (i_b * C + c64) * L + o_l, b_u.to(p_u.dtype.element_ty), mask=m_l)


@triton.jit
def _dx_velocity_bwd_kernel(
    p_gu,  # (B, C, L) gradient of the loss w.r.t. u
    p_sigma, p_ssrc, p_rsrc, p_rdst, p_seg,  # (B,) per-sample scalars, as in the forward
    p_gx,  # (B, C, L) output grad_x, contiguous (unused unless NEED_X)
    p_gxs,  # (B, C, L) output grad_x_src, contiguous (unused unless NEED_XS)
    p_ggrid,  # (B, N, C, L) output grad_grid, contiguous (unused unless NEED_GRID)
    stride_ub, stride_uc, stride_ul,
    stride_sig, stride_ss, stride_rs, stride_rd, stride_seg,
    C, L, N,
    shift,
    POLYNOMIAL: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_XS: tl.constexpr,
    NEED_GRID: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    i_b, o_l, m_l, o_n = _dx_program(L, BLOCK_N, BLOCK_L)
    s_src, s_c, b_w, w_sum = _dx_step_weights(p_sigma, p_ssrc, p_rsrc, p_rdst, p_seg, i_b, stride_sig, stride_ss, stride_rs,
                                              stride_rd, stride_seg, shift, o_n, N, POLYNOMIAL)  # fmt: skip
    b_cg = s_src * b_w / s_c  # (BLOCK_N,) d u / d grid_n
    m_g = (o_n < N)[:, None] & m_l[None, :]

    for c in range(C):
        c64 = tl.cast(c, tl.int64)
        b_gu = tl.load(p_gu + i_b * stride_ub + c64 * stride_uc + o_l * stride_ul, mask=m_l, other=0.0).to(tl.float32)
        o_out = (i_b * C + c64) * L + o_l
        if NEED_X:
            tl.store(p_gx + o_out, (b_gu / s_c).to(p_gx.dtype.element_ty), mask=m_l)
        if NEED_XS:
            tl.store(p_gxs + o_out, (-w_sum * b_gu / s_c).to(p_gxs.dtype.element_ty), mask=m_l)
        if NEED_GRID:
            o_gg = ((i_b * N + o_n.to(tl.int64)[:, None]) * C + c64) * L + o_l[None, :]
            tl.store(p_ggrid + o_gg, (b_cg[:, None] * b_gu[None, :]).to(p_ggrid.dtype.element_ty), mask=m_g)


@triton.jit
def _dx_rollout_kernel(
    p_x,  # (B, C, L) x_start
    p_grid,  # (B, N, C, L)
    p_xs,  # (B, C, L) x_src
    p_ssrc, p_rsrc, p_rdst, p_seg,  # (B,) policy scalars
    p_s0,  # (B,) sigma_start
    p_nsub,  # (B,) int32 substep counts
    p_h,  # (B,) float32 substep size in raw time (rollout shift)
    p_r0,  # (B,) raw time at the start (rollout shift)
    p_out,  # (B, C, L) x_end, contiguous
    stride_xb, stride_xc, stride_xl,
    stride_gb, stride_gn, stride_gc, stride_gl,
    stride_sb, stride_sc, stride_sl,
    stride_ss, stride_rs, stride_rd, stride_seg, stride_s0, stride_n, stride_h, stride_r0,
    C, L, N,
    policy_shift,  # the policy's own shift (sigma -> raw time of the grid)
    shift,  # the rollout's shift (uniform substeps in its raw time)
    POLYNOMIAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    i_b, o_l, m_l, o_n = _dx_program(L, BLOCK_N, BLOCK_L)
    policy_shift = tl.cast(policy_shift, tl.float32)
    shift = tl.cast(shift, tl.float32)

    s_src = tl.load(p_ssrc + i_b * stride_ss).to(tl.float32)
    r_src = tl.load(p_rsrc + i_b * stride_rs).to(tl.float32)
    r_dst = tl.load(p_rdst + i_b * stride_rd).to(tl.float32)
    seg = tl.load(p_seg + i_b * stride_seg).to(tl.float32)
    s = tl.load(p_s0 + i_b * stride_s0).to(tl.float32)
    n_sub = tl.load(p_nsub + i_b * stride_n)
    h = tl.load(p_h + i_b * stride_h).to(tl.float32)
    r = tl.load(p_r0 + i_b * stride_r0).to(tl.float32)

    # substep recurrence on the coefficients of x_start (alpha) and of each grid x0 point (beta_n)
    alpha = tl.zeros_like(s) + 1.0
    b_beta = tl.zeros([BLOCK_N], dtype=tl.float32)
    for _ in range(n_sub):
        r_next = tl.maximum(r - h, 0.0)
        s_next = shift * r_next / (1.0 + (shift - 1.0) * r_next)
        b_w = _dx_weights(s, r_src, r_dst, seg, policy_shift, o_n, N, POLYNOMIAL)
        g = (s_next - s) / tl.maximum(s, 1e-4)
        alpha = alpha + alpha * g
        b_beta = b_beta + b_beta * g - g * b_w
        s = s_next
        r = r_next

    beta_sum = tl.sum(b_beta, axis=0)
    b_cg = s_src * b_beta
    m_g = ((o_n < N) & (b_beta != 0.0))[:, None] & m_l[None, :]
    o_g = o_n.to(tl.int64)[:, None] * stride_gn + o_l[None, :] * stride_gl
    for c in range(C):
        c64 = tl.cast(c, tl.int64)
        b_x = tl.load(p_x + i_b * stride_xb + c64 * stride_xc + o_l * stride_xl, mask=m_l, other=0.0).to(tl.float32)
        b_xs = tl.load(p_xs + i_b * stride_sb + c64 * stride_sc + o_l * stride_sl, mask=m_l, other=0.0).to(tl.float32)
        b_g = tl.load(p_grid + i_b * stride_gb + c64 * stride_gc + o_g, mask=m_g, other=0.0).to(tl.float32)
        b_out = alpha * b_x + beta_sum * b_xs - tl.sum(b_cg[:, None] * b_g, axis=0)
        tl.store(p_out + (i_b * C + c64) * L + o_l, b_out.to(p_out.dtype.element_ty), mask=m_l)


# ----------------------------------------------------------------------------------------------- launchers


def _blocks(n_points: int, length: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(n_points)
    block_l = min(triton.next_power_of_2(length), max(16, _TILE_ELEMENTS // block_n), _MAX_BLOCK_L)
    return block_n, block_l


def _dx_velocity_fwd(x, sigma, grid, x_src, sigma_src, r_src, r_dst, seg, shift, polynomial, out):
    """Launch the forward kernel writing u into ``out`` (B, C, L), contiguous."""
    b, n, c, length = grid.shape
    block_n, block_l = _blocks(n, length)
    _dx_velocity_fwd_kernel[(b, triton.cdiv(length, block_l))](
        x, grid, x_src, sigma, sigma_src, r_src, r_dst, seg, out,
        *x.stride(), *grid.stride(), *x_src.stride(),
        sigma.stride(0), sigma_src.stride(0), r_src.stride(0), r_dst.stride(0), seg.stride(0),
        c, length, n, float(shift),
        POLYNOMIAL=bool(polynomial), BLOCK_N=block_n, BLOCK_L=block_l,
    )  # fmt: skip
    return out


def _dx_velocity_bwd(grad_u, sigma, sigma_src, r_src, r_dst, seg, shift, polynomial, n_points, grad_x, grad_xs, grad_grid):
    """Launch the backward kernel; a gradient buffer passed as None is not computed."""
    b, c, length = grad_u.shape
    block_n, block_l = _blocks(n_points, length)
    dummy = grad_u  # never written when its NEED_ flag is off
    _dx_velocity_bwd_kernel[(b, triton.cdiv(length, block_l))](
        grad_u, sigma, sigma_src, r_src, r_dst, seg,
        grad_x if grad_x is not None else dummy,
        grad_xs if grad_xs is not None else dummy,
        grad_grid if grad_grid is not None else dummy,
        *grad_u.stride(),
        sigma.stride(0), sigma_src.stride(0), r_src.stride(0), r_dst.stride(0), seg.stride(0),
        c, length, n_points, float(shift),
        POLYNOMIAL=bool(polynomial), NEED_X=grad_x is not None, NEED_XS=grad_xs is not None,
        NEED_GRID=grad_grid is not None, BLOCK_N=block_n, BLOCK_L=block_l,
    )  # fmt: skip


def _dx_rollout(x_start, grid, x_src, sigma_src, r_src, r_dst, seg, policy_shift, polynomial,
                sigma_start, n_substeps, substep_size, r_start, shift, out=None):  # fmt: skip
    """Launch the whole-rollout kernel writing x_end into ``out`` (B, C, L), contiguous (a new tensor if None)."""
    if out is None:
        out = torch.empty(x_start.shape, dtype=x_start.dtype, device=x_start.device)
    b, n, c, length = grid.shape
    block_n, block_l = _blocks(n, length)
    _dx_rollout_kernel[(b, triton.cdiv(length, block_l))](
        x_start, grid, x_src, sigma_src, r_src, r_dst, seg, sigma_start, n_substeps, substep_size, r_start, out,
        *x_start.stride(), *grid.stride(), *x_src.stride(),
        sigma_src.stride(0), r_src.stride(0), r_dst.stride(0), seg.stride(0),
        sigma_start.stride(0), n_substeps.stride(0), substep_size.stride(0), r_start.stride(0),
        c, length, n, float(policy_shift), float(shift),
        POLYNOMIAL=bool(polynomial), BLOCK_N=block_n, BLOCK_L=block_l,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- torch ops


@torch.library.custom_op("piflow::dx_velocity", mutates_args=())
def _dx_velocity_op(
    x: torch.Tensor,
    sigma: torch.Tensor,
    grid: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    r_src: torch.Tensor,
    r_dst: torch.Tensor,
    seg: torch.Tensor,
    shift: float,
    polynomial: bool,
) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _dx_velocity_fwd(x, sigma, grid, x_src, sigma_src, r_src, r_dst, seg, shift, polynomial, out)


@_dx_velocity_op.register_fake
def _dx_velocity_fake(x, sigma, grid, x_src, sigma_src, r_src, r_dst, seg, shift, polynomial):
    return x.new_empty(x.shape)


@torch.library.custom_op("piflow::dx_velocity_bwd", mutates_args=())
def _dx_velocity_bwd_op(
    grad_u: torch.Tensor,
    sigma: torch.Tensor,
    sigma_src: torch.Tensor,
    r_src: torch.Tensor,
    r_dst: torch.Tensor,
    seg: torch.Tensor,
    shift: float,
    polynomial: bool,
    n_points: int,
    x_dtype: torch.dtype,
    x_src_dtype: torch.dtype,
    grid_dtype: torch.dtype,
    need_x: bool,
    need_x_src: bool,
    need_grid: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_x_src, grad_grid); a gradient that is not needed comes back as an empty tensor."""
    b, c, length = grad_u.shape
    dev = grad_u.device
    gx = torch.empty((b, c, length), dtype=x_dtype, device=dev) if need_x else None
    gxs = torch.empty((b, c, length), dtype=x_src_dtype, device=dev) if need_x_src else None
    gg = torch.empty((b, n_points, c, length), dtype=grid_dtype, device=dev) if need_grid else None
    if need_x or need_x_src or need_grid:
        _dx_velocity_bwd(grad_u, sigma, sigma_src, r_src, r_dst, seg, shift, polynomial, n_points, gx, gxs, gg)
    empty = lambda dt: torch.empty(0, dtype=dt, device=dev)  # noqa: E731
    return (
        gx if gx is not None else empty(x_dtype),
        gxs if gxs is not None else empty(x_src_dtype),
        gg if gg is not None else empty(grid_dtype),
    )


@_dx_velocity_bwd_op.register_fake
def _dx_velocity_bwd_fake(
    grad_u, sigma, sigma_src, r_src, r_dst, seg, shift, polynomial, n_points, x_dtype, x_src_dtype, grid_dtype,
    need_x, need_x_src, need_grid,
):  # fmt: skip
    b, c, length = grad_u.shape
    new = grad_u.new_empty
    return (
        new((b, c, length) if need_x else (0,), dtype=x_dtype),
        new((b, c, length) if need_x_src else (0,), dtype=x_src_dtype),
        new((b, n_points, c, length) if need_grid else (0,), dtype=grid_dtype),
    )


def _dx_velocity_setup_context(ctx, inputs, output):
    x, sigma, grid, x_src, sigma_src, r_src, r_dst, seg, shift, polynomial = inputs
    # only the per-sample scalars are saved; the (B, N, C, L) grid is not needed by the backward
    ctx.save_for_backward(sigma, sigma_src, r_src, r_dst, seg)
    ctx.shift, ctx.polynomial, ctx.n_points = shift, polynomial, grid.shape[1]
    ctx.dtypes = (x.dtype, x_src.dtype, grid.dtype)


def _dx_velocity_backward(ctx, grad_u):
    sigma, sigma_src, r_src, r_dst, seg = ctx.saved_tensors
    need_x, need_grid, need_xs = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    gx, gxs, gg = _dx_velocity_bwd_op(
        grad_u, sigma, sigma_src, r_src, r_dst, seg, ctx.shift, ctx.polynomial, ctx.n_points,
        *ctx.dtypes, need_x, need_xs, need_grid,
    )  # fmt: skip
    return (
        gx if need_x else None,
        None,
        gg if need_grid else None,
        gxs if need_xs else None,
        None, None, None, None, None, None,
    )  # fmt: skip


_dx_velocity_op.register_autograd(_dx_velocity_backward, setup_context=_dx_velocity_setup_context)


@torch.library.custom_op("piflow::dx_rollout", mutates_args=())
def _dx_rollout_op(
    x_start: torch.Tensor,
    grid: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    r_src: torch.Tensor,
    r_dst: torch.Tensor,
    seg: torch.Tensor,
    policy_shift: float,
    polynomial: bool,
    sigma_start: torch.Tensor,
    n_substeps: torch.Tensor,
    substep_size: torch.Tensor,
    r_start: torch.Tensor,
    shift: float,
) -> torch.Tensor:
    return _dx_rollout(
        x_start, grid, x_src, sigma_src, r_src, r_dst, seg, policy_shift, polynomial,
        sigma_start, n_substeps, substep_size, r_start, shift,
    )  # fmt: skip


@_dx_rollout_op.register_fake
def _dx_rollout_fake(
    x_start, grid, x_src, sigma_src, r_src, r_dst, seg, policy_shift, polynomial,
    sigma_start, n_substeps, substep_size, r_start, shift,
):  # fmt: skip
    return x_start.new_empty(x_start.shape)


# ----------------------------------------------------------------------------------------------- public


_logged_reasons: set[str] = set()


def _interpreted() -> bool:
    return type(_dx_velocity_fwd_kernel).__name__ == "InterpretedFunction"


def _fallback_reason(grid: torch.Tensor) -> str | None:
    """Why these inputs cannot take the kernels (None when they can). Shapes only: no host sync."""
    if grid.shape[1] > MAX_POINTS:
        return f"N = {grid.shape[1]} grid points > {MAX_POINTS}"
    if grid.device.type != "cuda" and not _interpreted():
        return f"tensors on {grid.device.type} and TRITON_INTERPRET=1 was not set before import"
    if grid.numel() == 0:
        return "empty input"
    return None


def _use_fallback(grid: torch.Tensor, op: str) -> bool:
    reason = _fallback_reason(grid)
    if reason is None:
        return False
    key = f"{op}: {reason}"
    if key not in _logged_reasons:
        _logged_reasons.add(key)
        logger.warning("piflow_kernels: %s falls back to the torch path (%s)", op, reason)
    return True


def dx_velocity_triton(
    x: torch.Tensor,
    sigma: torch.Tensor,
    grid: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    r_src: torch.Tensor,
    r_dst: torch.Tensor,
    seg: torch.Tensor,
    shift: float,
    polynomial: bool,
) -> torch.Tensor:
    """DX velocity u(x, sigma) (B, C, L) in x.dtype, fp32 math; differentiable w.r.t. grid, x and x_src.

    Args as :func:`piflow_kernels.ops.dx_torch.dx_velocity_torch`: x, x_src (B, C, L); grid (B, N, C, L);
    sigma, sigma_src, r_src, r_dst, seg (B,); shift the policy's shift; polynomial selects the mode.
    Any strides are accepted. No gradient flows to the per-sample scalars.
    """
    if _use_fallback(grid, "dx_velocity"):
        return dx_velocity_torch(x, sigma, grid, x_src, sigma_src, r_src, r_dst, seg, shift, polynomial)
    return _dx_velocity_op(x, sigma, grid, x_src, sigma_src, r_src, r_dst, seg, float(shift), bool(polynomial))


def dx_rollout_triton(
    x_start: torch.Tensor,
    grid: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    r_src: torch.Tensor,
    r_dst: torch.Tensor,
    seg: torch.Tensor,
    policy_shift: float,
    polynomial: bool,
    sigma_start: torch.Tensor,
    n_substeps: torch.Tensor,
    substep_size: torch.Tensor,
    r_start: torch.Tensor,
    shift: float,
) -> torch.Tensor:
    """Whole DX rollout in one launch; x_end (B, C, L) in x_start.dtype (args as ``dx_rollout_torch``).

    n_substeps (B,) int32, substep_size and r_start (B,) float32 (from ``timesteps.substep_schedule``
    under the rollout's ``shift``); nothing is read back to the host. Not differentiable.
    """
    if _use_fallback(grid, "dx_rollout"):
        return dx_rollout_torch(
            x_start, grid, x_src, sigma_src, r_src, r_dst, seg, policy_shift, polynomial,
            sigma_start, n_substeps, substep_size, r_start, shift,
        )  # fmt: skip
    args = (x_start, grid, x_src, sigma_src, r_src, r_dst, seg, float(policy_shift), bool(polynomial),
            sigma_start, n_substeps, substep_size, r_start, float(shift))  # fmt: skip
    if torch.compiler.is_compiling():  # traced as one opaque node
        return _dx_rollout_op(*args)
    # eager: the launcher itself (the custom op's dispatch costs about as much host time as a small rollout)
    with torch.no_grad():
        return _dx_rollout(*args)


__all__ = ["dx_velocity_triton", "dx_rollout_triton", "MAX_POINTS"]
