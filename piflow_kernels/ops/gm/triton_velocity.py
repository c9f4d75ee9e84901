"""GM policy velocity by fused Triton kernels: forward and a one-pass backward (flash-attention style).

    >>> u = gm_velocity_triton(x, sigma, GMTensors(means, logweights, logstds, x_src, sigma_src))   # (B, C, L)
    >>> u.square().sum().backward()                        # grads for means, logweights, logstds, x, x_src

One program owns BLOCK_L pixels of one sample and all K components (design: :mod:`.triton_common`). The
forward also writes the log-sum-exp of the logits and the softmax-weighted centred means (C + 1 floats per
pixel, C + 3 with per-component stds; not K * C), which give every chunk of the backward its normalised
weights and logit gradients without the other chunks. The logstds gradient is reduced over pixels per
program into a small (B, tiles, K1) buffer summed on the host side of the op.
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
    UNALIGNED,
    _div_rn,
    _gm_centred_num,
    _gm_centred_terms,
    _gm_d,
    _gm_dot,
    _gm_load_chunk,
    _gm_logits2,
    _gm_program,
    _gm_scalars,
    _gm_var1,
)
from piflow_kernels.ops.records import GMTensors

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize_on_alignment=UNALIGNED)
def _gm_velocity_fwd_kernel(
    p_x,  # x (B, C, L), any float dtype, strided
    p_sigma,  # sigma (B,) float32, contiguous
    p_means,  # means (B, K, C, L), strided
    p_lw,  # logweights (B, K, L), strided
    p_var,  # var (B, K1) float32: exp(2 logstds) sigma_src^2, from the launcher (torch_twin.variances)
    p_xs,  # x_src (B, C, L), strided
    p_ssrc,  # sigma_src (B,) float32, contiguous
    p_u,  # out: u (B, C, L) contiguous, dtype of x
    p_ybar,  # out (SAVE_STATS): ybar = sum_k w_k y_k [/ d_k with per-component stds] (B, C, L) float32
    p_stats,  # out (SAVE_STATS): (B, S, L) float32: lse2 = log2 sum_k 2^logit2_k, then for per-component
    #           stds (S = 3) bbar = sum_k w_k beta_k and the pivot's variance var_p
    K,  # number of components
    C,  # number of channels
    L,  # pixels per sample
    n_tiles,  # programs per sample = ceil(L / BLOCK_L)
    stride_xb, stride_xc, stride_xl,  # x strides
    stride_mb, stride_mk, stride_mc, stride_ml,  # means strides
    stride_wb, stride_wk, stride_wl,  # logweights strides
    stride_vb, stride_vk,  # var strides
    stride_yb, stride_yc, stride_yl,  # x_src strides
    BLOCK_K: tl.constexpr,  # components per chunk
    BLOCK_C: tl.constexpr,  # next power of two >= C
    BLOCK_L: tl.constexpr,  # pixels per program
    NUM_K_CHUNKS: tl.constexpr,  # ceil(K / BLOCK_K)
    PER_K_STD: tl.constexpr,  # logstds per component (else one per sample)
    SAVE_STATS: tl.constexpr,  # write ybar and stats for the backward
):
    i_b, i_t, i_b64, o_l, o_c, m_l, m_cl = _gm_program(n_tiles, C, L, BLOCK_C, BLOCK_L)
    s_src_raw = tl.load(p_ssrc + i_b).to(tl.float32)
    # exact 1 / s (no FAST_RCP): the backward recomputes these logits from the same scalars, and at small sigma a
    # logit of ~1e6 (log2 units) moves by ~0.5 for a 2^-22 change of 1 / s
    s, a, inv_s, rho, zeta, a_src_s2 = _gm_scalars(tl.load(p_sigma + i_b).to(tl.float32), s_src_raw, False)

    o_x = i_b64 * stride_xb + o_c[:, None] * stride_xc + o_l[None, :] * stride_xl
    b_x = tl.load(p_x + o_x, mask=m_cl, other=0.0).to(tl.float32)
    o_y = i_b64 * stride_yb + o_c[:, None] * stride_yc + o_l[None, :] * stride_yl
    b_xs = tl.load(p_xs + o_y, mask=m_cl, other=0.0).to(tl.float32)
    b_delta, b_nup, b_h = _gm_centred_terms(b_x, b_xs, a, inv_s, rho, a_src_s2)
    b_r = tl.sum(b_xs * (b_nup + (0.5 * zeta) * b_xs), axis=0)  # (BL,) x_src . (nu' + zeta x_src / 2)

    b_num, b_ybar, b_lse, b_bbar, b_vp = _gm_centred_num(
        p_means + i_b64 * stride_mb, p_lw + i_b64 * stride_wb, p_var + i_b64 * stride_vb, K,
        o_c, o_l, m_cl, m_l, s_src_raw, b_x, b_xs, b_delta, b_nup, b_h, b_r, zeta,
        stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_vk,
        BLOCK_K, BLOCK_C, BLOCK_L, NUM_K_CHUNKS, PER_K_STD,
    )  # fmt: skip
    o_u = i_b64 * C * L + o_c[:, None] * L + o_l[None, :]
    tl.store(p_u + o_u, (b_num * inv_s).to(p_u.dtype.element_ty), mask=m_cl)
    if SAVE_STATS:
        tl.store(p_ybar + o_u, b_ybar, mask=m_cl)
        o_s = i_b64 * (3 if PER_K_STD else 1) * L + o_l
        tl.store(p_stats + o_s, b_lse, mask=m_l)
        if PER_K_STD:
            tl.store(p_stats + o_s + L, b_bbar, mask=m_l)
            tl.store(p_stats + o_s + 2 * L, b_vp, mask=m_l)


@triton.jit(do_not_specialize_on_alignment=UNALIGNED)
def _gm_velocity_bwd_kernel(
    p_g,  # dL/du (B, C, L), strided (may be an expanded stride-0 view)
    p_x,  # x (B, C, L), strided
    p_sigma,  # sigma (B,) float32, contiguous
    p_means,  # means (B, K, C, L), strided
    p_lw,  # logweights (B, K, L), strided
    p_var,  # var (B, K1) float32: exp(2 logstds) sigma_src^2, from the launcher (torch_twin.variances)
    p_xs,  # x_src (B, C, L), strided
    p_ssrc,  # sigma_src (B,) float32, contiguous
    p_ybar,  # the forward's ybar (B, C, L) float32, contiguous
    p_stats,  # the forward's stats (B, S, L) float32, contiguous: lse2 [, bbar, var_p with per-component stds]
    p_dx,  # out: dL/dx (B, C, L) contiguous, dtype of x (written when NEED_DX)
    p_dmeans,  # out: dL/dmeans (B, K, C, L) contiguous, dtype of means
    p_dlw,  # out: dL/dlogweights (B, K, L) contiguous, dtype of logweights
    p_dls,  # out: per-program partial dL/dlogstds (B, n_tiles, K1) float32, summed by the launcher
    p_dxs,  # out: dL/dx_src (B, C, L) contiguous, dtype of x_src (written when NEED_DXS)
    K,  # number of components
    C,  # number of channels
    L,  # pixels per sample
    n_tiles,  # programs per sample
    stride_gb, stride_gc, stride_gl,  # dL/du strides
    stride_xb, stride_xc, stride_xl,  # x strides
    stride_mb, stride_mk, stride_mc, stride_ml,  # means strides
    stride_wb, stride_wk, stride_wl,  # logweights strides
    stride_vb, stride_vk,  # var strides
    stride_yb, stride_yc, stride_yl,  # x_src strides
    BLOCK_K: tl.constexpr,  # components per chunk
    BLOCK_C: tl.constexpr,  # next power of two >= C
    BLOCK_L: tl.constexpr,  # pixels per program
    NUM_K_CHUNKS: tl.constexpr,  # ceil(K / BLOCK_K)
    PER_K_STD: tl.constexpr,  # logstds per component (else one per sample)
    NEED_DX: tl.constexpr,  # write dL/dx
    NEED_DXS: tl.constexpr,  # write dL/dx_src
):
    # Notation ([eq:gm-backward]): gx0 = -g / s (g = dL/du), y_k = mu_k - x_src = -s_src means_k, w the softmax of
    # the logits of [eq:gm-centred]; u is a function of w, so with dL/dw_k the derivative at fixed weights,
    #   dL/dlogit_k = w_k (dL/dw_k - sum_j w_j dL/dw_j) =: gl_k, and in the domain (no d_k clamped)
    #   one std:        gl_k = w_k gx0 . (y_k - ybar) / d
    #   per component:  gl_k = w_k [gx0 . (y_k / d_k - ybar) + (beta_k - bbar) gx0 . nu'],  beta_k = (var_k - var_p) / (d_k d_p)
    # with the forward's ybar, bbar (and var_p), so no chunk needs another: one pass over the components, as in
    # flash attention, and a pixel whose weight sits on one component gets gl = 0 exactly. In x0 terms (m_k =
    # (var_k nu + mu_k) / d_k, x0 = sum_k w_k m_k, u = (x - x0) / s, the same function):
    #   dL/dmu_k = (w_k gx0 + gl_k (nu' - zeta y_k)) / d_k,    dL/dnu = sum_k (gl_k mu_k + w_k var_k gx0) / d_k
    # and through the variances (the pivot is not differentiated: u does not depend on it)
    #   dL/dvar_k = (w_k gx0 . (nu' - zeta y_k) - zeta gl_k (A_k + r)) / d_k^2.
    # With one std, sum_k gl_k = 0 lets A_k + r move by any per-pixel constant: A_k - d lse (natural units) makes
    # it d (log w_k - lw_k), O(1) where the weight is, and the direct part is (zeta gx0 . (delta - ybar) - gx0 . h)
    # / d^2 (the x0 form's gx0 . nu d - zeta var gx0 . nu cancels two ~1/s^4 terms: 0.9 of the logstds gradient
    # lost at sigma 0).
    i_b, i_t, i_b64, o_l, o_c, m_l, m_cl = _gm_program(n_tiles, C, L, BLOCK_C, BLOCK_L)
    s_src_raw = tl.load(p_ssrc + i_b).to(tl.float32)
    s, a, inv_s, rho, zeta, a_src_s2 = _gm_scalars(tl.load(p_sigma + i_b).to(tl.float32), s_src_raw, False)
    c_src = a_src_s2 * (1.0 - tl.maximum(s_src_raw, EPS_K))  # (a_src / s_src)^2

    o_out = i_b64 * C * L + o_c[:, None] * L + o_l[None, :]
    b_x = tl.load(p_x + i_b64 * stride_xb + o_c[:, None] * stride_xc + o_l[None, :] * stride_xl, mask=m_cl, other=0.0)
    b_xs = tl.load(p_xs + i_b64 * stride_yb + o_c[:, None] * stride_yc + o_l[None, :] * stride_yl, mask=m_cl, other=0.0)
    b_g = tl.load(p_g + i_b64 * stride_gb + o_c[:, None] * stride_gc + o_l[None, :] * stride_gl, mask=m_cl, other=0.0)
    b_ybar = tl.load(p_ybar + o_out, mask=m_cl, other=0.0)
    o_s = i_b64 * (3 if PER_K_STD else 1) * L + o_l
    b_lse = tl.load(p_stats + o_s, mask=m_l, other=0.0)
    b_x = b_x.to(tl.float32)
    b_xs = b_xs.to(tl.float32)
    b_g = b_g.to(tl.float32)
    b_delta, b_nup, b_hx = _gm_centred_terms(b_x, b_xs, a, inv_s, rho, a_src_s2)
    b_r = tl.sum(b_xs * (b_nup + (0.5 * zeta) * b_xs), axis=0)  # (BL,)
    b_gx0 = -b_g * inv_s
    p_means_b = p_means + i_b64 * stride_mb
    p_lw_b = p_lw + i_b64 * stride_wb
    p_var_b = p_var + i_b64 * stride_vb
    if PER_K_STD:
        b_bbar = tl.load(p_stats + o_s + L, mask=m_l, other=0.0)
        b_vp = tl.load(p_stats + o_s + 2 * L, mask=m_l, other=0.0)
        b_idp = _div_rn(1.0, 1.0 + zeta * b_vp)  # as _gm_pivot_finish in the forward
        b_gxnup = tl.sum(b_gx0 * b_nup, axis=0)  # gx0 . nu'
    else:
        b_vp = tl.zeros((BLOCK_L,), tl.float32)  # (not read by _gm_logits2 with one std)
        b_idp = b_vp
        b_gxybar = tl.sum(b_gx0 * b_ybar, axis=0)
        var1 = _gm_var1(p_var_b)
        invd1, _ = _gm_d(var1, zeta)
        # the logstds gradient's part at fixed weights, (zeta gx0 . (delta - ybar) - gx0 . h) / d^2 per pixel
        b_direct = (zeta * tl.sum(b_gx0 * (b_delta - b_ybar), axis=0) - tl.sum(b_gx0 * b_hx, axis=0)) * (invd1 * invd1)

    # dL/dx and dL/dx_src are rewritten so that no two ~1/s or ~1/d quantities cancel (the identities hold
    # wherever no d_k is clamped, which includes the whole domain, sigma <= sigma_src: zeta >= 0):
    #   dL/dx = g / s + (a / s^2) dL/dnu: the part of a / s^2 dL/dnu along g is -(a / s^3) g sum_k w_k var_k / d_k,
    #     so dL/dx = g sum_k w_k h_k + (a / s^2) sum_k gl_k mu_k / d_k with
    #     h_k = 1 / s - a var_k / (s^3 d_k) = (s - var_k (a + s c_src)) / (s^2 d_k), c_src = (a_src / s_src)^2
    #     (s^2 d_k = s^2 + var_k (a^2 - s^2 c_src) and a^2 - a = -a s).
    # Outside the domain (zeta < 0, reachable with validation off) the gradients are exact while no d_k is clamped
    # at eps; where one is, the clamp's q_k terms are left out of them (the forward keeps them): approximate there.
    b_dnu = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)  # sum_k gl_k mu_k / d_k: the part of dL/dnu not along gx0
    b_wvd = tl.zeros((BLOCK_L,), tl.float32)  # sum_k w_k var_k / d_k: dL/dnu = b_dnu + gx0 b_wvd
    b_hsum = tl.zeros((BLOCK_L,), tl.float32)  # sum_k w_k h_k
    b_dmusum = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)
    b_gldsum = tl.zeros((BLOCK_L,), tl.float32)
    b_glsh = tl.zeros((BLOCK_L,), tl.float32)  # one std: sum_k gl_k (log w_k - lw_k)
    o_dmeans = i_b64 * K * C * L + o_c[None, :, None] * L + o_l[None, None, :]
    o_dlw = i_b64 * K * L + o_l[None, :]
    o_dls = (i_b64 * n_tiles + i_t) * (K if PER_K_STD else 1)
    for i_k in range(NUM_K_CHUNKS):
        k0 = i_k * BLOCK_K
        b_y, b_ysq, b_lw2, b_var, m_k = _gm_load_chunk(
            p_means_b, p_lw_b, p_var_b, k0, K, o_c, o_l, m_cl, m_l, s_src_raw,
            stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_vk, BLOCK_K, PER_K_STD,
        )  # fmt: skip
        b_invd, b_q = _gm_d(b_var, zeta)
        b_a = _gm_dot(b_y, b_nup, zeta)  # A_k
        b_l2 = _gm_logits2(b_lw2, b_a, b_invd, b_q, b_var, b_r, b_vp, b_idp, zeta, PER_K_STD)
        b_w = tl.exp2(b_l2 - b_lse[None, :])
        b_gxmu = tl.sum(b_gx0[None, :, :] * b_y, axis=1)
        if PER_K_STD:
            b_beta = (b_var - b_vp[None, :]) * b_invd * b_idp[None, :]
            b_de = (
                tl.sum(b_gx0[None, :, :] * (b_y * b_invd[:, None, :] - b_ybar[None, :, :]), axis=1)
                + (b_beta - b_bbar[None, :]) * b_gxnup[None, :]
            )
        else:
            b_de = (b_gxmu - b_gxybar[None, :]) * b_invd
        b_gl = b_w * b_de
        b_wd = b_w * b_invd
        b_gld = b_gl * b_invd

        o_k64 = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        m_kl = m_k[:, None] & m_l[None, :]
        tl.store(p_dlw + o_dlw + o_k64[:, None] * L, b_gl.to(p_dlw.dtype.element_ty), mask=m_kl)

        b_dmu = b_wd[:, None, :] * b_gx0[None, :, :] + b_gld[:, None, :] * (b_nup[None, :, :] - zeta * b_y)
        p_dm = p_dmeans + o_dmeans + o_k64[:, None, None] * C * L
        tl.store(p_dm, (-s_src_raw * b_dmu).to(p_dmeans.dtype.element_ty), mask=m_k[:, None, None] & m_cl[None, :, :])
        b_dmusum += tl.sum(b_dmu, axis=0)
        # sum_k gl_k mu_k / d_k = sum_k gl_k y_k / d_k + x_src sum_k gl_k / d_k; with one d the last sum
        # is (sum_k gl_k) / d = 0 exactly and is left out
        b_dnu += tl.sum(b_gld[:, None, :] * b_y, axis=0)
        b_hk = (s - b_var * (a + s * c_src)) * (inv_s * inv_s) * b_invd
        if PER_K_STD:
            b_wvd += tl.sum(b_wd * b_var, axis=0)
            b_hsum += tl.sum(b_w * b_hk, axis=0)
            b_gldsum += tl.sum(b_gld, axis=0)
            # dL/dlogstd_k = 2 var_k dL/dvar_k, summed over this tile's pixels (masked pixels contribute 0)
            b_dls = (2.0 * b_var * b_invd * b_invd) * (
                b_w * (b_gxnup[None, :] - zeta * b_gxmu) - zeta * b_gl * (b_a + b_r[None, :])
            )
            tl.store(p_dls + o_dls + o_k64, tl.sum(b_dls, axis=1), mask=m_k)
        else:
            b_wvd += tl.sum(b_wd, axis=0) * b_var
            b_hsum += tl.sum(b_w, axis=0) * b_hk
            b_glsh += tl.sum(b_gl * (b_a * b_invd - b_lse[None, :] * 0.6931471805599453), axis=0)

    if PER_K_STD:
        b_dnu += b_xs * b_gldsum[None, :]
    else:
        # dL/dlogstd = 2 var dL/dvar, dL/dvar = direct - zeta / d sum_k gl_k (log w_k - lw_k), over the tile's pixels
        b_dls_px = (2.0 * var1) * (b_direct - (zeta * invd1) * b_glsh)
        tl.store(p_dls + o_dls, tl.sum(tl.where(m_l, b_dls_px, 0.0), axis=0))
    if NEED_DX:
        b_dx = b_g * b_hsum[None, :] + (a * inv_s * inv_s) * b_dnu
        tl.store(p_dx + o_out, b_dx.to(p_dx.dtype.element_ty), mask=m_cl)
    if NEED_DXS:
        b_dxs = b_dmusum - a_src_s2 * (b_dnu + b_gx0 * b_wvd[None, :])
        tl.store(p_dxs + o_out, b_dxs.to(p_dxs.dtype.element_ty), mask=m_cl)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _n_stats(policy: GMTensors) -> int:
    """Rows of the forward's saved per-pixel statistics: lse2, and bbar, var_p with per-component stds."""
    return 3 if policy.per_component_std else 1


