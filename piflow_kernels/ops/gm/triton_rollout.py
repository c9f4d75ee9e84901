"""Whole GM rollout in one Triton launch: the policy tile stays in registers over every substep.

    >>> x_end = gm_rollout_triton(x_start, GMTensors(means, logweights, logstds, x_src, sigma_src), plan)

The rollout kernel keeps the whole policy tile (y_k = -s_src means_k, ||y_k||^2, log2-scaled logweights) in
registers across all substeps when it fits (NUM_K_CHUNKS == 1, K * C <= 128 at C <= 16), loops over its
sample's substep count read from memory (no host synchronisation), and writes x once. Each substep is the
torch twin's centred substep: logits centred on x_src, u formed without x0, per-component stds about the
per-pixel pivot component (design: :mod:`.triton_common`, docs/design.md [eq:gm-centred]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from piflow_kernels.ops import utils
from piflow_kernels.ops.gm import triton_common as common
from piflow_kernels.ops.gm.torch_twin import variances
from piflow_kernels.ops.gm.triton_common import (
    EPS_K,
    LOG2E_K,
    UNALIGNED,
    _gm_centred_num,
    _gm_centred_terms,
    _gm_load_chunk,
    _gm_pivot_finish,
    _gm_pivot_of_chunk,
    _gm_program,
    _gm_scalars,
    _gm_var1,
    _in_thread_slice,
    _neg_zero,
    _rcp,
)
from piflow_kernels.ops.records import GMTensors, RolloutPlan


@triton.jit
def _gm_substep_start(r, h, s, shift, s_src_raw, a_src_s2, b_x, b_xs, FAST_RCP: tl.constexpr):
    """One substep's scalars at raw time r (before the step) and noise level s: the raw time and sigma after it,
    1 / s, zeta, 1 / d (the scalar of one std per sample needs the variance: see the caller), and the centred terms
    delta, nu', h (BC, BL) at x = b_x ([eq:gm-centred])."""
    r = tl.maximum(r - h, 0.0)
    s_next = shift * r * _rcp(1.0 + (shift - 1.0) * r, FAST_RCP)
    _, a, inv_s, rho, zeta, _ = _gm_scalars(s, s_src_raw, FAST_RCP)
    b_delta, b_nup, b_h = _gm_centred_terms(b_x, b_xs, a, inv_s, rho, a_src_s2)
    return r, s_next, inv_s, rho, zeta, b_delta, b_nup, b_h


