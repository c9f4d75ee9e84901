"""Whole DX rollout in one Triton launch.

    >>> x_end = dx_rollout_triton(x_start, DXTensors(grid, x_src, sigma_src, segment), plan)

Every Euler substep is linear in x and in the grid, x <- (1 + g) x - g x0 with g = (s_next - s) / max(s, eps),
so each program first runs the per-sample substep recurrence on scalars (the coefficient alpha of x_start and
beta_n of each grid point), then reads its tile of the grid once: x_end = alpha x_start + sum_n beta_n
(x_src - s_src grid_n). Substep counts, sizes and start times are loaded in-kernel (no host sync); samples
with fewer substeps simply run fewer scalar iterations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from piflow_kernels.ops import utils
from piflow_kernels.ops.dx.triton_common import DX_EPS_K, _dx_program, _dx_weights, blocks
from piflow_kernels.ops.records import DXSegment, DXTensors, RolloutPlan


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
        g = (s_next - s) / tl.maximum(s, DX_EPS_K)
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


def _dx_rollout(x_start: torch.Tensor, policy: DXTensors, plan: RolloutPlan) -> torch.Tensor:
    """Launch the whole-rollout kernel: x_end (B, C, L) contiguous, in x_start.dtype."""
    grid, x_src, sigma_src, segment = policy
    r_src, r_dst, seg, policy_shift, polynomial = segment.kernel_args
    sigma_start, n_substeps, substep_size, r_start, shift = plan.kernel_args
    out = utils.alloc(tuple(x_start.shape), x_start.dtype, x_start.device)
    b, n, c, length = grid.shape
    block_n, block_l = blocks(n, length)
    _dx_rollout_kernel[(b, triton.cdiv(length, block_l))](
        x_start, grid, x_src, sigma_src, r_src, r_dst, seg, sigma_start, n_substeps, substep_size, r_start, out,
        *x_start.stride(), *grid.stride(), *x_src.stride(),
        sigma_src.stride(0), r_src.stride(0), r_dst.stride(0), seg.stride(0),
        sigma_start.stride(0), n_substeps.stride(0), substep_size.stride(0), r_start.stride(0),
        c, length, n, float(policy_shift), float(shift),
        POLYNOMIAL=bool(polynomial), BLOCK_N=block_n, BLOCK_L=block_l,
    )  # fmt: skip
    return out


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
    """The records of :func:`dx_rollout_triton` flattened (an op schema lists tensors)."""
    policy = DXTensors(grid, x_src, sigma_src, DXSegment(r_src, r_dst, seg, policy_shift, polynomial, 0.0))
    # the kernel reads only the first five plan fields
    return _dx_rollout(x_start, policy, RolloutPlan(sigma_start, n_substeps, substep_size, r_start, shift, sigma_start, 0))


@_dx_rollout_op.register_fake
def _dx_rollout_fake(x_start, *rest):
    return x_start.new_empty(x_start.shape)


@torch.no_grad()
def dx_rollout_triton(x_start: torch.Tensor, policy: DXTensors, plan: RolloutPlan) -> torch.Tensor:
    """Whole DX rollout in one launch; x_end (B, C, L) in x_start.dtype. Not differentiable; nothing is read
    back to the host."""
    if torch.compiler.is_compiling():  # traced as one opaque node
        grid, x_src, sigma_src, segment = policy
        r_src, r_dst, seg, policy_shift, polynomial = segment.kernel_args
        flat = (r_src, r_dst, seg, float(policy_shift), bool(polynomial))
        return _dx_rollout_op(x_start, grid, x_src, sigma_src, *flat, *plan.kernel_args)
    # eager: the launcher itself (the custom op's dispatch costs about as much host time as a small rollout)
    return _dx_rollout(x_start, policy, plan)


__all__ = ["dx_rollout_triton"]
