"""GMFlow policy ops, Triton backend: fused velocity (forward + backward) and whole-rollout kernels.

Flat layout and algebra as in :mod:`piflow_kernels.ops.gm_torch` (the CPU twin these kernels are
checked against, beside the literal ``reference`` package):
    x, x_src (B, C, L); means (B, K, C, L); logweights (B, K, L); logstds (B, K1), K1 in {1, K};
    sigma, sigma_src (B,) float32.

    >>> u = gm_velocity_triton(x, sigma, means, logweights, logstds, x_src, sigma_src)   # (B, C, L)
    >>> u.square().sum().backward()                        # grads for means, logweights, logstds, x, x_src
    >>> x_end = gm_rollout_triton(x, means, logweights, logstds, x_src, sigma_src, s0, n, h, r0, 3.0)

Layers: ``_gm_*_kernel`` -> launcher (``_gm_velocity_fwd`` ...) -> ``torch.library`` ops
``piflow::gm_velocity`` (autograd registered; backward is the ``piflow::gm_velocity_bwd`` op) and
``piflow::gm_rollout`` -> public functions ``gm_velocity_triton`` / ``gm_rollout_triton``, which fall
back to the CPU twin (one logged warning per reason) outside the kernels' range.

Kernel design. One program owns BLOCK_L pixels of one sample and all K components, so the softmax
over K and the contractions over C stay in registers; all math is float32. Components are walked in
chunks of BLOCK_K with an online softmax (running max in log2 units, rescaled sums) when a
(K, C) tile does not fit the register budget. Logits are kept pre-scaled by log2(e) so every
exponential is an exp2, and are evaluated centred on a per-pixel point c (x_src in the velocity
kernel, the prior mixture mean in the rollout): (mu_k - c) . (nu - zeta c) is much smaller than
mu_k . nu at small sigma, and so is its float32 rounding. The rollout kernel keeps the whole policy
tile (mu_k - c, ||mu_k - c||^2, log2-scaled logweights) in registers across all substeps when it fits
(NUM_K_CHUNKS == 1), loops over its sample's substep count read from memory, and writes x once. The
backward kernel recomputes everything from the inputs in ONE pass over the chunks, as flash
attention does: the forward also writes the log-sum-exp of the logits and the softmax-weighted
means of the centred component means (C + 1 floats per pixel, C + 3 with per-component stds; not
K * C), which give every chunk its normalised weights and its logit gradients without the other
chunks. The logstds gradient is reduced over pixels per program into a small
(B, tiles, K) buffer summed on the host side of the op.

Range: K <= 64 and C <= 64 in any combination, logstds per sample or per component, any L, any
strides, float32 / bfloat16 / float16 (float64 inputs are accepted and computed in float32). Beyond
that, or on CPU tensors without TRITON_INTERPRET=1, the functions fall back to the torch twin.
Register-resident rollouts: K * C <= 128 (C <= 16), e.g. K=32, C=4 and K=8, C=16; larger policies
stream their chunks from cache at every substep (correct, slower).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

from piflow_kernels.ops.gm_torch import gm_rollout_torch, gm_velocity_torch

__all__ = ["gm_velocity_triton", "gm_rollout_triton", "MAX_COMPONENTS", "MAX_CHANNELS"]

logger = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
MAX_COMPONENTS = 64  # K range of the kernels (chunked over K beyond the register budget)
MAX_CHANNELS = 64  # C range of the kernels
# Per-thread register budget in fp32 elements of one (BLOCK_K, BLOCK_C) chunk. At 128 a K=32, C=4
# (ImageNet) or K=8, C=16 (FLUX) policy tile stays resident over a rollout (255 registers, no spill
# with Triton 3.6 for sm_90; with per-component stds K=32, C=4 spills 248 bytes). The velocity kernels
# are memory-bound and stream chunks: smaller chunks, fewer registers, more warps in flight. At K=32,
# C=4, one std per sample (python -m bench.sass, Triton 3.6): forward 95 registers at budget 64 (64 at
# 32), backward 168 at budget 32 (47 at 16); the GPU check's sweep times these points.
_TILE_BUDGET_ROLLOUT = 128
_TILE_BUDGET_FWD = 64
_TILE_BUDGET_BWD = 32
# The launch knobs of the three kernels: register budget per chunk and warps per program (None: by the
# pixel count, see _gm_config). Read at every launch, so bench.gpu_check can sweep them on a GPU.
_LAUNCH: dict[str, dict[str, int | None]] = {
    "fwd": {"budget": _TILE_BUDGET_FWD, "num_warps": None},
    "bwd": {"budget": _TILE_BUDGET_BWD, "num_warps": None},
    "rollout": {"budget": _TILE_BUDGET_ROLLOUT, "num_warps": None},
}
# Read once at import: Triton decides interpreter vs compiler when a kernel is decorated.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rcp(x, FAST_RCP: tl.constexpr):
    """1 / x; with FAST_RCP one MUFU.RCP (rcp.approx.ftz, rel. error < 2^-22) instead of the ~8-instruction
    full-range division: a rollout takes K of these per pixel and substep with per-component stds."""
    if FAST_RCP:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


@triton.jit
def _in_thread_slice(b_t, o_i, i: tl.constexpr, AXIS: tl.constexpr):
    """Slice ``i`` of axis AXIS of a register tile whose axis lies within each thread: the sum over that axis
    of the tile with -0.0 everywhere else. ``o_i`` is the axis index broadcastable to the tile. x + (-0.0)
    is x exactly, so once the indices are constants the compiler folds every add and select: the slice
    is a renaming of registers, no instruction."""
    return tl.sum(tl.where(o_i == i, b_t, _neg_zero(b_t.shape)), axis=AXIS)


@triton.jit
def _neg_zero(shape: tl.constexpr):
    """-0.0 of a given shape, as the bit pattern 0x80000000 (a -0.0 literal reaches the IR as +0.0)."""
    return tl.full(shape, -2147483648, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _gm_load_chunk(
    p_means,  # means of this sample, pointer at (b, 0, 0, 0)
    p_lw,  # logweights of this sample, pointer at (b, 0, 0)
    p_ls,  # logstds of this sample, pointer at (b, 0)
    k0,  # first component of the chunk
    K,  # number of components
    o_c,  # (BLOCK_C,) int64 channel offsets
    o_l,  # (BLOCK_L,) int64 pixel offsets
    m_cl,  # (BLOCK_C, BLOCK_L) valid channel and pixel
    m_l,  # (BLOCK_L,) valid pixel
    s_src,  # sigma_src of this sample, unclamped (mu and var use it raw, as the reference does)
    b_xs,  # (BLOCK_C, BLOCK_L) x_src, fp32, 0 where masked
    stride_mk,  # means stride over K
    stride_mc,  # means stride over C
    stride_ml,  # means stride over L
    stride_wk,  # logweights stride over K
    stride_wl,  # logweights stride over L
    stride_sk,  # logstds stride over K (unused for one std per sample)
    BLOCK_K: tl.constexpr,  # components per chunk
    PER_K_STD: tl.constexpr,  # logstds per component (else one per sample)
):
    """One chunk of the policy in x0 space: mu (BK, BC, BL), ||mu||^2 (BK, BL), log2-scaled logweights
    (BK, BL) with -inf on padded components, var (BK, BL) per component (broadcast over pixels) or a
    scalar per sample, m_k (BK,).

    Every (BK, BL) tile is loaded as (BK, 1, BL) and reduced over the unit axis, so it carries the
    same register layout as the reductions of the 3-D tile over C: the compiler then keeps one copy
    of each per-component quantity instead of computing it in two layouts."""
    o_k = k0 + tl.arange(0, BLOCK_K)
    m_k = o_k < K
    o_k64 = o_k.to(tl.int64)
    p_m = p_means + o_k64[:, None, None] * stride_mk + o_c[None, :, None] * stride_mc + o_l[None, None, :] * stride_ml
    b_means = tl.load(p_m, mask=m_k[:, None, None] & m_cl[None, :, :], other=0.0).to(tl.float32)
    b_mu = b_xs[None, :, :] - s_src * b_means
    m_kl = m_k[:, None, None] & m_l[None, None, :]
    p_w = p_lw + o_k64[:, None, None] * stride_wk + o_l[None, None, :] * stride_wl
    b_lw = tl.sum(tl.load(p_w, mask=m_kl, other=0.0).to(tl.float32), axis=1)
    # padded components get -inf (weight 0); padded pixels keep finite 0 so no NaN is ever formed
    b_lw2 = tl.where(m_k[:, None], b_lw * 1.4426950408889634, float("-inf"))
    b_musq = tl.sum(b_mu * b_mu, axis=1)
    if PER_K_STD:
        b_ls = tl.load(p_ls + o_k64 * stride_sk, mask=m_k, other=0.0).to(tl.float32)
        # broadcast over pixels in the layout of b_musq (0 * a finite tile is exactly 0)
        b_var = (tl.exp(2.0 * b_ls) * (s_src * s_src))[:, None] + 0.0 * b_musq
    else:
        b_var = tl.exp(2.0 * tl.load(p_ls).to(tl.float32)) * (s_src * s_src)
    return b_mu, b_musq, b_lw2, b_var, m_k


@triton.jit
def _gm_logits2(
    b_mu,  # (BK, BC, BL) centred component means mu_k - c in x0 space
    b_musq,  # (BK, BL) ||mu_k - c||^2
    b_lw2,  # (BK, BL) logweights * log2(e)
    b_var,  # (BK, BL) or scalar component variance
    b_nup,  # (BC, BL) centred nu' = nu - zeta c
    b_r,  # (BL,) c . nu - zeta/2 ||c||^2 (per-component stds only)
    zeta,  # scalar (a/s)^2 - (a_src/s_src)^2
    g0,  # scalar log2(e) / d_0 (per-component stds only)
    PER_K_STD: tl.constexpr,  # b_var per component (else a scalar)
):
    """Centred log2 logits (BK, BL), 1 / d ((BK, BL), or a scalar per sample) and the dot (mu_k - c) . nu'
    (BK, BL) they contain (the backward reuses it).

    logit_k = lw_k + (mu_k . nu - zeta/2 ||mu_k||^2) / d_k = lw_k + (A_k + r) / d_k with
    A_k = (mu_k - c) . nu' - zeta/2 ||mu_k - c||^2; r is the same for every k, so it is dropped when d
    is, and only its k-varying part r (1/d_k - 1/d_0) is kept with per-component d. The forward, the
    rollout and the backward all evaluate the logits here, so the backward's softmax is normalised by
    the forward's log-sum-exp to within float32 rounding."""
    b_dot = tl.sum(b_mu * b_nup[None, :, :], axis=1)
    if PER_K_STD:
        b_invd = 1.0 / tl.maximum(b_var * zeta + 1.0, 1e-6)
        b_g = 1.4426950408889634 * b_invd
        b_l2 = b_lw2 + (b_dot - (0.5 * zeta) * b_musq) * b_g + b_r[None, :] * (b_g - g0)
        return b_l2, b_invd, b_dot
    else:
        invd = 1.0 / tl.maximum(b_var * zeta + 1.0, 1e-6)
        g = 1.4426950408889634 * invd
        b_l2 = b_lw2 + b_dot * g - b_musq * (g * (0.5 * zeta))
        return b_l2, invd, b_dot