def _gm_velocity_fwd(x: torch.Tensor, sigma: torch.Tensor, policy: GMTensors, save_stats: bool):
    """u (B, C, L) in x.dtype, and with ``save_stats`` the backward's ybar (B, C, L) and stats (B, S, L)
    in float32 (else empty (0,) tensors); S = 3 with per-component stds, else 1."""
    means, logweights, logstds, x_src, sigma_src = policy
    b, k, c, length = means.shape
    cfg = common.launch_config(k, c, length, common.LAUNCH["fwd"]["budget"], common.LAUNCH["fwd"]["num_warps"])
    n_tiles = triton.cdiv(length, cfg["BLOCK_L"])
    u = utils.alloc((b, c, length), x.dtype, x.device)
    var = variances(logstds, sigma_src)
    ybar = utils.alloc((b, c, length) if save_stats else (0,), torch.float32, x.device)
    stats = utils.alloc((b, _n_stats(policy), length) if save_stats else (0,), torch.float32, x.device)
    _gm_velocity_fwd_kernel[(b * n_tiles,)](
        x, utils.vec(sigma), means, logweights, var, x_src, utils.vec(sigma_src), u, ybar, stats,
        k, c, length, n_tiles,
        *x.stride(), *means.stride(), *logweights.stride(), *var.stride(), *x_src.stride(),
        PER_K_STD=policy.per_component_std, SAVE_STATS=save_stats, **cfg,
    )  # fmt: skip
    return u, ybar, stats


