"""GM rollout on the CPU as one fused native loop: the policy tile stays in L1 over every substep.

The torch twin (:mod:`piflow_kernels.ops.gm_torch`) runs a rollout as one compiled substep per call, and
each call streams the whole (B, K, C, L) policy through memory: at B=16, K=32, C=4, 32x32 that is 12 MB
per substep. This module does what the Triton rollout kernel does on a GPU, on CPU cores: 16 pixels at a
time (one AVX-512 register per quantity), their (K, C) policy slice (8 KB at K=32, C=4) loaded once and
kept in L1, every substep of the rollout run on it, x written once. Same algebra as the Triton kernel
(logits centred on the prior mixture mean, log2 units, an online max) in float32.

It is plain C, compiled at first use with the system C compiler into a cache folder
(``$PIFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/piflow_kernels``, else ``~/.cache/piflow_kernels``),
loaded with ctypes, and run on ``torch.get_num_threads()`` threads (ctypes releases the GIL). No
compiler, a failed build, ``PIFLOW_NATIVE=0`` or inputs off the CPU: :func:`gm_rollout_native` returns
None and the caller uses the torch twin (the reason is logged once).

    >>> x_end = gm_rollout_native(x, means, logweights, x_src, var, sigma_src, cn_src, c_src, table, per_k)  # or None
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

VL = 16  # pixels per block: one 512-bit register of float32
_PIXELS_PER_ITEM = 256  # pixels of one sample per work item handed to a thread

_SOURCE = r"""
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

/* 16 float32 lanes as one value: GCC/clang vector extensions, lowered to AVX-512, AVX2, SSE or NEON. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
#define VL 16
#define EPS 1e-6f
#define LOG2E 1.4426950408889634f

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
"""

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded function or None, "reason": why not, "pool": the thread pool


def _cache_dir() -> str:
    root = os.environ.get("PIFLOW_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "piflow_kernels")
    return root


def _cpu_signature() -> str:
    """What -march=native depends on: the machine type and its instruction-set flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags


def _flag_sets() -> list[list[str]]:
    common = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-std=gnu11"]
    if platform.machine() in ("x86_64", "AMD64"):
        return [common + ["-march=native", "-mprefer-vector-width=512"], common]
    return [common + ["-mcpu=native"], common]


def _build() -> tuple[object | None, str | None]:
    """(the ctypes function, None) or (None, why not)."""
    if os.environ.get("PIFLOW_NATIVE", "1") == "0":
        return None, "PIFLOW_NATIVE=0"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, _cpu_signature()]).encode()).hexdigest()[:20]
        path = os.path.join(_cache_dir(), f"gm_native_{key}.so")
        try:
            if not os.path.exists(path):
                os.makedirs(_cache_dir(), exist_ok=True)
                with tempfile.TemporaryDirectory() as tmp:
                    src = os.path.join(tmp, "gm_native.c")
                    with open(src, "w") as fh:
                        fh.write(_SOURCE)
                    out = os.path.join(tmp, "gm_native.so")
                    proc = subprocess.run([cc, *flags, src, "-o", out], capture_output=True, text=True, timeout=120)
                    if proc.returncode != 0:
                        errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-300:]}")
                        continue
                    staged = f"{path}.{os.getpid()}.tmp"
                    shutil.copyfile(out, staged)
                    os.replace(staged, path)  # atomic: a concurrent process sees the whole file or none
            fn = ctypes.CDLL(path).piflow_gm_rollout
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{' '.join(flags)}: {err}")
            continue
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr] * 9 + [i64] * 4 + [ctypes.c_int] + [i64] * 3
        fn.restype = ctypes.c_int
        return fn, None
    return None, "the C build failed: " + " | ".join(errors)


def available() -> bool:
    """Whether the native rollout can run here (builds it on the first call)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["reason"] = _build()
            if _state["lib"] is None:
                logger.warning("piflow_kernels: native CPU rollout unavailable (%s); using the torch twin", _state["reason"])
    return _state["lib"] is not None


def _pool(workers: int) -> ThreadPoolExecutor:
    """The worker threads (made again after a fork: a child inherits the pool but not its threads)."""
    with _lock:
        pool = _state.get("pool")
        if pool is None or _state.get("workers") != workers or _state.get("pid") != os.getpid():
            if pool is not None and _state.get("pid") == os.getpid():
                pool.shutdown(wait=False)
            pool = _state["pool"] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="piflow-native")
            _state["workers"] = workers
            _state["pid"] = os.getpid()
    return pool


def gm_rollout_native(
    x: torch.Tensor,
    means: torch.Tensor,
    logweights: torch.Tensor,
    x_src: torch.Tensor,
    var: torch.Tensor,
    sigma_src: torch.Tensor,
    cn_src: torch.Tensor,
    c_src: torch.Tensor,
    table: torch.Tensor,
    per_component: bool,
) -> torch.Tensor | None:
    """Run a whole GM rollout natively; None when the native code is unavailable (the caller falls back).

    Args (CPU tensors of any float dtype, converted to contiguous float32 here):
        x: (B, C, L) x_start; means: (B, K, C, L); logweights: (B, K, L); x_src: (B, C, L);
        var: (B, K) component variances exp(2 logstd) sigma_src^2; sigma_src: (B,) as given;
        cn_src, c_src: (B,) a_src / sigma_src^2 and (a_src / sigma_src)^2 with sigma_src clamped
        (``gm_torch._source_terms``);
        table: (B, T) sigma at every substep boundary (a finished sample repeats its last sigma);
        per_component: var differs over k (else var[:, 0] is used).
    Returns:
        x_end (B, C, L) float32, a new tensor.
    """
    if x.device.type != "cpu" or not available():
        return None
    b, k, c, length = means.shape
    args = [t.detach().float().contiguous() for t in (means, logweights, x_src, var, sigma_src, cn_src, c_src, table)]
    out = x.detach().float().contiguous().clone()
    ptrs = [t.data_ptr() for t in args] + [out.data_ptr()]
    fn = _state["lib"]
    items = [(i, l0, min(l0 + _PIXELS_PER_ITEM, length)) for i in range(b) for l0 in range(0, length, _PIXELS_PER_ITEM)]
    shape = (k, c, length, table.shape[1], int(per_component))

    def run(item):
        return fn(*ptrs, *shape, *item)

    workers = max(1, min(torch.get_num_threads(), len(items)))
    codes = list(map(run, items)) if workers == 1 else list(_pool(workers).map(run, items))
    if any(codes):
        raise MemoryError("piflow_kernels: the native rollout could not allocate its tile buffer")
    return out