@triton.jit
def _gm_chunk_update(
    b_mu,  # (BK, BC, BL) centred component means mu_k - c in x0 space
    b_musq,  # (BK, BL) ||mu_k - c||^2
    b_lw2,  # (BK, BL) logweights * log2(e)
    b_var,  # (BK, BL) or scalar component variance
    b_nup,  # (BC, BL) centred nu' = nu - zeta c
    b_r,  # (BL,) c . nu - zeta/2 ||c||^2 (used with per-component stds only)
    zeta,  # scalar (a/s)^2 - (a_src/s_src)^2
    g0,  # scalar log2(e) / d of a reference component (per-component stds only)
    b_mrun,  # (BL,) running max of the log2 logits
    b_lrun,  # (BL,) running sum of p_k = exp2(logit_k - max)
    b_accx,  # (BC, BL) running sum_k p_k (mu_k - c) / d_k (per sample: sum_k p_k (mu_k - c))
    b_accv,  # (BL,) running sum_k p_k var_k / d_k (per sample: unused)
    b_accg,  # (BL,) running sum_k p_k / d_k (per sample: unused)
    PER_K_STD: tl.constexpr,  # b_var per component (else a scalar)
):
    """Online-softmax update of the posterior-mean accumulators with one chunk of components (logits
    centred on c, see :func:`_gm_logits2`)."""
    b_l2, b_invd, _ = _gm_logits2(b_mu, b_musq, b_lw2, b_var, b_nup, b_r, zeta, g0, PER_K_STD)
    b_mnew = tl.maximum(b_mrun, tl.max(b_l2, axis=0))
    b_alpha = tl.exp2(b_mrun - b_mnew)
    b_p = tl.exp2(b_l2 - b_mnew[None, :])
    b_lrun = b_lrun * b_alpha + tl.sum(b_p, axis=0)
    if PER_K_STD:
        b_pg = b_p * b_invd
        b_accx = b_accx * b_alpha[None, :] + tl.sum(b_pg[:, None, :] * b_mu, axis=0)
        b_accv = b_accv * b_alpha + tl.sum(b_pg * b_var, axis=0)
        b_accg = b_accg * b_alpha + tl.sum(b_pg, axis=0)
    else:
        b_accx = b_accx * b_alpha[None, :] + tl.sum(b_p[:, None, :] * b_mu, axis=0)
    return b_mnew, b_lrun, b_accx, b_accv, b_accg