@triton.jit(do_not_specialize_on_alignment=UNALIGNED)
def _gm_rollout_kernel(
    p_x,  # x_start (B, C, L), any float dtype, strided
    p_out,  # out: x_end (B, C, L) contiguous, dtype of x_start
    p_means,  # means (B, K, C, L), strided
    p_lw,  # logweights (B, K, L), strided
    p_var,  # var (B, K1) float32: exp(2 logstds) sigma_src^2, from the launcher (torch_twin.variances)
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
    stride_vb, stride_vk,  # var strides
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

    # constant over the rollout: sigma_src terms and x_src
    s_src_raw = tl.load(p_ssrc + i_b).to(tl.float32)
    s_src = tl.maximum(s_src_raw, EPS_K)
    a_src_s2 = (1.0 - s_src) / (s_src * s_src)
    o_y = i_b64 * stride_yb + o_c[:, None] * stride_yc + o_l[None, :] * stride_yl
    b_xs = tl.load(p_xs + o_y, mask=m_cl, other=0.0).to(tl.float32)
    b_xsq = tl.sum(b_xs * b_xs, axis=0)  # ||x_src||^2 (BL,)
    o_x = i_b64 * stride_xb + o_c[:, None] * stride_xc + o_l[None, :] * stride_xl
    b_x = tl.load(p_x + o_x, mask=m_cl, other=0.0).to(tl.float32)

    n_sub = tl.load(p_n + i_b)
    h = tl.load(p_h + i_b).to(tl.float32)
    r = tl.load(p_r0 + i_b).to(tl.float32)
    s = tl.load(p_s0 + i_b).to(tl.float32)
    p_means_b = p_means + i_b64 * stride_mb
    p_lw_b = p_lw + i_b64 * stride_wb
    p_var_b = p_var + i_b64 * stride_vb

    # Each substep is x <- x + u (s_next - s), u of [eq:gm-centred] (the torch twin's substep algebra, same clamps):
    # the logits centred on x_src (y_k = -s_src means_k), u formed without x0 (x - x0 is O(s) out of O(1)
    # terms), per-component stds about the per-pixel pivot component.
    var1 = _gm_var1(p_var_b)  # one std per sample: the variance
    if NUM_K_CHUNKS == 1:
        # the whole policy tile lives in registers: read once, used n_sub times
        b_y, b_ysq, b_lw2, b_var, m_k = _gm_load_chunk(
            p_means_b, p_lw_b, p_var_b, 0, K, o_c, o_l, m_cl, m_l, s_src_raw,
            stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_vk, BLOCK_K, PER_K_STD,
        )  # fmt: skip
        # axis indices in the layouts of the slices taken below
        o_k3 = tl.arange(0, BLOCK_K)[:, None, None]
        o_c3 = tl.arange(0, BLOCK_C)[None, :, None]
        o_k2 = tl.arange(0, BLOCK_K)[:, None]
        o_c2 = tl.arange(0, BLOCK_C)[:, None]
        b_vpraw = tl.zeros((BLOCK_L,), tl.float32)
        if PER_K_STD:  # the first substep's pivot: the argmax of the unpivoted logits lw_k + (A_k + r) / d_k at sigma_start
            _, _, _, _, zeta0, _, b_nup0, _ = _gm_substep_start(r, h, s, shift, s_src_raw, a_src_s2, b_x, b_xs, FAST_RCP)
            b_a0 = tl.sum(b_y * b_nup0[None, :, :], axis=1) - (0.5 * zeta0) * b_ysq
            b_r0 = tl.sum(b_xs * b_nup0, axis=0) + (0.5 * zeta0) * b_xsq
            b_g0 = LOG2E_K * _rcp(tl.maximum(b_var * zeta0 + 1.0, EPS_K), FAST_RCP)
            _, b_vpraw = _gm_pivot_of_chunk(b_lw2 + (b_a0 + b_r0[None, :]) * b_g0, b_var)
        for _ in range(n_sub):
            r, s_next, inv_s, rho, zeta, b_delta, b_nup, b_h = _gm_substep_start(
                r, h, s, shift, s_src_raw, a_src_s2, b_x, b_xs, FAST_RCP
            )
            if PER_K_STD:
                # A_k = y_k . nu' - zeta/2 ||y_k||^2 (||y_k||^2 kept from the load); only g_k = log2(e) / d_k and
                # q_k are kept per component (registers: the tile already holds ~200). The pivot is the argmax of
                # the previous substep's logits (b_vpraw; before the first, of the logits at sigma_start): one
                # evaluation of the logits per substep instead of two (loop body 1424 -> 1190 instructions at
                # K=32, C=4 on sm_90, Triton 3.6; the rollout edge tests hold it to the float64 reference)
                b_a = tl.sum(b_y * b_nup[None, :, :], axis=1) - (0.5 * zeta) * b_ysq
                b_vz = b_var * zeta
                b_g = LOG2E_K * _rcp(tl.maximum(b_vz + 1.0, EPS_K), FAST_RCP)
                b_q = tl.maximum((EPS_K - 1.0) - b_vz, 0.0)
                b_r = tl.sum(b_xs * b_nup, axis=0) + (0.5 * zeta) * b_xsq
                b_vp, b_idp = _gm_pivot_finish(b_vpraw, zeta)
                b_rk = (b_r * b_idp)[None, :] * (zeta * (b_vp[None, :] - b_var) - b_q)  # as _gm_logits2
                b_l2 = b_lw2 + (b_a + b_rk) * b_g
                b_m, b_vpraw = _gm_pivot_of_chunk(b_l2, b_var)
                b_p = tl.exp2(b_l2 - b_m[None, :])
                b_inv = _rcp(tl.sum(b_p, axis=0) * LOG2E_K, FAST_RCP)  # 1 / sum_k p_k, undoing the log2(e) in g_k
                b_pg = b_p * b_g  # p_k / d_k, times log2(e)
                b_ybar = tl.sum(b_pg[:, None, :] * b_y, axis=0) * b_inv[None, :]  # sum_k w_k y_k / d_k
                b_bbar = tl.sum(b_pg * (b_var - b_vp[None, :]), axis=0) * (b_inv * b_idp)  # sum_k w_k beta_k
                b_qbar = tl.sum(b_pg * b_q, axis=0) * b_inv
                b_num = (b_delta + b_vp[None, :] * b_h) * b_idp[None, :] - b_bbar[None, :] * b_nup - b_ybar
                b_num = b_num + b_qbar[None, :] * b_xs
            else:
                # The contractions are written as explicit chains of FMAs, one term per (unrolled) channel or
                # component, instead of tl.sum over a product: Triton may reduce in-thread axes as a tree
                # (3.9 does: mul, then adds), and a chain that starts from the logit's other terms folds
                # them in. Slices of in-thread axes cost no instructions (_in_thread_slice).
                vz = var1 * zeta
                invd = _rcp(tl.maximum(vz + 1.0, EPS_K), FAST_RCP)
                g1 = LOG2E_K * invd
                b_gnup = b_nup * g1
                b_l2 = b_lw2 - b_ysq * (g1 * (0.5 * zeta))
                for i_c in tl.static_range(BLOCK_C):
                    b_y_c = _in_thread_slice(b_y, o_c3, i_c, 1)  # (BK, BL)
                    b_l2 = b_l2 + b_y_c * _in_thread_slice(b_gnup, o_c2, i_c, 0)[None, :]
                b_p = tl.exp2(b_l2 - tl.max(b_l2, axis=0)[None, :])
                b_acc = _neg_zero((BLOCK_C, BLOCK_L))
                for i_k in tl.static_range(BLOCK_K):
                    b_acc = b_acc + _in_thread_slice(b_p, o_k2, i_k, 0)[None, :] * _in_thread_slice(b_y, o_k3, i_k, 0)
                b_ybar = b_acc * _rcp(tl.sum(b_p, axis=0), FAST_RCP)[None, :]
                q = tl.maximum((EPS_K - 1.0) - vz, 0.0)
                # (delta + q x - ybar + var h) / d with h = -rho x - (a_src / s_src^2) delta expanded: h is not
                # kept over the components (4 registers spilled at K=32, C=4 on sm_90, Triton 3.6)
                b_num = (b_delta * (1.0 - var1 * a_src_s2) + (q - var1 * rho) * b_x - b_ybar) * invd
            b_x = b_x + b_num * ((s_next - s) * inv_s)
            s = s_next
    else:
        # tile too large for registers: stream the chunks (from cache) at every substep
        for _ in range(n_sub):
            r, s_next, inv_s, rho, zeta, b_delta, b_nup, b_h = _gm_substep_start(
                r, h, s, shift, s_src_raw, a_src_s2, b_x, b_xs, FAST_RCP
            )
            b_r = tl.sum(b_xs * b_nup, axis=0) + (0.5 * zeta) * b_xsq
            b_num, _, _, _, _ = _gm_centred_num(
                p_means_b, p_lw_b, p_var_b, K, o_c, o_l, m_cl, m_l, s_src_raw, b_x, b_xs, b_delta, b_nup, b_h, b_r,
                zeta, stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_vk,
                BLOCK_K, BLOCK_C, BLOCK_L, NUM_K_CHUNKS, PER_K_STD,
            )  # fmt: skip
            b_x = b_x + b_num * ((s_next - s) * inv_s)
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
    var = variances(logstds, sigma_src)
    vec = utils.vec
    _gm_rollout_kernel[(b * n_tiles,)](
        x_start, out, means, logweights, var, x_src,
        vec(sigma_src), vec(sigma_start), vec(n_substeps, torch.int32), vec(substep_size), vec(r_start),
        float(shift), k, c, length, n_tiles,
        *x_start.stride(), *means.stride(), *logweights.stride(), *var.stride(), *x_src.stride(),
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
