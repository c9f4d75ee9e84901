"""Shared pieces of the GM Triton kernels: launch table, range, jit helpers, block configuration, buffers.

Flat layout as in :mod:`piflow_kernels.ops.records`; the velocity kernels live in
:mod:`piflow_kernels.ops.gm.triton_velocity`, the rollout kernel in :mod:`piflow_kernels.ops.gm.triton_rollout`.
Layers (as Liger-Kernel and flash-attention's Triton ops): ``_gm_*_kernel`` -> launcher (``_gm_velocity_fwd`` ...)
-> ``torch.library`` op (``piflow::gm_velocity``, ``piflow::gm_velocity_bwd``, ``piflow::gm_rollout``) ->
public function (``gm_velocity_triton``, ``gm_rollout_triton``). The dispatcher
(:mod:`piflow_kernels.ops.dispatch`) checks the range below before it picks these, and falls back to the
CPU twin (one logged warning per reason) outside it.

Kernel design. One program owns BLOCK_L pixels of one sample and all K components, so the softmax
over K and the contractions over C stay in registers; all math is float32. Components are walked in
chunks of BLOCK_K with an online softmax (running max in log2 units, rescaled sums) when a
(K, C) tile does not fit the register budget. Logits are kept pre-scaled by log2(e) so every
exponential is an exp2. Every kernel evaluates the torch twin's algebra (docs/design.md [eq:gm-centred],
:func:`piflow_kernels.ops.gm.torch_twin.gm_velocity_centred`): logits centred on x_src (the chunks load as
y_k = -s_src means_k, formed directly), u formed without x0 (x - x0 is O(sigma) out of O(1) terms), and with
per-component stds the logits taken relative to a per-pixel pivot component (the running argmax, see
:func:`_gm_centred_num`), so that what rounds is relative to the dominant component. The rollout kernel keeps
the whole policy tile (y_k, ||y_k||^2, log2-scaled logweights) in registers across all substeps when it fits
(NUM_K_CHUNKS == 1), loops over its sample's substep count read from memory, and writes x once. The
backward kernel recomputes everything from the inputs in ONE pass over the chunks, as flash
attention does: the forward also writes the log-sum-exp of the logits and ybar = sum_k w_k y_k [/ d_k]
(C + 1 floats per pixel; C + 3 with per-component stds, adding sum_k w_k beta_k and the pivot's variance;
not K * C), which give every chunk its normalised weights and its logit gradients without the other
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
# with Triton 3.6 for sm_90; with per-component stds K=32, C=4 spills 448 bytes). The velocity kernels
# are memory-bound and stream chunks: smaller chunks, fewer registers, more warps in flight. At K=32,
# C=4, one std per sample (python -m bench.sass, Triton 3.6): forward 96 registers at budget 64,
# backward 168 at budget 32; the GPU check's sweep times other budgets.
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
        return _div_rn(1.0, x)


@triton.jit
def _div_rn(a, b):
    """a / b rounded to nearest, as torch divides: ``a / b`` in a kernel is div.full.f32 on NVIDIA GPUs (2 ulp), and
    the logits at small sigma are large enough for that to show against the float32 reference."""
    return tl.math.div_rn(a, b)


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
    p_var,  # variances of this sample, pointer at (b, 0)
    k0,  # first component of the chunk
    K,  # number of components
    o_c,  # (BLOCK_C,) int64 channel offsets
    o_l,  # (BLOCK_L,) int64 pixel offsets
    m_cl,  # (BLOCK_C, BLOCK_L) valid channel and pixel
    m_l,  # (BLOCK_L,) valid pixel
    s_src,  # sigma_src of this sample, unclamped (mu and var use it raw, as the reference does)
    stride_mk,  # means stride over K
    stride_mc,  # means stride over C
    stride_ml,  # means stride over L
    stride_wk,  # logweights stride over K
    stride_wl,  # logweights stride over L
    stride_vk,  # variances stride over K (unused for one std per sample)
    BLOCK_K: tl.constexpr,  # components per chunk
    PER_K_STD: tl.constexpr,  # logstds per component (else one per sample)
):
    """One chunk of the policy centred on x_src: y_k = mu_k - x_src = -s_src means_k (BK, BC, BL), formed
    directly (never as a difference), ||y_k||^2 (BK, BL), log2-scaled logweights (BK, BL) with -inf on padded
    components, var (BK, BL) per component (broadcast over pixels) or a scalar per sample, m_k (BK,).

    Every (BK, BL) tile is loaded as (BK, 1, BL) and reduced over the unit axis, so it carries the
    same register layout as the reductions of the 3-D tile over C: the compiler then keeps one copy
    of each per-component quantity instead of computing it in two layouts."""
    o_k = k0 + tl.arange(0, BLOCK_K)
    m_k = o_k < K
    o_k64 = o_k.to(tl.int64)
    p_m = p_means + o_k64[:, None, None] * stride_mk + o_c[None, :, None] * stride_mc + o_l[None, None, :] * stride_ml
    b_means = tl.load(p_m, mask=m_k[:, None, None] & m_cl[None, :, :], other=0.0).to(tl.float32)
    b_y = -s_src * b_means
    m_kl = m_k[:, None, None] & m_l[None, None, :]
    p_w = p_lw + o_k64[:, None, None] * stride_wk + o_l[None, None, :] * stride_wl
    b_lw = tl.sum(tl.load(p_w, mask=m_kl, other=0.0).to(tl.float32), axis=1)
    # padded components get -inf (weight 0); padded pixels keep finite 0 so no NaN is ever formed
    b_lw2 = tl.where(m_k[:, None], b_lw * LOG2E_K, float("-inf"))
    b_ysq = tl.sum(b_y * b_y, axis=1)
    if PER_K_STD:
        # broadcast over pixels in the layout of b_ysq (0 * a finite tile is exactly 0)
        b_var = tl.load(p_var + o_k64 * stride_vk, mask=m_k, other=0.0)[:, None] + 0.0 * b_ysq
    else:
        b_var = tl.load(p_var)
    return b_y, b_ysq, b_lw2, b_var, m_k


@triton.jit
def _gm_scalars(s_raw, s_src_raw, FAST_RCP: tl.constexpr):
    """Per-sample scalars of the centred velocity at noise level s_raw ([eq:gm-centred]), s and s_src clamped at
    eps: s, a = 1 - s, 1 / s, rho = 1/s - 1/s_src as (s_src - s) / (s s_src) (exactly 0 at the source; the
    difference of the reciprocals loses 0.06 of each 1e6 at sigma 1e-6), zeta = (a/s)^2 - (a_src/s_src)^2 as
    rho (a/s + a_src/s_src), and a_src / s_src^2."""
    s = tl.maximum(s_raw, EPS_K)
    s_src = tl.maximum(s_src_raw, EPS_K)
    a = 1.0 - s
    inv_s = _rcp(s, FAST_RCP)
    inv_ssrc = _div_rn(1.0, s_src)
    rho = (s_src - s) * inv_s * inv_ssrc
    zeta = rho * (a * inv_s + (1.0 - s_src) * inv_ssrc)
    return s, a, inv_s, rho, zeta, (1.0 - s_src) * inv_ssrc * inv_ssrc


@triton.jit
def _gm_centred_terms(b_x, b_xs, a, inv_s, rho, a_src_s2):
    """delta = x - x_src, nu' = nu - zeta x_src = (a/s^2) delta + rho x_src and h = zeta x - nu =
    -rho x - (a_src/s_src^2) delta, each (BC, BL) ([eq:gm-centred]); no two ~1/s^2 terms are subtracted."""
    b_delta = b_x - b_xs
    b_nup = (a * inv_s * inv_s) * b_delta + rho * b_xs
    b_h = -rho * b_x - a_src_s2 * b_delta
    return b_delta, b_nup, b_h


@triton.jit
def _gm_d(b_var, zeta):
    """1 / d_k and q_k = d_k - 1 - var_k zeta (0 unless d_k = 1 + var_k zeta is clamped at eps, which only
    happens outside the domain, sigma > sigma_src), per component (BK, BL) or a per-sample scalar."""
    vz = b_var * zeta
    return _div_rn(1.0, tl.maximum(vz + 1.0, EPS_K)), tl.maximum((EPS_K - 1.0) - vz, 0.0)


@triton.jit
def _gm_dot(b_y, b_nup, zeta):
    """A_k = y_k . (nu' - zeta y_k / 2) (BK, BL), the literal contraction: it cancels less than
    y_k . nu' - zeta ||y_k||^2 / 2 far from the source (the logstds gradient's error at sigma 0.05)."""
    return tl.sum(b_y * (b_nup[None, :, :] - (0.5 * zeta) * b_y), axis=1)


@triton.jit
def _gm_pivot_of_chunk(b_l2pre, b_var):
    """The largest log2 logit of a chunk per pixel (BL,) and the variance of its component (BL,): the pivot
    candidate (the largest variance where the maximum is tied)."""
    b_m = tl.max(b_l2pre, axis=0)
    return b_m, tl.max(tl.where(b_l2pre == b_m[None, :], b_var, float("-inf")), axis=0)


@triton.jit
def _gm_pivot_merge(b_m, b_vp, b_mc, b_vpc):
    """Running pivot (max, variance) merged with a chunk's candidate."""
    b_vp = tl.where(b_mc > b_m, b_vpc, tl.where(b_mc == b_m, tl.maximum(b_vp, b_vpc), b_vp))
    return tl.maximum(b_m, b_mc), b_vp


