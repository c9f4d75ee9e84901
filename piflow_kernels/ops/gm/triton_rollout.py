"""Whole GM rollout in one Triton launch: the policy tile stays in registers over every substep.

    >>> x_end = gm_rollout_triton(x_start, GMTensors(means, logweights, logstds, x_src, sigma_src), plan)

The rollout kernel keeps the whole policy tile (mu_k - c, ||mu_k - c||^2, log2-scaled logweights) in
registers across all substeps when it fits (NUM_K_CHUNKS == 1, K * C <= 128 at C <= 16), loops over its
sample's substep count read from memory (no host synchronisation), and writes x once. Logits are centred
on the prior mixture mean (design: :mod:`.triton_common`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from piflow_kernels.ops import utils
from piflow_kernels.ops.gm import triton_common as common
from piflow_kernels.ops.gm.triton_common import (
    EPS_K,
    LOG2E_K,
    UNALIGNED,
    _gm_load_chunk,
    _gm_posterior_x0,
    _gm_program,
    _gm_var0,
    _gm_x0_from_acc,
    _in_thread_slice,
    _neg_zero,
    _rcp,
)
from piflow_kernels.ops.records import GMTensors, RolloutPlan


@triton.jit
def _gm_substep_start(r, h, s, shift, c_src, b_x, b_nusrc, FAST_RCP: tl.constexpr):
    """One substep's scalars at raw time r (before the step) and noise level s: the raw time and sigma after it,
    1 / s, zeta and nu (BC, BL) at x = b_x (b_nusrc = (a_src / s_src^2) x_src)."""
    r = tl.maximum(r - h, 0.0)
    s_next = shift * r * _rcp(1.0 + (shift - 1.0) * r, FAST_RCP)
    s_c = tl.maximum(s, EPS_K)
    inv_s = _rcp(s_c, FAST_RCP)
    a = 1.0 - s_c
    zeta = a * a * inv_s * inv_s - c_src
    return r, s_next, inv_s, zeta, (a * inv_s * inv_s) * b_x - b_nusrc


@triton.jit(do_not_specialize_on_alignment=UNALIGNED)
def _gm_rollout_kernel(
    p_x,  # x_start (B, C, L), any float dtype, strided
    p_out,  # out: x_end (B, C, L) contiguous, dtype of x_start
    p_means,  # means (B, K, C, L), strided
    p_lw,  # logweights (B, K, L), strided
    p_ls,  # logstds (B, K1), strided
    p_xs,  # x_src (B, C, L), strided
    p_ssrc,  # sigma_src (B,) float32, contiguous
    p_s0,  # sigma_start (B,) float32, contiguous
    p_n,  # n_substeps (B,) int32, contiguous: read here, never on the host
    p_h,  # substep_size (B,) float32 in raw time, contiguous
    p_r0,  # r_start (B,) float32 raw time of sigma_start, contiguous
    shift,  # time shift: sigma = shift r / (1 + (shift - 1) r)
    K,  # number of components
    C,  # number of channels
    L,  # pixels per sample
    n_tiles,  # programs per sample
    stride_xb, stride_xc, stride_xl,  # x_start strides
    stride_mb, stride_mk, stride_mc, stride_ml,  # means strides
    stride_wb, stride_wk, stride_wl,  # logweights strides
    stride_sb, stride_sk,  # logstds strides
    stride_yb, stride_yc, stride_yl,  # x_src strides
    BLOCK_K: tl.constexpr,  # components per chunk
    BLOCK_C: tl.constexpr,  # next power of two >= C
    BLOCK_L: tl.constexpr,  # pixels per program
    NUM_K_CHUNKS: tl.constexpr,  # 1: the policy tile stays in registers over all substeps
    PER_K_STD: tl.constexpr,  # logstds per component (else one per sample)
    FAST_RCP: tl.constexpr,  # NVIDIA GPU: approximate reciprocal by inline PTX (not in the interpreter)
):
    i_b, i_t, i_b64, o_l, o_c, m_l, m_cl = _gm_program(n_tiles, C, L, BLOCK_C, BLOCK_L)
    shift = tl.cast(shift, tl.float32)  # inductor passes Python floats as fp64

    # constant over the rollout: sigma_src terms, x_src part of nu
    s_src_raw = tl.load(p_ssrc + i_b).to(tl.float32)
    s_src = tl.maximum(s_src_raw, EPS_K)
    a_src = 1.0 - s_src
    c_src = (a_src / s_src) * (a_src / s_src)
    o_y = i_b64 * stride_yb + o_c[:, None] * stride_yc + o_l[None, :] * stride_yl
    b_xs = tl.load(p_xs + o_y, mask=m_cl, other=0.0).to(tl.float32)
    b_nusrc = (a_src / (s_src * s_src)) * b_xs
    o_x = i_b64 * stride_xb + o_c[:, None] * stride_xc + o_l[None, :] * stride_xl
    b_x = tl.load(p_x + o_x, mask=m_cl, other=0.0).to(tl.float32)

    n_sub = tl.load(p_n + i_b)
    h = tl.load(p_h + i_b).to(tl.float32)
    r = tl.load(p_r0 + i_b).to(tl.float32)
    s = tl.load(p_s0 + i_b).to(tl.float32)
    p_means_b = p_means + i_b64 * stride_mb
    p_lw_b = p_lw + i_b64 * stride_wb
    p_ls_b = p_ls + i_b64 * stride_sb

    # Logits are evaluated centred on the prior mixture mean c = sum_k softmax(lw)_k mu_k (per pixel):
    # (mu_k - c) . (nu - zeta c) is ~10x smaller than mu_k . nu at small sigma, and so is its float32
    # rounding: on the FLUX-shape check the error of a rollout to sigma = 0 drops from 2.6e-4 to 3.4e-5.
    var0 = _gm_var0(p_ls_b, s_src_raw)
    b_zero = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)
    if NUM_K_CHUNKS == 1:
        # the whole policy tile lives in registers: read once, used n_sub times
        b_mu, b_musq, b_lw2, b_var, m_k = _gm_load_chunk(
            p_means_b, p_lw_b, p_ls_b, 0, K, o_c, o_l, m_cl, m_l, s_src_raw, b_zero,
            stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_sk, BLOCK_K, PER_K_STD,
        )  # fmt: skip
        b_p0 = tl.exp2(b_lw2 - tl.max(b_lw2, axis=0)[None, :])
        b_cxs = tl.sum(b_p0[:, None, :] * b_mu, axis=0) / tl.sum(b_p0, axis=0)[None, :]  # c - x_src
        b_mu = b_mu - b_cxs[None, :, :]  # mu_k - c
        b_musq = tl.sum(b_mu * b_mu, axis=1)
        b_c = b_xs + b_cxs
        b_csq = tl.sum(b_c * b_c, axis=0)
        # axis indices in the layouts of the slices taken below
        o_k3 = tl.arange(0, BLOCK_K)[:, None, None]
        o_c3 = tl.arange(0, BLOCK_C)[None, :, None]
        o_k2 = tl.arange(0, BLOCK_K)[:, None]
        o_c2 = tl.arange(0, BLOCK_C)[:, None]
        for _ in range(n_sub):
            r, s_next, inv_s, zeta, b_nu = _gm_substep_start(r, h, s, shift, c_src, b_x, b_nusrc, FAST_RCP)
            if PER_K_STD:
                b_dot = tl.sum(b_mu * (b_nu - zeta * b_c)[None, :, :], axis=1)
                # only g_k = log2(e) / d_k is kept per component (registers: the tile already holds ~200)
                b_g = LOG2E_K * _rcp(tl.maximum(b_var * zeta + 1.0, EPS_K), FAST_RCP)
                g0 = LOG2E_K / tl.maximum(var0 * zeta + 1.0, EPS_K)
                b_r = tl.sum(b_c * b_nu, axis=0) - (0.5 * zeta) * b_csq
                b_l2 = b_lw2 + (b_dot - (0.5 * zeta) * b_musq) * b_g + b_r[None, :] * (b_g - g0)
                b_m = tl.max(b_l2, axis=0)
                b_p = tl.exp2(b_l2 - b_m[None, :])
                b_pg = b_p * b_g  # p_k / d_k, times log2(e), undone in _gm_x0_from_acc
                b_x0 = _gm_x0_from_acc(
                    tl.sum(b_p, axis=0), tl.sum(b_pg[:, None, :] * b_mu, axis=0), tl.sum(b_pg * b_var, axis=0),
                    tl.sum(b_pg, axis=0), b_nu, b_c, var0, zeta, LOG2E_K, FAST_RCP, PER_K_STD,
                )  # fmt: skip
            else:
                # The contractions are written as explicit chains of FMAs, one term per (unrolled) channel or
                # component, instead of tl.sum over a product: Triton may reduce in-thread axes as a tree
                # (3.9 does: mul, then adds), and a chain that starts from the logit's other terms folds
                # them in. Slices of in-thread axes cost no instructions (_in_thread_slice).
                g1 = LOG2E_K * _rcp(tl.maximum(b_var * zeta + 1.0, EPS_K), FAST_RCP)
                b_gnup = (b_nu - zeta * b_c) * g1
                b_l2 = b_lw2 - b_musq * (g1 * (0.5 * zeta))
                for i_c in tl.static_range(BLOCK_C):
                    b_mu_c = _in_thread_slice(b_mu, o_c3, i_c, 1)  # (BK, BL)
                    b_l2 = b_l2 + b_mu_c * _in_thread_slice(b_gnup, o_c2, i_c, 0)[None, :]
                b_m = tl.max(b_l2, axis=0)
                b_p = tl.exp2(b_l2 - b_m[None, :])
                b_acc = _neg_zero((BLOCK_C, BLOCK_L))
                for i_k in tl.static_range(BLOCK_K):
                    b_acc = b_acc + _in_thread_slice(b_p, o_k2, i_k, 0)[None, :] * _in_thread_slice(b_mu, o_k3, i_k, 0)
                b_x0 = _gm_x0_from_acc(
                    tl.sum(b_p, axis=0), b_acc, b_var, b_var, b_nu, b_c, b_var, zeta, 1.0, FAST_RCP, PER_K_STD,
                )  # fmt: skip
            # x += u (s_next - s) with u = (x - x0) / s
            b_x = b_x + (b_x - b_x0) * ((s_next - s) * inv_s)
            s = s_next
    else:
        # tile too large for registers: centre from one pass over the chunks, then stream them (from
        # cache) at every substep
        b_mrun = tl.full((BLOCK_L,), -1e30, tl.float32)
        b_lrun = tl.zeros((BLOCK_L,), tl.float32)
        b_acc = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)
        for i_k in range(NUM_K_CHUNKS):
            b_mu, b_musq, b_lw2, b_var, m_k = _gm_load_chunk(
                p_means_b, p_lw_b, p_ls_b, i_k * BLOCK_K, K, o_c, o_l, m_cl, m_l, s_src_raw, b_zero,
                stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_sk, BLOCK_K, PER_K_STD,
            )  # fmt: skip
            b_mnew = tl.maximum(b_mrun, tl.max(b_lw2, axis=0))
            b_alpha = tl.exp2(b_mrun - b_mnew)
            b_p0 = tl.exp2(b_lw2 - b_mnew[None, :])
            b_lrun = b_lrun * b_alpha + tl.sum(b_p0, axis=0)
            b_acc = b_acc * b_alpha[None, :] + tl.sum(b_p0[:, None, :] * b_mu, axis=0)
            b_mrun = b_mnew
        b_cxs = b_acc / b_lrun[None, :]  # c - x_src
        b_c = b_xs + b_cxs
        b_csq = tl.sum(b_c * b_c, axis=0)
        for _ in range(n_sub):
            r, s_next, inv_s, zeta, b_nu = _gm_substep_start(r, h, s, shift, c_src, b_x, b_nusrc, FAST_RCP)
            b_x0, _, _, _, _, _ = _gm_posterior_x0(
                p_means_b, p_lw_b, p_ls_b, K, o_c, o_l, m_cl, m_l, s_src_raw, -b_cxs, b_c, b_csq, b_nu, zeta,
                var0, stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_sk,
                BLOCK_K, BLOCK_C, BLOCK_L, NUM_K_CHUNKS, PER_K_STD, FAST_RCP,
            )  # fmt: skip
            b_x = b_x + (b_x - b_x0) * ((s_next - s) * inv_s)
            s = s_next

    o_out = i_b64 * C * L + o_c[:, None] * L + o_l[None, :]
    tl.store(p_out + o_out, b_x.to(p_out.dtype.element_ty), mask=m_cl)


def _gm_rollout(x_start: torch.Tensor, policy: GMTensors, plan: RolloutPlan) -> torch.Tensor:
    """Launch the rollout kernel: x_end (B, C, L) in x_start.dtype."""
    means, logweights, logstds, x_src, sigma_src = policy
    sigma_start, n_substeps, substep_size, r_start, shift = plan.kernel_args
    b, k, c, length = means.shape
    cfg = common.launch_config(k, c, length, common.LAUNCH["rollout"]["budget"], common.LAUNCH["rollout"]["num_warps"])
    n_tiles = triton.cdiv(length, cfg["BLOCK_L"])
    out = utils.alloc((b, c, length), x_start.dtype, x_start.device)
    vec = utils.vec
    _gm_rollout_kernel[(b * n_tiles,)](
        x_start, out, means, logweights, logstds, x_src,
        vec(sigma_src), vec(sigma_start), vec(n_substeps, torch.int32), vec(substep_size), vec(r_start),
        float(shift), k, c, length, n_tiles,
        *x_start.stride(), *means.stride(), *logweights.stride(), *logstds.stride(), *x_src.stride(),
        PER_K_STD=policy.per_component_std, FAST_RCP=common.fast_rcp(x_start), **cfg,
    )  # fmt: skip
    return out


@torch.library.custom_op("piflow::gm_rollout", mutates_args=())
def gm_rollout_op(
    x_start: torch.Tensor,
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    sigma_start: torch.Tensor,
    n_substeps: torch.Tensor,
    substep_size: torch.Tensor,
    r_start: torch.Tensor,
    shift: float,
) -> torch.Tensor:
    """Whole GM rollout in one launch, x_end (B, C, L) in x_start.dtype (no autograd): the records of
    :func:`gm_rollout_triton` flattened (the op schema lists tensors)."""
    policy = GMTensors(means, logweights, logstds, x_src, sigma_src)
    # the kernel reads only the first five plan fields
    plan = RolloutPlan(sigma_start, n_substeps, substep_size, r_start, shift, sigma_start, 0)
    return _gm_rollout(x_start, policy, plan)


@gm_rollout_op.register_fake
def _gm_rollout_fake(x_start, *policy_and_plan):
    return x_start.new_empty((x_start.shape[0], x_start.shape[1], x_start.shape[2]))


@torch.no_grad()
def gm_rollout_triton(x_start: torch.Tensor, policy: GMTensors, plan: RolloutPlan) -> torch.Tensor:
    """Whole GM rollout ([eq:rollout]) in one kernel launch, no host synchronisation.

    Args:
        x_start: (B, C, L) any float dtype; policy: the flat GM policy; plan: the substep plan.
    Returns:
        x_end (B, C, L) in x_start.dtype (no autograd).
    """
    if torch.compiler.is_compiling():  # traced as one opaque node
        return torch.ops.piflow.gm_rollout(x_start, *policy, *plan.kernel_args)
    # eager: the launcher itself; the custom op's dispatch (autograd wrapper, redispatch) costs about as
    # much host time as the rest of a small rollout, and a rollout has no autograd to dispatch
    return _gm_rollout(x_start, policy, plan)


__all__ = ["gm_rollout_triton"]
