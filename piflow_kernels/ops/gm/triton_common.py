"""Shared pieces of the GM Triton kernels: launch table, range, jit helpers, block configuration, buffers.

Flat layout as in :mod:`piflow_kernels.ops.records`; the velocity kernels live in
:mod:`piflow_kernels.ops.gm.triton_velocity`, the rollout kernel in :mod:`piflow_kernels.ops.gm.triton_rollout`.
Layers (as Liger-Kernel and flash-attention's Triton ops): ``_gm_*_kernel`` -> launcher (``_gm_velocity_fwd`` ...)
-> ``torch.library`` op (``piflow::gm_velocity``, ``piflow::gm_velocity_bwd``, ``piflow::gm_rollout``) ->
public function (``gm_velocity_triton``, ``gm_rollout_triton``). The dispatcher
(:mod:`piflow_kernels.ops.dispatch`) checks the range below before it picks these.

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
import os

import torch
import triton
import triton.language as tl

from piflow_kernels.constants import GM_EPS, LOG2E

# the library's constants as compile-time constants of the kernels (folded exactly as literals are)
EPS_K = tl.constexpr(GM_EPS)
LOG2E_K = tl.constexpr(LOG2E)

MAX_COMPONENTS = 64  # K range of the kernels (chunked over K beyond the register budget)
MAX_CHANNELS = 64  # C range of the kernels
# Per-thread register budget in fp32 elements of one (BLOCK_K, BLOCK_C) chunk. At 128 a K=32, C=4
# (ImageNet) or K=8, C=16 (FLUX) policy tile stays resident over a rollout (255 registers, no spill
# with Triton 3.6 for sm_90; with per-component stds K=32, C=4 spills 248 bytes). The velocity kernels
# are memory-bound and stream chunks: smaller chunks, fewer registers, more warps in flight. At K=32,
# C=4, one std per sample (python -m bench.sass, Triton 3.6): forward 95 registers at budget 64 (64 at
# 32), backward 168 at budget 32 (47 at 16); the GPU check's sweep times these points.
TILE_BUDGET_ROLLOUT = 128
TILE_BUDGET_FWD = 64
TILE_BUDGET_BWD = 32
# The launch knobs of the three kernels: register budget per chunk and warps per program (None: by the
# pixel count, see launch_config). Read at every launch, so bench.gpu_check can sweep them on a GPU.
LAUNCH: dict[str, dict[str, int | None]] = {
    "fwd": {"budget": TILE_BUDGET_FWD, "num_warps": None},
    "bwd": {"budget": TILE_BUDGET_BWD, "num_warps": None},
    "rollout": {"budget": TILE_BUDGET_ROLLOUT, "num_warps": None},
}
# Read once at import: Triton decides interpreter vs compiler when a kernel is decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def range_problem(k: int, c: int, device: torch.device) -> str | None:
    """Why the GM kernels cannot run a K-component, C-channel policy on ``device`` (None when they can)."""
    if k > MAX_COMPONENTS or c > MAX_CHANNELS:
        return f"K={k}, C={c} is outside the Triton kernels' range (K <= {MAX_COMPONENTS}, C <= {MAX_CHANNELS})"
    if device.type == "cpu" and not INTERPRET:
        return "CPU tensors need TRITON_INTERPRET=1 set before the Triton kernels are imported"
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type!r} has no Triton backend here"
    return None


# ----------------------------------------------------------------------------------------------
# jit helpers
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
    b_lw2 = tl.where(m_k[:, None], b_lw * LOG2E_K, float("-inf"))
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
        b_invd = 1.0 / tl.maximum(b_var * zeta + 1.0, EPS_K)
        b_g = LOG2E_K * b_invd
        b_l2 = b_lw2 + (b_dot - (0.5 * zeta) * b_musq) * b_g + b_r[None, :] * (b_g - g0)
        return b_l2, b_invd, b_dot
    else:
        invd = 1.0 / tl.maximum(b_var * zeta + 1.0, EPS_K)
        g = LOG2E_K * invd
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
        invd = _rcp(tl.maximum(var * zeta + 1.0, EPS_K), FAST_RCP)
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
    g0 = LOG2E_K / tl.maximum(var0 * zeta + 1.0, EPS_K)
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
    s = tl.maximum(tl.load(p_sigma + i_b).to(tl.float32), EPS_K)
    s_src = tl.maximum(s_src_raw, EPS_K)
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
UNALIGNED = ["p_x", "p_out", "p_u", "p_g", "p_means", "p_lw", "p_xs", "p_dx", "p_dmeans", "p_dlw", "p_dxs", "p_ybar", "p_stats"]


# ----------------------------------------------------------------------------------------------
# launch configuration and buffers
# ----------------------------------------------------------------------------------------------


def launch_config(k: int, c: int, length: int, budget: int, num_warps: int | None = None) -> dict[str, int]:
    """Block sizes and warps (see _launch_config_cached); a fresh dict per call, computed once per argument set."""
    return dict(_launch_config_cached(k, c, length, budget, num_warps))


@functools.lru_cache(maxsize=256)
def _launch_config_cached(k: int, c: int, length: int, budget: int, num_warps: int | None) -> dict[str, int]:
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


def fast_rcp(t: torch.Tensor) -> bool:
    """Inline-PTX reciprocal only where PTX exists: compiled kernels on NVIDIA GPUs."""
    return t.device.type == "cuda" and torch.version.hip is None and not INTERPRET
