"""DX policy velocity by Triton kernels (forward and backward), registered as torch ops.

    >>> u = dx_velocity_triton(x, sigma, DXTensors(grid, x_src, sigma_src, DXSegment(r_src, r_dst, seg, 1.0, False, 1.0)))

The forward runs one program per (sample, L tile), looping over C; in grid mode only the two grid points
with non-zero weight are read (masked loads). The backward saves nothing but the per-sample scalars:
grad_x = gu / s, grad_x_src = -(sum_n w_n) gu / s, grad_grid_n = s_src w_n gu / s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from piflow_kernels.ops import utils
from piflow_kernels.ops.dx.triton_common import _dx_program, _dx_step_weights, blocks
from piflow_kernels.ops.records import DXSegment, DXTensors


@triton.jit
def _dx_velocity_fwd_kernel(
    p_x,  # (B, C, L) latent at which the velocity is evaluated
    p_grid,  # (B, N, C, L) velocities at the N grid points
    p_xs,  # (B, C, L) x_src
    p_sigma,  # (B,) noise level of x
    p_ssrc,  # (B,) sigma_src
    p_rsrc,  # (B,) r_src = unwarp(sigma_src)
    p_rdst,  # (B,) r_dst, start of the segment in raw time
    p_seg,  # (B,) segment length in raw time, >= DX_EPS_K
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
    s_src, s_c, b_w, _ = _dx_step_weights(p_sigma, p_ssrc, p_rsrc, p_rdst, p_seg, i_b, stride_sig, stride_ss, stride_rs,
                                              stride_rd, stride_seg, shift, o_n, N, POLYNOMIAL)  # fmt: skip
    # grid points with zero weight are never read: in grid mode only two rows of the tile move
    m_g = ((o_n < N) & (b_w != 0.0))[:, None] & m_l[None, :]
    o_g = o_n.to(tl.int64)[:, None] * stride_gn + o_l[None, :] * stride_gl
    # x - x0 = (x - x_src) - (sum_n w_n - 1) x_src + s_src sum_n w_n grid_n (the torch twin's order): the hat
    # weights sum to exactly 1, the polynomial ones to 1 + sum_{n >= 1} w_n, taken without the rounding of 1 + ...
    if POLYNOMIAL:
        w_rest = tl.sum(tl.where(o_n > 0, b_w, 0.0), axis=0)
    else:
        w_rest = 0.0

    for c in range(C):
        c64 = tl.cast(c, tl.int64)
        b_x = tl.load(p_x + i_b * stride_xb + c64 * stride_xc + o_l * stride_xl, mask=m_l, other=0.0).to(tl.float32)
        b_xs = tl.load(p_xs + i_b * stride_sb + c64 * stride_sc + o_l * stride_sl, mask=m_l, other=0.0).to(tl.float32)
        b_g = tl.load(p_grid + i_b * stride_gb + c64 * stride_gc + o_g, mask=m_g, other=0.0).to(tl.float32)
        b_u = ((b_x - b_xs) - w_rest * b_xs + s_src * tl.sum(b_w[:, None] * b_g, axis=0)) / s_c
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


# ----------------------------------------------------------------------------------------------- launchers


def _dx_velocity_fwd(x: torch.Tensor, sigma: torch.Tensor, policy: DXTensors, out: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel writing u into ``out`` (B, C, L), contiguous."""
    grid, x_src, sigma_src, segment = policy
    r_src, r_dst, seg, shift, polynomial = segment.kernel_args
    b, n, c, length = grid.shape
    block_n, block_l = blocks(n, length)
    _dx_velocity_fwd_kernel[(b, triton.cdiv(length, block_l))](
        x, grid, x_src, sigma, sigma_src, r_src, r_dst, seg, out,
        *x.stride(), *grid.stride(), *x_src.stride(),
        sigma.stride(0), sigma_src.stride(0), r_src.stride(0), r_dst.stride(0), seg.stride(0),
        c, length, n, float(shift),
        POLYNOMIAL=bool(polynomial), BLOCK_N=block_n, BLOCK_L=block_l,
    )  # fmt: skip
    return out


def _dx_velocity_bwd(grad_u, sigma, sigma_src, segment: DXSegment, n_points: int, grad_x, grad_xs, grad_grid) -> None:
    """Launch the backward kernel; a gradient buffer passed as None is not computed."""
    r_src, r_dst, seg, shift, polynomial = segment.kernel_args
    b, c, length = grad_u.shape
    block_n, block_l = blocks(n_points, length)
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


# ----------------------------------------------------------------------------------------------- torch ops
# the only place the records are spelled out as tensors (an op schema lists them)


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
    out = utils.alloc(tuple(x.shape), x.dtype, x.device)
    policy = DXTensors(grid, x_src, sigma_src, DXSegment(r_src, r_dst, seg, shift, polynomial, 0.0))
    return _dx_velocity_fwd(x, sigma, policy, out)


@_dx_velocity_op.register_fake
def _dx_velocity_fake(x, *rest):
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
    gx = utils.alloc((b, c, length), x_dtype, dev) if need_x else None
    gxs = utils.alloc((b, c, length), x_src_dtype, dev) if need_x_src else None
    gg = utils.alloc((b, n_points, c, length), grid_dtype, dev) if need_grid else None
    if need_x or need_x_src or need_grid:
        segment = DXSegment(r_src, r_dst, seg, shift, polynomial, 0.0)
        _dx_velocity_bwd(grad_u, sigma, sigma_src, segment, n_points, gx, gxs, gg)
    empty = lambda dt: torch.empty(0, dtype=dt, device=dev)  # noqa: E731
    return (
        gx if gx is not None else empty(x_dtype),
        gxs if gxs is not None else empty(x_src_dtype),
        gg if gg is not None else empty(grid_dtype),
    )


@_dx_velocity_bwd_op.register_fake
def _dx_velocity_bwd_fake(grad_u, *rest):
    n_points, x_dtype, x_src_dtype, grid_dtype, need_x, need_x_src, need_grid = rest[7:]
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


def dx_velocity_triton(x: torch.Tensor, sigma: torch.Tensor, policy: DXTensors) -> torch.Tensor:
    """DX velocity u(x, sigma) (B, C, L) in x.dtype, fp32 math; differentiable w.r.t. grid, x and x_src.

    Args:
        x: (B, C, L) any strides; sigma: (B,) float32; policy: the flat DX policy (grid (B, N, C, L),
            x_src (B, C, L), sigma_src (B,), its segment). No gradient flows to the per-sample scalars.
    """
    grid, x_src, sigma_src, segment = policy
    r_src, r_dst, seg, shift, polynomial = segment.kernel_args
    return _dx_velocity_op(x, sigma, grid, x_src, sigma_src, r_src, r_dst, seg, float(shift), bool(polynomial))


__all__ = ["dx_velocity_triton"]
