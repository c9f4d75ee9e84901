/* GM rollout on the CPU as one fused loop (piflow_kernels/ops/gm/native.py builds and calls it).
   Same algebra as the torch twin's substep (ops/gm/torch_twin.py _gm_substep, gm_velocity_centred): centred
   on x_src, u formed without x0, per-component stds about the per-pixel pivot component; log2 units;
   float32; VL pixels per vector, the (K, C) policy slice kept in L1 over all substeps. */
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

/* VL float32 lanes as one value: GCC/clang vector extensions. 16 lanes (one AVX-512 register, or four NEON
   ones); 8 on x86 without AVX-512 (one AVX2 register): GCC lowers 64-byte vectors there piecewise, with a scalar
   compare per lane for every comparison, and the loop ran 3x slower (B=16, K=32, C=4, 32x32 on an AVX2 EPYC). */
#if defined(__x86_64__) && !defined(__AVX512F__)
#define VL 8
#else
#define VL 16
#endif
typedef float v16 __attribute__((vector_size(VL * 4)));
typedef int32_t i16 __attribute__((vector_size(VL * 4)));
/* Filled in from piflow_kernels/constants.py before the build (GM_EPS, LOG2E). */
#define EPS @GM_EPS@f
#define LOG2E @LOG2E@f

static inline v16 splat(float a) {
    v16 r;
    for (int i = 0; i < VL; i++) r[i] = a;
    return r;
}
static inline v16 vmax(v16 a, v16 b) {
    i16 m = a > b;
    return (v16)(((i16)a & m) | ((i16)b & ~m));
}
/* 2^x for x <= 0 (x may be -inf): round to the nearest integer n, 2^(x - n) by a degree-7 Taylor series in
   t = (x - n) ln 2 (|t| <= 0.35, truncation below 1e-8 relative), times 2^n built in the exponent bits;
   0 below 2^-126. */
static inline v16 vexp2(v16 x) {
    const i16 under = x < splat(-126.0f);
    const v16 xc = vmax(x, splat(-126.0f));
    const v16 n = (xc + splat(12582912.0f)) - splat(12582912.0f);
    const v16 t = (xc - n) * splat(0.6931471805599453f);
    v16 p = splat(1.0f / 5040.0f);
    p = p * t + splat(1.0f / 720.0f);
    p = p * t + splat(1.0f / 120.0f);
    p = p * t + splat(1.0f / 24.0f);
    p = p * t + splat(1.0f / 6.0f);
    p = p * t + splat(0.5f);
    p = p * t + splat(1.0f);
    p = p * t + splat(1.0f);
    const i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
    return (v16)((i16)(p * (v16)bits) & ~under);
}
/* VL floats from src (the first nl valid, the rest 0) */
static inline v16 load(const float *src, int64_t nl) {
    v16 r = splat(0.0f);
    if (nl == VL) {
        memcpy(&r, src, sizeof r);
    } else {
        for (int64_t i = 0; i < nl; i++) r[i] = src[i];
    }
    return r;
}

/* Sample b, pixels [l0, l1) of the rollout. Float32, contiguous:
   means (B, K, C, L);  lw (B, K, L) logweights;  xsrc (B, C, L);  var (B, K) component variances;
   ssrc (B) sigma_src as given (y_k = -sigma_src means_k);
   sig (B, T) the sigma of every substep boundary (a finished sample repeats its last sigma);
   x (B, C, L) x_start in, x_end out. Returns 0, or 1 when out of memory.

   Per substep, with s, s_src clamped at EPS, a = 1 - s, rho = (s_src - s) / (s s_src), zeta = rho (a/s + a_src/s_src),
   delta = x - x_src, dc = (a/s^2) delta, d_k = max(1 + var_k zeta, EPS), q_k = d_k - 1 - var_k zeta:
     A_k = y_k . dc + rho y_k . x_src - zeta/2 ||y_k||^2,   h = -rho x - (a_src/s_src^2) delta
   one std:  logit_k = lw_k + A_k / d,  u s = (delta + q x - sum_k w_k y_k + var h) / d
   per-component (p: the argmax of lw_k + (A_k + r) / d_k, r = x_src . dc + (rho + zeta/2) ||x_src||^2):
     logit_k = lw_k + (A_k + r (zeta var_p - var_k zeta - q_k) / d_p) / d_k
     u s = (delta + var_p h) / d_p - nu' sum_k w_k (var_k - var_p) / (d_k d_p) - sum_k w_k y_k / d_k + x_src sum_k w_k q_k / d_k
   with nu' = dc + rho x_src, and x += u (s_next - s). */