@triton.jit
def _gm_pivot_finish(b_vp, zeta):
    """var_p and 1 / d_p (BL,) of the pivot; outside the domain (zeta < 0) a virtual component of variance 0."""
    b_vp = tl.where(zeta >= 0.0, b_vp, 0.0)
    return b_vp, _div_rn(1.0, 1.0 + zeta * b_vp)


@triton.jit
def _gm_logits2(
    b_lw2,  # (BK, BL) logweights * log2(e)
    b_a,  # (BK, BL) A_k (_gm_dot)
    b_invd,  # (BK, BL) or scalar 1 / d_k
    b_q,  # (BK, BL) or scalar q_k (_gm_d)
    b_var,  # (BK, BL) or scalar component variance
    b_r,  # (BL,) r = x_src . (nu' + zeta x_src / 2) (per-component stds only)
    b_vp,  # (BL,) var_p of the pivot (per-component stds only)
    b_idp,  # (BL,) 1 / d_p (per-component stds only)
    zeta,  # scalar
    PER_K_STD: tl.constexpr,  # per-component stds
):
    """Log2 logits (BK, BL) ([eq:gm-centred]). With one std per sample lw_k + A_k / d (r drops out of the
    softmax); with per-component stds lw_k + (A_k + r (1/d_k - 1/d_p) d_k) / d_k, relative to the per-pixel
    pivot p, r (1/d_k - 1/d_p) d_k formed as r (zeta (var_p - var_k) - q_k) / d_p. The forward, the rollout and the
    backward all evaluate the logits here, so the backward's softmax is normalised by the forward's
    log-sum-exp to within float32 rounding."""
    if PER_K_STD:
        # zeta (var_p - var_k) - q_k: exactly -q_k (0 in the domain) at the pivot whatever the compiler contracts
        # into FMAs; zeta var_p - (var_k zeta + q_k) left the rounding residual of zeta var_p there, different in
        # the forward and the backward (hoisted out of its loop), times r / d_p: hundreds in log2 units at sigma 1e-5
        b_rk = (b_r * b_idp)[None, :] * (zeta * (b_vp[None, :] - b_var) - b_q)
        return b_lw2 + (b_a + b_rk) * (LOG2E_K * b_invd)
    else:
        return b_lw2 + b_a * (LOG2E_K * b_invd)


