/* GM rollout on the CPU as one fused loop (piflow_kernels/ops/gm/native.py builds and calls it).
   Same algebra as the Triton rollout kernel: logits centred on the prior mixture mean, log2 units,
   an online max; float32; 16 pixels per vector, the (K, C) policy slice kept in L1 over all substeps. */
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

/* 16 float32 lanes as one value: GCC/clang vector extensions, lowered to AVX-512, AVX2, SSE or NEON. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
#define VL 16
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
/* 16 floats from src (the first nl valid, the rest 0) */
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
   ssrc (B) sigma_src as given (mu_k = x_src - sigma_src means_k);  cn (B) = a_src / sigma_src^2 and
   csrc (B) = (a_src / sigma_src)^2 with the clamped sigma_src;
   sig (B, T) the sigma of every substep boundary (a finished sample repeats its last sigma);
   x (B, C, L) x_start in, x_end out. Returns 0, or 1 when out of memory. */
int piflow_gm_rollout(const float *means, const float *lw, const float *xsrc, const float *var, const float *ssrc,
                      const float *cn, const float *csrc, const float *sig, float *x, int64_t K, int64_t C, int64_t L,
                      int64_t T, int per_k, int64_t b, int64_t l0, int64_t l1) {
    v16 *buf = (v16 *)aligned_alloc(64, sizeof(v16) * (size_t)(K * C + 4 * K + 7 * C));
    if (!buf) return 1;
    v16 *t_mu = buf;           /* [K][C] centred means mu_k - c */
    v16 *t_sq = t_mu + K * C;  /* [K]    ||mu_k - c||^2 */
    v16 *t_lw = t_sq + K;      /* [K]    logweights, log2 units */
    v16 *t_l = t_lw + K;       /* [K]    log2 logits of the substep, then their weights */
    v16 *t_g = t_l + K;        /* [K]    1 / d_k, splat (per-component stds) */
    v16 *v_x = t_g + K;        /* [C]    x */
    v16 *v_c = v_x + C;        /* [C]    centre c: the prior mixture mean */
    v16 *v_ns = v_c + C;       /* [C]    nu_src */
    v16 *v_nu = v_ns + C;      /* [C]    nu */
    v16 *v_gn = v_nu + C;      /* [C]    nu - zeta c (per-component stds), (nu - zeta c) log2(e) / d (one std) */
    v16 *v_ax = v_gn + C;      /* [C]    sum_k p_k (mu_k - c) [/ d_k] */
    const float *sg = sig + b * T;
    const float *var_b = var + b * K;
    const float c_src = csrc[b];
    const v16 s_src = splat(ssrc[b]), cn_src = splat(cn[b]);

    for (int64_t p0 = l0; p0 < l1; p0 += VL) {
        const int64_t nl = (l1 - p0) < VL ? (l1 - p0) : VL;
        /* load the block (padded lanes: zeros, finite everywhere) */
        for (int64_t c = 0; c < C; c++) {
            const v16 xs = load(xsrc + (b * C + c) * L + p0, nl);
            v_x[c] = load(x + (b * C + c) * L + p0, nl);
            v_ns[c] = cn_src * xs;
            v_c[c] = xs; /* for now: x_src, to form mu below */
        }
        for (int64_t k = 0; k < K; k++) {
            for (int64_t c = 0; c < C; c++)
                t_mu[k * C + c] = v_c[c] - s_src * load(means + ((b * K + k) * C + c) * L + p0, nl);
            t_lw[k] = load(lw + (b * K + k) * L + p0, nl) * splat(LOG2E);
        }
        /* centre c = sum_k softmax(lw)_k mu_k; the tile becomes mu_k - c */
        v16 m = splat(-3.0e38f), sum = splat(0.0f), csq = splat(0.0f);
        for (int64_t k = 0; k < K; k++) m = vmax(m, t_lw[k]);
        for (int64_t c = 0; c < C; c++) v_c[c] = splat(0.0f);
        for (int64_t k = 0; k < K; k++) {
            const v16 e = vexp2(t_lw[k] - m);
            sum += e;
            for (int64_t c = 0; c < C; c++) v_c[c] += e * t_mu[k * C + c];
        }
        for (int64_t c = 0; c < C; c++) {
            v_c[c] /= sum;
            csq += v_c[c] * v_c[c];
        }
        for (int64_t k = 0; k < K; k++) {
            v16 sq = splat(0.0f);
            for (int64_t c = 0; c < C; c++) {
                const v16 v = t_mu[k * C + c] - v_c[c];
                t_mu[k * C + c] = v;
                sq += v * v;
            }
            t_sq[k] = sq;
        }

        for (int64_t j = 0; j + 1 < T; j++) {
            const float s = sg[j], s_next = sg[j + 1];
            if (s_next == s) continue; /* this sample's substeps are over: x stays */
            const float s_c = s > EPS ? s : EPS;
            const float inv_s = 1.0f / s_c;
            const float a = 1.0f - s_c;
            const float zeta = a * a * inv_s * inv_s - c_src;
            const v16 step = splat((s_next - s) * inv_s);
            for (int64_t c = 0; c < C; c++) {
                v_nu[c] = splat(a * inv_s * inv_s) * v_x[c] - v_ns[c];
                v_ax[c] = splat(0.0f);
            }
            m = splat(-3.0e38f);
            sum = splat(0.0f);
            if (!per_k) {
                const float dd = var_b[0] * zeta + 1.0f;
                const float g = 1.0f / (dd > EPS ? dd : EPS);
                const v16 gl = splat(g * LOG2E), gz = splat(g * LOG2E * 0.5f * zeta), vz = splat(zeta);
                for (int64_t c = 0; c < C; c++) v_gn[c] = (v_nu[c] - vz * v_c[c]) * gl;
                /* log2 logit_k = lw_k + (mu_k' . nu' - zeta/2 ||mu_k'||^2) / d  (+ a k-independent term) */
                for (int64_t k = 0; k < K; k++) {
                    v16 l = t_lw[k] - gz * t_sq[k];
                    for (int64_t c = 0; c < C; c++) l += t_mu[k * C + c] * v_gn[c];
                    t_l[k] = l;
                    m = vmax(m, l);
                }
                for (int64_t k = 0; k < K; k++) {
                    const v16 e = vexp2(t_l[k] - m);
                    sum += e;
                    for (int64_t c = 0; c < C; c++) v_ax[c] += e * t_mu[k * C + c];
                }
                /* x0 = (sum_k w_k (mu_k - c) + c + var nu) / d;  x += (x - x0) (s_next - s) / s */
                const v16 inv_sum = splat(1.0f) / sum, vg = splat(g), vv = splat(var_b[0]);
                for (int64_t c = 0; c < C; c++) {
                    const v16 x0 = (v_ax[c] * inv_sum + v_c[c] + vv * v_nu[c]) * vg;
                    v_x[c] += (v_x[c] - x0) * step;
                }
            } else {
                /* per-component d_k: the k-dependent part of the centring term r = c.nu - zeta/2 ||c||^2 stays */
                for (int64_t k = 0; k < K; k++) {
                    const float dd = var_b[k] * zeta + 1.0f;
                    t_g[k] = splat(1.0f / (dd > EPS ? dd : EPS));
                }
                const v16 g0 = t_g[0], hz = splat(0.5f * zeta), vz = splat(zeta);
                v16 r = -hz * csq, av = splat(0.0f), ag = splat(0.0f);
                for (int64_t c = 0; c < C; c++) {
                    r += v_c[c] * v_nu[c];
                    v_gn[c] = v_nu[c] - vz * v_c[c];
                }
                for (int64_t k = 0; k < K; k++) {
                    v16 dot = -hz * t_sq[k];
                    for (int64_t c = 0; c < C; c++) dot += t_mu[k * C + c] * v_gn[c];
                    const v16 l = t_lw[k] + (dot * t_g[k] + r * (t_g[k] - g0)) * splat(LOG2E);
                    t_l[k] = l;
                    m = vmax(m, l);
                }
                for (int64_t k = 0; k < K; k++) {
                    const v16 e = vexp2(t_l[k] - m);
                    const v16 pg = e * t_g[k];
                    sum += e;
                    av += pg * splat(var_b[k]);
                    ag += pg;
                    for (int64_t c = 0; c < C; c++) v_ax[c] += pg * t_mu[k * C + c];
                }
                /* x0 = sum_k w_k (mu_k - c + c + var_k nu) / d_k */
                const v16 inv_sum = splat(1.0f) / sum;
                for (int64_t c = 0; c < C; c++) {
                    const v16 x0 = (v_ax[c] + v_c[c] * ag + v_nu[c] * av) * inv_sum;
                    v_x[c] += (v_x[c] - x0) * step;
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