int piflow_gm_rollout(const float *means, const float *lw, const float *xsrc, const float *var, const float *ssrc,
                      const float *sig, float *x, int64_t K, int64_t C, int64_t L, int64_t T, int per_k, int64_t b,
                      int64_t l0, int64_t l1) {
    const size_t n_vec = (size_t)(K * C + 4 * K + 6 * C + 1);
    v16 *buf = (v16 *)aligned_alloc(64, sizeof(v16) * n_vec + 64 * (size_t)((3 * K * sizeof(float) + 63) / 64));
    if (!buf) return 1;
    v16 *t_y = buf;            /* [K][C] y_k = -s_src means_k */
    v16 *t_sq = t_y + K * C;   /* [K]    ||y_k||^2 */
    v16 *t_yx = t_sq + K;      /* [K]    y_k . x_src */
    v16 *t_lw = t_yx + K;      /* [K]    logweights, log2 units */
    v16 *t_l = t_lw + K;       /* [K]    A_k, then the log2 logits of the substep */
    v16 *v_x = t_l + K;        /* [C]    x */
    v16 *v_xs = v_x + C;       /* [C]    x_src */
    v16 *v_d = v_xs + C;       /* [C]    delta = x - x_src */
    v16 *v_dc = v_d + C;       /* [C]    (a/s^2) delta */
    v16 *v_h = v_dc + C;       /* [C]    h */
    v16 *v_ay = v_h + C;       /* [C]    sum_k e_k y_k [/ d_k] */
    v16 *v_xsq = v_ay + C;     /* [1]    ||x_src||^2 */
    float *g = (float *)(buf + n_vec); /* [K] 1 / d_k (per-component stds) */
    float *vq = g + K;                 /* [K] q_k = d_k - 1 - var_k zeta (0 unless d_k is clamped) */
    float *vzq = vq + K;               /* [K] var_k zeta + q_k = d_k - 1 */
    const float *sg = sig + b * T;
    const float *var_b = var + b * K;
    const float s_src_raw = ssrc[b];
    const float s_src = s_src_raw > EPS ? s_src_raw : EPS;
    const float a_src = 1.0f - s_src;
    const float a_src_s2 = a_src / (s_src * s_src);

    for (int64_t p0 = l0; p0 < l1; p0 += VL) {
        const int64_t nl = (l1 - p0) < VL ? (l1 - p0) : VL;
        /* load the block (padded lanes: zeros, finite everywhere) */
        v16 xsq = splat(0.0f);
        for (int64_t c = 0; c < C; c++) {
            v_xs[c] = load(xsrc + (b * C + c) * L + p0, nl);
            v_x[c] = load(x + (b * C + c) * L + p0, nl);
            xsq += v_xs[c] * v_xs[c];
        }
        v_xsq[0] = xsq;
        for (int64_t k = 0; k < K; k++) {
            v16 sq = splat(0.0f), yx = splat(0.0f);
            for (int64_t c = 0; c < C; c++) {
                const v16 y = splat(-s_src_raw) * load(means + ((b * K + k) * C + c) * L + p0, nl);
                t_y[k * C + c] = y;
                sq += y * y;
                yx += y * v_xs[c];
            }
            t_sq[k] = sq;
            t_yx[k] = yx;
            t_lw[k] = load(lw + (b * K + k) * L + p0, nl) * splat(LOG2E);
        }

        for (int64_t j = 0; j + 1 < T; j++) {
            const float s_raw = sg[j], s_next = sg[j + 1];
            if (s_next == s_raw) continue; /* this sample's substeps are over: x stays */
            const float s = s_raw > EPS ? s_raw : EPS;
            const float a = 1.0f - s;
            const float rho = (s_src - s) / (s * s_src); /* 1/s - 1/s_src, exactly 0 at the source */
            const float zeta = rho * (a / s + a_src / s_src);
            const v16 step = splat((s_next - s_raw) / s), vrho = splat(rho), c1 = splat(a / (s * s));
            const v16 hz = splat(-0.5f * zeta);
            for (int64_t c = 0; c < C; c++) {
                const v16 dl = v_x[c] - v_xs[c];
                v_d[c] = dl;
                v_dc[c] = c1 * dl;
                v_h[c] = -(vrho * v_x[c]) - splat(a_src_s2) * dl;
                v_ay[c] = splat(0.0f);
            }
            for (int64_t k = 0; k < K; k++) { /* A_k */
                v16 dot = vrho * t_yx[k] + hz * t_sq[k];
                for (int64_t c = 0; c < C; c++) dot += t_y[k * C + c] * v_dc[c];
                t_l[k] = dot;
            }
            v16 m = splat(-3.0e38f), sum = splat(0.0f);
            if (!per_k) {
                const float vz = var_b[0] * zeta, dd = vz + 1.0f;
                const float d = dd > EPS ? dd : EPS;
                const float q = EPS - 1.0f - vz > 0.0f ? EPS - 1.0f - vz : 0.0f;
                const v16 gl = splat(LOG2E / d);
                for (int64_t k = 0; k < K; k++) {
                    const v16 l = t_lw[k] + t_l[k] * gl;
                    t_l[k] = l;
                    m = vmax(m, l);
                }
                for (int64_t k = 0; k < K; k++) {
                    const v16 e = vexp2(t_l[k] - m);
                    sum += e;
                    for (int64_t c = 0; c < C; c++) v_ay[c] += e * t_y[k * C + c];
                }
                const v16 inv_sum = splat(1.0f) / sum, vg = splat(1.0f / d), vq1 = splat(q), vv = splat(var_b[0]);
                for (int64_t c = 0; c < C; c++) {
                    const v16 num = (v_d[c] + vq1 * v_x[c] - v_ay[c] * inv_sum + vv * v_h[c]) * vg;
                    v_x[c] += num * step;
                }
            } else {
                for (int64_t k = 0; k < K; k++) {
                    const float vz = var_b[k] * zeta, dd = vz + 1.0f;
                    const float d = dd > EPS ? dd : EPS;
                    vq[k] = EPS - 1.0f - vz > 0.0f ? EPS - 1.0f - vz : 0.0f;
                    vzq[k] = vz + vq[k];
                    g[k] = 1.0f / d;
                }
                /* r = x_src . (nu' + zeta x_src / 2) and the pivot: the argmax of lw_k + (A_k + r) / d_k (log2 units;
                   the largest variance among tied maxima) */
                v16 r = splat(rho + 0.5f * zeta) * v_xsq[0];
                for (int64_t c = 0; c < C; c++) r += v_xs[c] * v_dc[c];
                v16 best = splat(-3.0e38f), vp = splat(0.0f);
                for (int64_t k = 0; k < K; k++) {
                    const v16 full = t_lw[k] + (t_l[k] + r) * splat(g[k] * LOG2E);
                    const v16 vk = splat(var_b[k]);
                    const i16 take = (full > best) | ((full == best) & (vk > vp));
                    vp = (v16)(((i16)vk & take) | ((i16)vp & ~take));
                    best = (v16)(((i16)full & take) | ((i16)best & ~take));
                }
                if (!(zeta >= 0.0f)) vp = splat(0.0f); /* outside the domain: a virtual pivot of variance 0 */
                const v16 dp = splat(1.0f) + splat(zeta) * vp, inv_dp = splat(1.0f) / dp;
                const v16 rp = r * inv_dp, zvp = splat(zeta) * vp;
                for (int64_t k = 0; k < K; k++) {
                    const v16 l = t_lw[k] + (t_l[k] + rp * (zvp - splat(vzq[k]))) * splat(g[k] * LOG2E);
                    t_l[k] = l;
                    m = vmax(m, l);
                }
                v16 beta = splat(0.0f), wq = splat(0.0f);
                for (int64_t k = 0; k < K; k++) {
                    const v16 e = vexp2(t_l[k] - m);
                    const v16 eg = e * splat(g[k]);
                    sum += e;
                    beta += eg * (splat(var_b[k]) - vp);
                    wq += eg * splat(vq[k]);
                    for (int64_t c = 0; c < C; c++) v_ay[c] += eg * t_y[k * C + c];
                }
                const v16 inv_sum = splat(1.0f) / sum;
                const v16 bs = beta * inv_sum * inv_dp, qs = wq * inv_sum;
                for (int64_t c = 0; c < C; c++) {
                    const v16 nu = v_dc[c] + vrho * v_xs[c];
                    const v16 num = (v_d[c] + vp * v_h[c]) * inv_dp - bs * nu - v_ay[c] * inv_sum + qs * v_xs[c];
                    v_x[c] += num * step;
                }
            }
        }
        for (int64_t c = 0; c < C; c++) {
            float *dst = x + (b * C + c) * L + p0;
            for (int64_t p = 0; p < nl; p++) dst[p] = v_x[c][p];
        }
    }
    free(buf);
    return 0;
}