@triton.jit
def _gm_x0_from_acc(
    b_lrun,  # (BL,) sum_k p_k
    b_accx,  # (BC, BL) accumulators of _gm_chunk_update
    b_accv,  # (BL,)
    b_accg,  # (BL,)
    b_nu,  # (BC, BL) nu (not centred)
    b_c,  # (BC, BL) the centre c
    var,  # scalar variance (per-sample stds)
    zeta,  # scalar zeta
    acc_scale,  # scalar the per-component accumulators are divided by (they may carry a log2(e))
    FAST_RCP: tl.constexpr,  # approximate reciprocal
    PER_K_STD: tl.constexpr,  # per-component stds
):
    """x0 = sum_k w_k (var_k nu + mu_k) / d_k from the (centred) accumulators."""
    if PER_K_STD:
        b_inv = _rcp(b_lrun * acc_scale, FAST_RCP)
        return (b_accx + b_c * b_accg[None, :] + b_nu * b_accv[None, :]) * b_inv[None, :]
    else:
        invd = _rcp(tl.maximum(var * zeta + 1.0, 1e-6), FAST_RCP)
        b_inv = _rcp(b_lrun, FAST_RCP)
        return (b_accx * b_inv[None, :] + b_c + b_nu * var) * invd


@triton.jit
def _gm_posterior_x0(
    p_means,  # means of this sample
    p_lw,  # logweights of this sample
    p_ls,  # logstds of this sample
    K,  # number of components
    o_c,  # (BC,) channel offsets
    o_l,  # (BL,) pixel offsets
    m_cl,  # (BC, BL) valid mask
    m_l,  # (BL,) valid pixel
    s_src,  # raw sigma_src
    b_xsc,  # (BC, BL) x_src - c, so that the loaded chunks are mu_k - c
    b_c,  # (BC, BL) the centre c
    b_csq,  # (BL,) ||c||^2
    b_nu,  # (BC, BL) nu
    zeta,  # scalar zeta
    var0,  # scalar: variance of component 0 (the reference d_0), or the per-sample variance
    stride_mk,  # means stride over K
    stride_mc,  # means stride over C
    stride_ml,  # means stride over L
    stride_wk,  # logweights stride over K
    stride_wl,  # logweights stride over L
    stride_sk,  # logstds stride over K
    BLOCK_K: tl.constexpr,  # components per chunk
    BLOCK_C: tl.constexpr,  # padded channels
    BLOCK_L: tl.constexpr,  # pixels per program
    NUM_K_CHUNKS: tl.constexpr,  # ceil(K / BLOCK_K)
    PER_K_STD: tl.constexpr,  # logstds per component
    FAST_RCP: tl.constexpr,  # approximate reciprocal
):
    """x0 (BC, BL) of the GM posterior at (nu, zeta), streaming the components from memory, and the
    softmax statistics of the centred log2 logits: running max (BL,) and sum of exp2(logit - max) (BL,)."""
    b_mrun = tl.full((BLOCK_L,), -1e30, tl.float32)
    b_lrun = tl.zeros((BLOCK_L,), tl.float32)
    b_accx = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)
    b_accv = tl.zeros((BLOCK_L,), tl.float32)
    b_accg = tl.zeros((BLOCK_L,), tl.float32)
    b_nup = b_nu - zeta * b_c
    b_r = tl.sum(b_c * b_nu, axis=0) - (0.5 * zeta) * b_csq
    g0 = 1.4426950408889634 / tl.maximum(var0 * zeta + 1.0, 1e-6)
    for i_k in range(NUM_K_CHUNKS):
        b_mu, b_musq, b_lw2, b_var, m_k = _gm_load_chunk(
            p_means, p_lw, p_ls, i_k * BLOCK_K, K, o_c, o_l, m_cl, m_l, s_src, b_xsc,
            stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_sk, BLOCK_K, PER_K_STD,
        )  # fmt: skip
        b_mrun, b_lrun, b_accx, b_accv, b_accg = _gm_chunk_update(
            b_mu, b_musq, b_lw2, b_var, b_nup, b_r, zeta, g0, b_mrun, b_lrun, b_accx, b_accv, b_accg, PER_K_STD
        )
    b_x0 = _gm_x0_from_acc(b_lrun, b_accx, b_accv, b_accg, b_nu, b_c, var0, zeta, 1.0, FAST_RCP, PER_K_STD)
    return b_x0, b_mrun, b_lrun, b_accx, b_accv, b_accg


@triton.jit
def _gm_var0(p_ls, s_src):
    """Variance of component 0 (per-sample std: the variance), the reference of the centred logits."""
    return tl.exp(2.0 * tl.load(p_ls).to(tl.float32)) * (s_src * s_src)