def _gm_velocity_bwd(grad_u, x, sigma, policy: GMTensors, ybar, stats, need_x: bool, need_x_src: bool):
    """(dx, dmeans, dlogweights, dlogstds (B, K1), dx_src); dx / dx_src are empty (0,) unless asked for."""
    means, logweights, logstds, x_src, sigma_src = policy
    b, k, c, length = means.shape
    cfg = common.launch_config(k, c, length, common.LAUNCH["bwd"]["budget"], common.LAUNCH["bwd"]["num_warps"])
    n_tiles = triton.cdiv(length, cfg["BLOCK_L"])
    dev = x.device
    dx = utils.alloc((b, c, length) if need_x else (0,), x.dtype, dev)
    dxs = utils.alloc((b, c, length) if need_x_src else (0,), x_src.dtype, dev)
    dmeans = utils.alloc((b, k, c, length), means.dtype, dev)
    dlw = utils.alloc((b, k, length), logweights.dtype, dev)
    dls_part = utils.alloc((b, n_tiles, logstds.shape[1]), torch.float32, dev)
    var = variances(logstds, sigma_src)
    _gm_velocity_bwd_kernel[(b * n_tiles,)](
        grad_u, x, utils.vec(sigma), means, logweights, var, x_src, utils.vec(sigma_src), ybar, stats,
        dx, dmeans, dlw, dls_part, dxs,
        k, c, length, n_tiles,
        *grad_u.stride(), *x.stride(), *means.stride(), *logweights.stride(), *var.stride(), *x_src.stride(),
        PER_K_STD=policy.per_component_std, NEED_DX=need_x, NEED_DXS=need_x_src, **cfg,
    )  # fmt: skip
    return dx, dmeans, dlw, dls_part.sum(1).to(logstds.dtype), dxs


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, no graph breaks, CUDA-graph capturable): the only place
# the policy record is spelled out as tensors
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("piflow::gm_velocity", mutates_args=())
def gm_velocity_op(
    x: torch.Tensor,
    sigma: torch.Tensor,
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    save_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, ybar, stats): the GM velocity (B, C, L) in x.dtype and, with ``save_stats``, what the backward
    reuses, float32 and not differentiable (empty (0,) tensors otherwise): ybar (B, C, L) =
    sum_k w_k (mu_k - x_src) [/ d_k], stats (B, S, L) = the log2-sum-exp2 of the log2 logits
    [, sum_k w_k beta_k and the pivot's variance var_p with per-component stds (S = 3)] ([eq:gm-backward])."""
    return _gm_velocity_fwd(x, sigma, GMTensors(means, logweights, logstds, x_src, sigma_src), save_stats)


@gm_velocity_op.register_fake
def _gm_velocity_fake(x, sigma, *policy_and_flag):
    *policy, save_stats = policy_and_flag
    b, c, length = x.shape
    shapes = ((b, c, length), (b, _n_stats(GMTensors(*policy)), length)) if save_stats else ((0,), (0,))
    return x.new_empty((b, c, length)), *(x.new_empty(sh, dtype=torch.float32) for sh in shapes)


@torch.library.custom_op("piflow::gm_velocity_bwd", mutates_args=())
def gm_velocity_bwd_op(
    grad_u: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    ybar: torch.Tensor,
    stats: torch.Tensor,
    need_x: bool,
    need_x_src: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dmeans, dlogweights, dlogstds, dx_src) in one pass over the components, from the forward's
    ybar and stats (``piflow::gm_velocity`` with save_stats); dx / dx_src are empty (0,) unless asked for."""
    policy = GMTensors(means, logweights, logstds, x_src, sigma_src)
    return _gm_velocity_bwd(grad_u, x, sigma, policy, ybar, stats, need_x, need_x_src)


@gm_velocity_bwd_op.register_fake
def _gm_velocity_bwd_fake(grad_u, x, sigma, *rest):
    means, logweights, logstds, x_src, _sigma_src, _ybar, _stats, need_x, need_x_src = rest
    b, c, length = x.shape
    return (
        x.new_empty((b, c, length) if need_x else (0,)),
        means.new_empty(means.shape),
        logweights.new_empty(logweights.shape),
        logstds.new_empty(logstds.shape),
        x_src.new_empty((b, c, length) if need_x_src else (0,)),
    )


def _gm_velocity_setup_context(ctx, inputs, output):
    # the inputs and C + 1 (C + 3) floats per pixel of statistics: no (K, C, L) intermediates are kept
    _, ybar, stats = output
    ctx.mark_non_differentiable(ybar, stats)
    ctx.save_for_backward(*inputs[:7], ybar, stats)


def _gm_velocity_backward(ctx, grad_u, _grad_ybar, _grad_stats):
    x, sigma, *policy, ybar, stats = ctx.saved_tensors
    if stats.numel() == 0:  # the op was called with save_stats=False on inputs that need grad: recompute
        _, ybar, stats = torch.ops.piflow.gm_velocity(x, sigma, *policy, True)
    need = ctx.needs_input_grad
    dx, dmeans, dlw, dls, dxs = torch.ops.piflow.gm_velocity_bwd(
        grad_u, x, sigma, *policy, ybar, stats, bool(need[0]), bool(need[5])
    )
    return (
        dx if need[0] else None,
        None,
        dmeans if need[2] else None,
        dlw if need[3] else None,
        dls if need[4] else None,
        dxs if need[5] else None,
        None,
        None,
    )


gm_velocity_op.register_autograd(_gm_velocity_backward, setup_context=_gm_velocity_setup_context)


def gm_velocity_triton(x: torch.Tensor, sigma: torch.Tensor, policy: GMTensors) -> torch.Tensor:
    """GM policy velocity u(x, sigma) by the fused Triton kernels, differentiable ([eq:gm-velocity]).

    Args:
        x: (B, C, L) any float dtype, any strides; sigma: (B,) float32; policy: the flat GM policy
            (means (B, K, C, L), logweights (B, K, L) may hold -inf, logstds (B, 1) or (B, K)).
    Returns:
        u (B, C, L) in x.dtype. Gradients flow to means, logweights, logstds, x and x_src; the backward
        kernel recomputes from the inputs in one pass over the components, with C + 1 floats per pixel
        (C + 3 with per-component stds) saved by the forward. Math in float32. The caller (the
        dispatcher) has checked the kernels' range (:func:`.triton_common.range_problem`).
    """
    # the backward's statistics are written only when a gradient can flow (decided at trace time under
    # torch.compile: grad mode and requires_grad are static there)
    save_stats = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *policy[:4]))
    return torch.ops.piflow.gm_velocity(x, sigma, *policy, save_stats)[0]


__all__ = ["gm_velocity_triton"]