@triton.jit
def _gm_centred_num(
    p_means,  # means of this sample
    p_lw,  # logweights of this sample
    p_var,  # variances of this sample
    K,  # number of components
    o_c,  # (BC,) channel offsets
    o_l,  # (BL,) pixel offsets
    m_cl,  # (BC, BL) valid mask
    m_l,  # (BL,) valid pixel
    s_src,  # raw sigma_src
    b_x,  # (BC, BL) x
    b_xs,  # (BC, BL) x_src
    b_delta,  # (BC, BL) x - x_src
    b_nup,  # (BC, BL) nu'
    b_h,  # (BC, BL) h
    b_r,  # (BL,) r (per-component stds)
    zeta,  # scalar zeta
    stride_mk,  # means stride over K
    stride_mc,  # means stride over C
    stride_ml,  # means stride over L
    stride_wk,  # logweights stride over K
    stride_wl,  # logweights stride over L
    stride_vk,  # variances stride over K
    BLOCK_K: tl.constexpr,  # components per chunk
    BLOCK_C: tl.constexpr,  # padded channels
    BLOCK_L: tl.constexpr,  # pixels per program
    NUM_K_CHUNKS: tl.constexpr,  # ceil(K / BLOCK_K)
    PER_K_STD: tl.constexpr,  # logstds per component
):
    """u s (BC, BL) of [eq:gm-centred], streaming the components from memory (online softmax), and what the
    backward reuses: ybar = sum_k w_k y_k [/ d_k] (BC, BL), the log2-sum-exp2 of the logits (BL,), and with
    per-component stds bbar = sum_k w_k beta_k (BL,) and var_p (BL,) (one std: zeros).

    With one std per sample u s = (delta + q x - ybar) / d + var h / d. With per-component stds
    u s = (delta + var_p h) / d_p - bbar nu' - ybar + (sum_k w_k q_k / d_k) x_src,
    beta_k = (var_k - var_p) / (d_k d_p); the pivot p is the argmax of the unpivoted logits lw_k + (A_k + r) / d_k,
    found on the way (see the loop)."""
    b_vp = tl.zeros((BLOCK_L,), tl.float32)  # the pivot's variance (per-component stds), after _gm_pivot_finish
    b_idp = tl.zeros((BLOCK_L,), tl.float32) + 1.0  # 1 / d_p
    b_mp = tl.full((BLOCK_L,), float("-inf"), tl.float32)  # the running pivot's unpivoted logit
    b_vpraw = tl.zeros((BLOCK_L,), tl.float32)  # its variance
    var1 = _gm_var1(p_var)  # one std per sample: its variance (with per-component stds unused)
    b_mrun = tl.full((BLOCK_L,), -1e30, tl.float32)
    b_lrun = tl.zeros((BLOCK_L,), tl.float32)
    b_accy = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)
    b_accb = tl.zeros((BLOCK_L,), tl.float32)
    b_accq = tl.zeros((BLOCK_L,), tl.float32)
    b_accg = tl.zeros((BLOCK_L,), tl.float32)  # sum_k p_k / d_k: moves b_accb to a new pivot
    for i_k in range(NUM_K_CHUNKS):
        b_y, b_ysq, b_lw2, b_var, m_k = _gm_load_chunk(
            p_means, p_lw, p_var, i_k * BLOCK_K, K, o_c, o_l, m_cl, m_l, s_src,
            stride_mk, stride_mc, stride_ml, stride_wk, stride_wl, stride_vk, BLOCK_K, PER_K_STD,
        )  # fmt: skip
        b_invd, b_q = _gm_d(b_var, zeta)
        b_a = _gm_dot(b_y, b_nup, zeta)
        if PER_K_STD:
            # The pivot is the running argmax over the chunks seen so far, this one included, so the dominant
            # component's logit never carries r; when it moves, what is accumulated moves to its frame: every
            # earlier logit by log2(e) r (1/d_old - 1/d_new) = log2(e) r zeta (var_new - var_old) / (d_old d_new),
            # and sum_k p_k beta_k d_p by (var_old - var_new) sum_k p_k / d_k. One pass over the chunks: a
            # separate pivot pass let the compiler keep every chunk in registers (255 at K=32, C=4 on sm_90).
            b_mc, b_vpc = _gm_pivot_of_chunk(b_lw2 + (b_a + b_r[None, :]) * (LOG2E_K * b_invd), b_var)
            b_mp, b_vpraw = _gm_pivot_merge(b_mp, b_vpraw, b_mc, b_vpc)
            b_vpn, b_idpn = _gm_pivot_finish(b_vpraw, zeta)
            b_move = (LOG2E_K * zeta * b_r * b_idp) * ((b_vpn - b_vp) * b_idpn)  # no ~1e26 intermediate
            b_mrun = tl.where(b_lrun > 0.0, b_mrun + b_move, b_mrun)
            b_accb = b_accb + (b_vp - b_vpn) * b_accg
            b_vp = b_vpn
            b_idp = b_idpn
        b_l2 = _gm_logits2(b_lw2, b_a, b_invd, b_q, b_var, b_r, b_vp, b_idp, zeta, PER_K_STD)
        b_mnew = tl.maximum(b_mrun, tl.max(b_l2, axis=0))
        b_alpha = tl.exp2(b_mrun - b_mnew)
        b_p = tl.exp2(b_l2 - b_mnew[None, :])
        b_lrun = b_lrun * b_alpha + tl.sum(b_p, axis=0)
        if PER_K_STD:
            b_pd = b_p * b_invd
            b_accy = b_accy * b_alpha[None, :] + tl.sum(b_pd[:, None, :] * b_y, axis=0)
            b_accb = b_accb * b_alpha + tl.sum(b_pd * (b_var - b_vp[None, :]), axis=0)
            b_accq = b_accq * b_alpha + tl.sum(b_pd * b_q, axis=0)
            b_accg = b_accg * b_alpha + tl.sum(b_pd, axis=0)
        else:
            b_accy = b_accy * b_alpha[None, :] + tl.sum(b_p[:, None, :] * b_y, axis=0)
        b_mrun = b_mnew
    b_inv = _div_rn(1.0, b_lrun)
    b_ybar = b_accy * b_inv[None, :]
    if PER_K_STD:
        b_bbar = b_accb * b_inv * b_idp
        b_num = (b_delta + b_vp[None, :] * b_h) * b_idp[None, :] - b_bbar[None, :] * b_nup - b_ybar
        b_num = b_num + (b_accq * b_inv)[None, :] * b_xs
    else:
        invd, q = _gm_d(var1, zeta)
        b_bbar = tl.zeros((BLOCK_L,), tl.float32)
        b_num = (b_delta + q * b_x - b_ybar) * invd + (var1 * invd) * b_h
    return b_num, b_ybar, b_mrun + tl.log2(b_lrun), b_bbar, b_vp


@triton.jit
def _gm_var1(p_var):
    """The first variance of a sample: with one std per sample, the variance."""
    return tl.load(p_var)


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


# Pointers are not specialized on 16-byte alignment. Aligned, Triton vectorizes the loads 4-wide along L
# and the compute layout follows (4 pixels per thread, the rest of the warp and the other warps spread
# over C and K), so every reduction over K or C becomes shuffles or shared memory plus barriers. Measured
# on an H100 (Triton 3.6) with aligned pointers, the 128-substep B=512, K=32, C=4, 32x32 rollout took
# 8.3 / 3.1 / 1.8 ms at 4 / 2 / 1 warps. Unaligned, a warp still reads 32 consecutive floats per
# load (one 128-byte transaction) and each thread owns whole pixels: compiled for sm_90 by Triton 3.6 with
# the launch's own specialization (python -m bench.sass), the substep loop is 488 instructions per pixel,
# with no shuffles, barriers or spills, and the forward kernel has none either. One aligned per-pixel
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