@triton.jit
def _gm_program(n_tiles, C, L, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's sample and tile: i_b, i_t, i_b as int64, pixel offsets (BL,) and channel offsets (BC,)
    as int64, the pixel mask (BL,) and the channel-and-pixel mask (BC, BL)."""
    i_p = tl.program_id(0)
    i_b = i_p // n_tiles
    i_t = i_p % n_tiles
    o_l = i_t.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    o_c = tl.arange(0, BLOCK_C).to(tl.int64)
    m_l = o_l < L
    return i_b, i_t, i_b.to(tl.int64), o_l, o_c, m_l, (o_c < C)[:, None] & m_l[None, :]


@triton.jit
def _gm_sigmas(p_sigma, p_ssrc, i_b):
    """Per-sample scalars of the velocity at sigma: raw sigma_src, clamped sigma, a, a_src, 1/s, 1/s_src, zeta."""
    s_src_raw = tl.load(p_ssrc + i_b).to(tl.float32)
    s = tl.maximum(tl.load(p_sigma + i_b).to(tl.float32), 1e-6)
    s_src = tl.maximum(s_src_raw, 1e-6)
    a = 1.0 - s
    a_src = 1.0 - s_src
    inv_s = 1.0 / s
    inv_ssrc = 1.0 / s_src
    zeta = a * a * inv_s * inv_s - a_src * a_src * inv_ssrc * inv_ssrc
    return s_src_raw, s, a, a_src, inv_s, inv_ssrc, zeta


# Pointers are not specialized on 16-byte alignment. Aligned, Triton vectorizes the loads 4-wide along L
# and the compute layout follows (4 pixels per thread, the rest of the warp and the other warps spread
# over C and K), so every reduction over K or C becomes shuffles or shared memory plus barriers. Measured
# on an H100 (Triton 3.6) with aligned pointers, the 128-substep B=512, K=32, C=4, 32x32 rollout took
# 8.3 / 3.1 / 1.8 ms at 4 / 2 / 1 warps. Unaligned, a warp still reads 32 consecutive floats per
# load (one 128-byte transaction) and each thread owns whole pixels: compiled for sm_90 by Triton 3.6 with
# the launch's own specialization (python -m bench.sass), the substep loop is 472 instructions per pixel
# (312 FFMA, 32 MUFU.EX2), with no shuffles, barriers or spills, and the forward kernel has none either. One aligned per-pixel
# pointer is enough to bring the vectorized layout back (a store of the backward's statistics did: 9
# barriers in the forward), so every pointer to a per-pixel tensor is listed; only the (B,)-sized
# per-sample vectors and the per-program logstds partials keep the specialization.
_UNALIGNED = ["p_x", "p_out", "p_u", "p_g", "p_means", "p_lw", "p_xs", "p_dx", "p_dmeans", "p_dlw", "p_dxs", "p_ybar", "p_stats"]


@triton.jit(do_not_specialize_on_alignment=_UNALIGNED)
def _gm_velocity_fwd_kernel(
    p_x,  # x (B, C, L), any float dtype, strided
    p_sigma,  # sigma (B,) float32, contiguous
    p_means,  # means (B, K, C, L), strided
    p_lw,  # logweights (B, K, L), strided
    p_ls,  # logstds (B, K1), strided
    p_xs,  # x_src (B, C, L), strided
    p_ssrc,  # sigma_src (B,) float32, contiguous
    p_u,  # out: u (B, C, L) contiguous, dtype of x
    p_ybar,  # out (SAVE_STATS): sum_k w_k (mu_k - c) [/ d_k with per-component stds] (B, C, L) float32
    p_stats,  # out (SAVE_STATS): (B, S, L) float32: lse2 = log2 sum_k 2^logit2_k, then for per-component
    #           stds (S = 3) sum_k w_k var_k / d_k and sum_k w_k / d_k
    K,  # number of components
    C,  # number of channels
    L,  # pixels per sample
    n_tiles,  # programs per sample = ceil(L / BLOCK_L)
    stride_xb, stride_xc, stride_xl,  # x strides
    stride_mb, stride_mk, stride_mc, stride_ml,  # means strides
    stride_wb, stride_wk, stride_wl,  # logweights strides
    stride_sb, stride_sk,  # logstds strides
    stride_yb, stride_yc, stride_yl,  # x_src strides
    BLOCK_K: tl.constexpr,  # components per chunk
    BLOCK_C: tl.constexpr,  # next power of two >= C
    BLOCK_L: tl.constexpr,  # pixels per program
    NUM_K_CHUNKS: tl.constexpr,  # ceil(K / BLOCK_K)
    PER_K_STD: tl.constexpr,  # logstds per component (else one per sample)
    FAST_RCP: tl.constexpr,  # NVIDIA GPU: approximate reciprocal by inline PTX (not in the interpreter)
    SAVE_STATS: tl.constexpr,  # write ybar and stats for the backward
):
    i_b, i_t, i_b64, o_l, o_c, m_l, m_cl = _gm_program(n_tiles, C, L, BLOCK_C, BLOCK_L)
    s_src_raw, s, a, a_src, inv_s, inv_ssrc, zeta = _gm_sigmas(p_sigma, p_ssrc, i_b)

    o_x = i_b64 * stride_xb + o_c[:, None] * stride_xc + o_l[None, :] * stride_xl
    b_x = tl.load(p_x + o_x, mask=m_cl, other=0.0).to(tl.float32)
    o_y = i_b64 * stride_yb + o_c[:, None] * stride_yc + o_l[None, :] * stride_yl
    b_xs = tl.load(p_xs + o_y, mask=m_cl, other=0.0).to(tl.float32)
    b_nu = (a * inv_s * inv_s) * b_x - (a_src * inv_ssrc * inv_ssrc) * b_xs

    # logits centred on c = x_src (free: the chunks then load as mu_k - c = -s_src means_k)
    p_ls_b = p_ls + i_b64 * stride_sb
    b_x0, b_mrun, b_lrun, b_accx, b_accv, b_accg = _gm_posterior_x0(
        p_means + i_b64 * stride_mb, p_lw + i_b64 * stride_wb, p_ls_b, K,
        o_c, o_l, m_cl, m_l, s_src_raw, tl.zeros_like(b_xs), b_xs, tl.sum(b_xs * b_xs, axis=0), b_nu, zeta,
        _gm_var0(p_ls_b, s_src_raw), stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_sk,
        BLOCK_K, BLOCK_C, BLOCK_L, NUM_K_CHUNKS, PER_K_STD, FAST_RCP,
    )  # fmt: skip
    b_u = (b_x - b_x0) * inv_s
    o_u = i_b64 * C * L + o_c[:, None] * L + o_l[None, :]
    tl.store(p_u + o_u, b_u.to(p_u.dtype.element_ty), mask=m_cl)
    if SAVE_STATS:
        b_invl = 1.0 / b_lrun
        tl.store(p_ybar + o_u, b_accx * b_invl[None, :], mask=m_cl)
        o_s = i_b64 * (3 if PER_K_STD else 1) * L + o_l
        tl.store(p_stats + o_s, b_mrun + tl.log2(b_lrun), mask=m_l)
        if PER_K_STD:
            tl.store(p_stats + o_s + L, b_accv * b_invl, mask=m_l)
            tl.store(p_stats + o_s + 2 * L, b_accg * b_invl, mask=m_l)


@triton.jit(do_not_specialize_on_alignment=_UNALIGNED)
def _gm_velocity_bwd_kernel(
    p_g,  # dL/du (B, C, L), strided (may be an expanded stride-0 view)
    p_x,  # x (B, C, L), strided
    p_sigma,  # sigma (B,) float32, contiguous
    p_means,  # means (B, K, C, L), strided
    p_lw,  # logweights (B, K, L), strided
    p_ls,  # logstds (B, K1), strided
    p_xs,  # x_src (B, C, L), strided
    p_ssrc,  # sigma_src (B,) float32, contiguous
    p_ybar,  # the forward's ybar (B, C, L) float32, contiguous
    p_stats,  # the forward's stats (B, S, L) float32, contiguous: lse2 [, vbar, hbar with per-component stds]
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
    stride_sb, stride_sk,  # logstds strides
    stride_yb, stride_yc, stride_yl,  # x_src strides
    BLOCK_K: tl.constexpr,  # components per chunk
    BLOCK_C: tl.constexpr,  # next power of two >= C
    BLOCK_L: tl.constexpr,  # pixels per program
    NUM_K_CHUNKS: tl.constexpr,  # ceil(K / BLOCK_K)
    PER_K_STD: tl.constexpr,  # logstds per component (else one per sample)
    NEED_DX: tl.constexpr,  # write dL/dx
    NEED_DXS: tl.constexpr,  # write dL/dx_src
):
    # Notation: gx0 = dL/dx0 = -g / s, m_k = (var_k nu + mu_k) / d_k, e_k = gx0 . m_k,
    # q_k = (mu_k . nu - zeta/2 ||mu_k||^2) / d_k (logit minus logweight), w = softmax(lw + q).
    #   dL/dlogit_k = w_k (e_k - sum_j w_j e_j)                      =: gl_k
    #   dL/dmu_k    = (w_k gx0 + gl_k (nu - zeta mu_k)) / d_k
    #   dL/dnu      = sum_k (gl_k mu_k + w_k var_k gx0) / d_k
    #   dL/dd_k     = -(w_k e_k + gl_k q_k) / d_k ;  dL/dvar_k = w_k (gx0 . nu) / d_k + zeta dL/dd_k
    # One pass over the components, as in flash attention: the forward saved the softmax normaliser
    # (its log-sum-exp) and the weighted means of what e_k is linear in, so the weights and gl_k of a
    # chunk need no other chunk. Everything is evaluated centred on c = x_src like the forward (the
    # chunks load as mu'_k = mu_k - c = -s_src means_k; nu - zeta mu_k = nu' - zeta mu'_k, nu' = nu - zeta c):
    #   e_k = (gx0 . mu'_k + var_k gx0 . nu + gx0 . c) / d_k, and gl_k = w_k (e_k - ebar) is formed as
    #   w_k [gx0 . (mu'_k / d_k - ybar) + gx0.nu (var_k / d_k - vbar) + gx0.c (1 / d_k - hbar)] with the
    #   forward's ybar = sum_j w_j mu'_j / d_j, vbar, hbar; with one d the last two terms are 0 and
    #   gl_k = w_k gx0 . (mu'_k - ybar) / d, ybar = sum_j w_j mu'_j. No large terms cancel, and a pixel
    #   whose weight sits on one component gets gl = 0 exactly, as it should.
    i_b, i_t, i_b64, o_l, o_c, m_l, m_cl = _gm_program(n_tiles, C, L, BLOCK_C, BLOCK_L)
    s_src_raw, s, a, a_src, inv_s, inv_ssrc, zeta = _gm_sigmas(p_sigma, p_ssrc, i_b)

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
    b_nu = (a * inv_s * inv_s) * b_x - (a_src * inv_ssrc * inv_ssrc) * b_xs
    b_nup = b_nu - zeta * b_xs
    b_gx0 = -b_g * inv_s
    b_gxnu = tl.sum(b_gx0 * b_nu, axis=0)  # (BL,)
    b_gxc = tl.sum(b_gx0 * b_xs, axis=0)  # gx0 . c
    b_r = tl.sum(b_xs * b_nu, axis=0) - (0.5 * zeta) * tl.sum(b_xs * b_xs, axis=0)  # q_k = (A_k + r) / d_k
    if PER_K_STD:
        b_vbar = tl.load(p_stats + o_s + L, mask=m_l, other=0.0)
        b_hbar = tl.load(p_stats + o_s + 2 * L, mask=m_l, other=0.0)
    else:
        b_gxybar = tl.sum(b_gx0 * b_ybar, axis=0)

    p_means_b = p_means + i_b64 * stride_mb
    p_lw_b = p_lw + i_b64 * stride_wb
    p_ls_b = p_ls + i_b64 * stride_sb
    g0 = 1.4426950408889634 / tl.maximum(_gm_var0(p_ls_b, s_src_raw) * zeta + 1.0, 1e-6)
    b_zero = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)

    b_dnu = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)
    b_dmusum = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)
    b_gldsum = tl.zeros((BLOCK_L,), tl.float32)
    o_dmeans = i_b64 * K * C * L + o_c[None, :, None] * L + o_l[None, None, :]
    o_dlw = i_b64 * K * L + o_l[None, :]
    o_dls = (i_b64 * n_tiles + i_t) * (K if PER_K_STD else 1)
    b_dls_px = tl.zeros((BLOCK_L,), tl.float32)  # one std per sample: per-pixel sum over k, reduced once at the end
    for i_k in range(NUM_K_CHUNKS):
        k0 = i_k * BLOCK_K
        b_mu, b_musq, b_lw2, b_var, m_k = _gm_load_chunk(
            p_means_b, p_lw_b, p_ls_b, k0, K, o_c, o_l, m_cl, m_l, s_src_raw, b_zero,
            stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_sk, BLOCK_K, PER_K_STD,
        )  # fmt: skip
        b_l2, b_invd, b_dot = _gm_logits2(b_mu, b_musq, b_lw2, b_var, b_nup, b_r, zeta, g0, PER_K_STD)
        b_w = tl.exp2(b_l2 - b_lse[None, :])
        b_dpre = b_var * zeta + 1.0
        b_a = b_dot - (0.5 * zeta) * b_musq  # A_k
        b_gxmu = tl.sum(b_gx0[None, :, :] * b_mu, axis=1)
        b_e = (b_var * b_gxnu[None, :] + b_gxmu + b_gxc[None, :]) * b_invd
        if PER_K_STD:
            b_de = (
                tl.sum(b_gx0[None, :, :] * (b_mu * b_invd[:, None, :] - b_ybar[None, :, :]), axis=1)
                + b_gxnu[None, :] * (b_var * b_invd - b_vbar[None, :])
                + b_gxc[None, :] * (b_invd - b_hbar[None, :])
            )
        else:
            b_de = (b_gxmu - b_gxybar[None, :]) * b_invd
        b_gl = b_w * b_de
        b_wd = b_w * b_invd
        b_gld = b_gl * b_invd

        o_k64 = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        m_kl = m_k[:, None] & m_l[None, :]
        tl.store(p_dlw + o_dlw + o_k64[:, None] * L, b_gl.to(p_dlw.dtype.element_ty), mask=m_kl)

        b_dmu = b_wd[:, None, :] * b_gx0[None, :, :] + b_gld[:, None, :] * (b_nup[None, :, :] - zeta * b_mu)
        p_dm = p_dmeans + o_dmeans + o_k64[:, None, None] * C * L
        tl.store(p_dm, (-s_src_raw * b_dmu).to(p_dmeans.dtype.element_ty), mask=m_k[:, None, None] & m_cl[None, :, :])
        b_dmusum += tl.sum(b_dmu, axis=0)
        # sum_k gl_k mu_k / d_k = sum_k gl_k (mu_k - c) / d_k + c sum_k gl_k / d_k; with one d the last sum
        # is (sum_k gl_k) / d = 0 exactly and is left out
        if PER_K_STD:
            b_dnu += tl.sum(b_gld[:, None, :] * b_mu, axis=0) + b_gx0 * tl.sum(b_wd * b_var, axis=0)[None, :]
            b_gldsum += tl.sum(b_gld, axis=0)
        else:
            b_dnu += tl.sum(b_gld[:, None, :] * b_mu, axis=0) + b_gx0 * (tl.sum(b_wd, axis=0) * b_var)[None, :]

        # d = max(var zeta + 1, eps): no gradient through the clamp (torch.clamp passes it at >= eps)
        if PER_K_STD:
            b_dd = -(b_w * b_e + b_gl * ((b_a + b_r[None, :]) * b_invd)) * b_invd
        else:
            # one d for all k: only sum_k dL/dd_k is used, and sum_k gl_k = 0, so q_k may be shifted by any
            # per-pixel constant; q_k - r/d - lse = log(w_k) - lw_k is O(1) for the components that carry
            # weight instead of O(zeta ||mu||^2), which cuts the float32 cancellation in the logstds gradient
            b_dd = -(b_w * b_e + b_gl * (b_a * b_invd - b_lse[None, :] * 0.6931471805599453)) * b_invd
        b_dd = tl.where(b_dpre >= 1e-6, b_dd, 0.0)
        # dL/dlogstd_k = 2 var_k dL/dvar_k, summed over this tile's pixels (masked pixels contribute 0)
        b_dls = 2.0 * b_var * (b_wd * b_gxnu[None, :] + zeta * b_dd)
        if PER_K_STD:  # one gradient per component: reduced over this tile's pixels chunk by chunk
            tl.store(p_dls + o_dls + o_k64, tl.sum(b_dls, axis=1), mask=m_k)
        else:  # summed over k within each thread; one reduction over the pixels after the last chunk
            b_dls_px += tl.sum(b_dls, axis=0)

    if PER_K_STD:
        b_dnu += b_xs * b_gldsum[None, :]
    else:
        tl.store(p_dls + o_dls, tl.sum(b_dls_px, axis=0))
    if NEED_DX:
        b_dx = b_g * inv_s + (a * inv_s * inv_s) * b_dnu
        tl.store(p_dx + o_out, b_dx.to(p_dx.dtype.element_ty), mask=m_cl)
    if NEED_DXS:
        b_dxs = b_dmusum - (a_src * inv_ssrc * inv_ssrc) * b_dnu
        tl.store(p_dxs + o_out, b_dxs.to(p_dxs.dtype.element_ty), mask=m_cl)


@triton.jit(do_not_specialize_on_alignment=_UNALIGNED)
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
    s_src = tl.maximum(s_src_raw, 1e-6)
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
            r = tl.maximum(r - h, 0.0)
            s_next = shift * r * _rcp(1.0 + (shift - 1.0) * r, FAST_RCP)
            s_c = tl.maximum(s, 1e-6)
            inv_s = _rcp(s_c, FAST_RCP)
            a = 1.0 - s_c
            zeta = a * a * inv_s * inv_s - c_src
            b_nu = (a * inv_s * inv_s) * b_x - b_nusrc
            if PER_K_STD:
                b_dot = tl.sum(b_mu * (b_nu - zeta * b_c)[None, :, :], axis=1)
                # only g_k = log2(e) / d_k is kept per component (registers: the tile already holds ~200)
                b_g = 1.4426950408889634 * _rcp(tl.maximum(b_var * zeta + 1.0, 1e-6), FAST_RCP)
                g0 = 1.4426950408889634 / tl.maximum(var0 * zeta + 1.0, 1e-6)
                b_r = tl.sum(b_c * b_nu, axis=0) - (0.5 * zeta) * b_csq
                b_l2 = b_lw2 + (b_dot - (0.5 * zeta) * b_musq) * b_g + b_r[None, :] * (b_g - g0)
                b_m = tl.max(b_l2, axis=0)
                b_p = tl.exp2(b_l2 - b_m[None, :])
                b_pg = b_p * b_g  # p_k / d_k, times log2(e), undone in _gm_x0_from_acc
                b_x0 = _gm_x0_from_acc(
                    tl.sum(b_p, axis=0), tl.sum(b_pg[:, None, :] * b_mu, axis=0), tl.sum(b_pg * b_var, axis=0),
                    tl.sum(b_pg, axis=0), b_nu, b_c, var0, zeta, 1.4426950408889634, FAST_RCP, PER_K_STD,
                )  # fmt: skip
            else:
                # The contractions are written as explicit chains of FMAs, one term per (unrolled) channel or
                # component, instead of tl.sum over a product: Triton may reduce in-thread axes as a tree
                # (3.9 does: mul, then adds), and a chain that starts from the logit's other terms folds
                # them in. Slices of in-thread axes cost no instructions (_in_thread_slice).
                g1 = 1.4426950408889634 * _rcp(tl.maximum(b_var * zeta + 1.0, 1e-6), FAST_RCP)
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
            r = tl.maximum(r - h, 0.0)
            s_next = shift * r * _rcp(1.0 + (shift - 1.0) * r, FAST_RCP)
            s_c = tl.maximum(s, 1e-6)
            inv_s = _rcp(s_c, FAST_RCP)
            a = 1.0 - s_c
            zeta = a * a * inv_s * inv_s - c_src
            b_nu = (a * inv_s * inv_s) * b_x - b_nusrc
            b_x0, _, _, _, _, _ = _gm_posterior_x0(
                p_means_b, p_lw_b, p_ls_b, K, o_c, o_l, m_cl, m_l, s_src_raw, -b_cxs, b_c, b_csq, b_nu, zeta,
                var0, stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_sk,
                BLOCK_K, BLOCK_C, BLOCK_L, NUM_K_CHUNKS, PER_K_STD, FAST_RCP,
            )  # fmt: skip
            b_x = b_x + (b_x - b_x0) * ((s_next - s) * inv_s)
            s = s_next

    o_out = i_b64 * C * L + o_c[:, None] * L + o_l[None, :]
    tl.store(p_out + o_out, b_x.to(p_out.dtype.element_ty), mask=m_cl)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _gm_config(k: int, c: int, length: int, budget: int, num_warps: int | None = None) -> dict[str, int]:
    """Block sizes and warps (see _gm_config_cached); a fresh dict per call, computed once per argument set."""
    return dict(_gm_config_cached(k, c, length, budget, num_warps))


@functools.lru_cache(maxsize=256)
def _gm_config_cached(k: int, c: int, length: int, budget: int, num_warps: int | None) -> dict[str, int]:
    """Block sizes and warps. All C per program, K in chunks of BLOCK_K.

    Triton's default layout fills a warp's threads along L (the fastest axis) first, then along C.
    Up to 16 channels one thread owns whole pixels (BLOCK_L = 32 * num_warps), so reductions over
    K and C need no shuffles; above that t_c = BLOCK_C / 16 threads share a pixel inside one warp
    (BLOCK_L = 32 / t_c, one warp per program), which keeps the per-thread state (x, x_src, nu,
    accumulators: about 5 * C floats) out of local memory. BLOCK_K * BLOCK_C / t_c <= budget.
    ``num_warps`` overrides the warps per program where one thread owns whole pixels."""
    block_c = triton.next_power_of_2(c)
    t_c = max(1, block_c // 16)
    block_k = triton.next_power_of_2(k)
    if block_k * block_c > budget * t_c:  # chunked: a smaller chunk leaves room for the online-softmax state
        block_k = max(1, budget * t_c // (2 * block_c))
    if t_c == 1:
        if num_warps is None:
            num_warps = 4 if length >= 128 else (2 if length >= 64 else 1)
        block_l = min(32 * num_warps, max(triton.next_power_of_2(length), 2))
    else:
        num_warps = 1
        block_l = 32 // t_c
    return {
        "BLOCK_K": block_k,
        "BLOCK_C": block_c,
        "BLOCK_L": block_l,
        "NUM_K_CHUNKS": triton.cdiv(k, block_k),
        "num_warps": num_warps,
    }


def _fast_rcp(t: torch.Tensor) -> bool:
    """Inline-PTX reciprocal only where PTX exists: compiled kernels on NVIDIA GPUs."""
    return t.device.type == "cuda" and torch.version.hip is None and not _INTERPRET


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests swap in NaN-filled allocations)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _vec(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (B,) per-sample scalar as a contiguous tensor of ``dtype`` (expanded 0-d sigmas have stride 0)."""
    return t.to(dtype).contiguous()


def _gm_velocity_fwd(x, sigma, means, logweights, logstds, x_src, sigma_src, save_stats):
    """u (B, C, L) in x.dtype, and with ``save_stats`` the backward's ybar (B, C, L) and stats (B, S, L)
    in float32 (else empty (0,) tensors); S = 3 with per-component stds, else 1."""
    b, k, c, length = means.shape
    cfg = _gm_config(k, c, length, _LAUNCH["fwd"]["budget"], _LAUNCH["fwd"]["num_warps"])
    n_tiles = triton.cdiv(length, cfg["BLOCK_L"])
    u = _alloc((b, c, length), x.dtype, x.device)
    ybar = _alloc((b, c, length) if save_stats else (0,), torch.float32, x.device)
    stats = _alloc((b, _n_stats(logstds), length) if save_stats else (0,), torch.float32, x.device)
    _gm_velocity_fwd_kernel[(b * n_tiles,)](
        x, _vec(sigma), means, logweights, logstds, x_src, _vec(sigma_src), u, ybar, stats,
        k, c, length, n_tiles,
        *x.stride(), *means.stride(), *logweights.stride(), *logstds.stride(), *x_src.stride(),
        PER_K_STD=logstds.shape[1] > 1, FAST_RCP=_fast_rcp(x), SAVE_STATS=save_stats, **cfg,
    )  # fmt: skip
    return u, ybar, stats


def _n_stats(logstds: torch.Tensor) -> int:
    """Rows of the forward's saved per-pixel statistics: lse2, and vbar, hbar with per-component stds."""
    return 3 if logstds.shape[1] > 1 else 1


def _gm_velocity_bwd(grad_u, x, sigma, means, logweights, logstds, x_src, sigma_src, ybar, stats, need_x, need_x_src):
    b, k, c, length = means.shape
    cfg = _gm_config(k, c, length, _LAUNCH["bwd"]["budget"], _LAUNCH["bwd"]["num_warps"])
    n_tiles = triton.cdiv(length, cfg["BLOCK_L"])
    dev = x.device
    dx = _alloc((b, c, length) if need_x else (0,), x.dtype, dev)
    dxs = _alloc((b, c, length) if need_x_src else (0,), x_src.dtype, dev)
    dmeans = _alloc((b, k, c, length), means.dtype, dev)
    dlw = _alloc((b, k, length), logweights.dtype, dev)
    dls_part = _alloc((b, n_tiles, logstds.shape[1]), torch.float32, dev)
    _gm_velocity_bwd_kernel[(b * n_tiles,)](
        grad_u, x, _vec(sigma), means, logweights, logstds, x_src, _vec(sigma_src), ybar, stats,
        dx, dmeans, dlw, dls_part, dxs,
        k, c, length, n_tiles,
        *grad_u.stride(), *x.stride(), *means.stride(), *logweights.stride(), *logstds.stride(), *x_src.stride(),
        PER_K_STD=logstds.shape[1] > 1, NEED_DX=need_x, NEED_DXS=need_x_src, **cfg,
    )  # fmt: skip
    return dx, dmeans, dlw, dls_part.sum(1).to(logstds.dtype), dxs  # (B, K1)


def _gm_rollout(x_start, means, logweights, logstds, x_src, sigma_src, sigma_start, n_substeps, substep_size, r_start, shift):
    b, k, c, length = means.shape
    cfg = _gm_config(k, c, length, _LAUNCH["rollout"]["budget"], _LAUNCH["rollout"]["num_warps"])
    n_tiles = triton.cdiv(length, cfg["BLOCK_L"])
    out = _alloc((b, c, length), x_start.dtype, x_start.device)
    _gm_rollout_kernel[(b * n_tiles,)](
        x_start, out, means, logweights, logstds, x_src,
        _vec(sigma_src), _vec(sigma_start), _vec(n_substeps, torch.int32), _vec(substep_size), _vec(r_start),
        float(shift), k, c, length, n_tiles,
        *x_start.stride(), *means.stride(), *logweights.stride(), *logstds.stride(), *x_src.stride(),
        PER_K_STD=logstds.shape[1] > 1, FAST_RCP=_fast_rcp(x_start), **cfg,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, no graph breaks, CUDA-graph capturable)
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
    """(u, ybar, stats): the GM velocity (B, C, L) in x.dtype (flat layout as :func:`gm_velocity_triton`)
    and, with ``save_stats``, what the backward reuses, float32 and not differentiable (empty (0,)
    tensors otherwise): ybar (B, C, L) = sum_k w_k (mu_k - x_src) [/ d_k], stats (B, S, L) = the
    log2-sum-exp2 of the centred log2 logits [, sum_k w_k var_k / d_k, sum_k w_k / d_k with
    per-component stds (S = 3)]."""
    return _gm_velocity_fwd(x, sigma, means, logweights, logstds, x_src, sigma_src, save_stats)


@gm_velocity_op.register_fake
def _gm_velocity_fake(x, sigma, means, logweights, logstds, x_src, sigma_src, save_stats):
    b, c, length = x.shape
    shapes = ((b, c, length), (b, _n_stats(logstds), length)) if save_stats else ((0,), (0,))
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
    return _gm_velocity_bwd(grad_u, x, sigma, means, logweights, logstds, x_src, sigma_src, ybar, stats, need_x, need_x_src)


@gm_velocity_bwd_op.register_fake
def _gm_velocity_bwd_fake(grad_u, x, sigma, means, logweights, logstds, x_src, sigma_src, ybar, stats, need_x, need_x_src):
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
    x, sigma, means, logweights, logstds, x_src, sigma_src, ybar, stats = ctx.saved_tensors
    if stats.numel() == 0:  # the op was called with save_stats=False on inputs that need grad: recompute
        _, ybar, stats = torch.ops.piflow.gm_velocity(x, sigma, means, logweights, logstds, x_src, sigma_src, True)
    need = ctx.needs_input_grad
    dx, dmeans, dlw, dls, dxs = torch.ops.piflow.gm_velocity_bwd(
        grad_u, x, sigma, means, logweights, logstds, x_src, sigma_src, ybar, stats, bool(need[0]), bool(need[5])
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
    """Whole GM rollout in one launch, x_end (B, C, L) in x_start.dtype (no autograd)."""
    return _gm_rollout(
        x_start, means, logweights, logstds, x_src, sigma_src, sigma_start, n_substeps, substep_size, r_start, shift
    )


@gm_rollout_op.register_fake
def _gm_rollout_fake(x_start, means, logweights, logstds, x_src, sigma_src, *schedule):
    return x_start.new_empty((x_start.shape[0], x_start.shape[1], x_start.shape[2]))


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------

_warned: set[str] = set()


def _fallback_reason(x: torch.Tensor, means: torch.Tensor) -> str | None:
    """Why the kernels cannot run these inputs (None when they can). Decided from shapes and devices only."""
    k, c = means.shape[1], means.shape[2]
    if k > MAX_COMPONENTS or c > MAX_CHANNELS:
        return f"K={k}, C={c} is outside the Triton kernels' range (K <= {MAX_COMPONENTS}, C <= {MAX_CHANNELS})"
    if x.device.type == "cpu" and not _INTERPRET:
        return "CPU tensors need TRITON_INTERPRET=1 set before piflow_kernels.ops.gm_triton is imported"
    if x.device.type not in ("cpu", "cuda"):
        return f"device {x.device.type!r} has no Triton backend here"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("piflow_kernels: GM Triton kernels fall back to the torch path: %s", reason)


def gm_velocity_triton(
    x: torch.Tensor,
    sigma: torch.Tensor,
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
) -> torch.Tensor:
    """GM policy velocity u(x, sigma) by the fused Triton kernels, differentiable.

    Args:
        x, x_src: (B, C, L) any float dtype, any strides; sigma, sigma_src: (B,) float32.
        means: (B, K, C, L); logweights: (B, K, L) (may hold -inf); logstds: (B, 1) or (B, K).
    Returns:
        u (B, C, L) in x.dtype. Gradients flow to means, logweights, logstds, x and x_src; the
        backward kernel recomputes from the inputs in one pass over the components, with C + 1 floats
        per pixel (C + 3 with per-component stds) saved by the forward. Math in float32.
    """
    reason = _fallback_reason(x, means)
    if reason is not None:
        _warn_once(reason)
        return gm_velocity_torch(x, sigma, means, logweights, logstds, x_src, sigma_src)
    # the backward's statistics are written only when a gradient can flow (decided at trace time under
    # torch.compile: grad mode and requires_grad are static there)
    save_stats = torch.is_grad_enabled() and any(t.requires_grad for t in (x, means, logweights, logstds, x_src))
    return torch.ops.piflow.gm_velocity(x, sigma, means, logweights, logstds, x_src, sigma_src, save_stats)[0]


def gm_rollout_triton(
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
    """Whole GM rollout (DESIGN.md section 4) in one kernel launch, no host synchronisation.

    Args:
        x_start, x_src: (B, C, L); means (B, K, C, L); logweights (B, K, L); logstds (B, 1) or (B, K).
        sigma_src, sigma_start, substep_size, r_start: (B,) float32; n_substeps: (B,) int32.
        shift: the time shift of the substep grid.
    Returns:
        x_end (B, C, L) in x_start.dtype (no autograd).
    """
    reason = _fallback_reason(x_start, means)
    if reason is not None:
        _warn_once(reason)
        return gm_rollout_torch(
            x_start, means, logweights, logstds, x_src, sigma_src, sigma_start, n_substeps, substep_size, r_start, shift
        )
    args = (x_start, means, logweights, logstds, x_src, sigma_src, sigma_start, n_substeps, substep_size, r_start, float(shift))
    with torch.no_grad():
        if torch.compiler.is_compiling():  # traced as one opaque node
            return torch.ops.piflow.gm_rollout(*args)
        # eager: the launcher itself; the custom op's dispatch (autograd wrapper, redispatch) costs about as
        # much host time as the rest of a small rollout, and a rollout has no autograd to dispatch
        return _gm_rollout(*args)
