"""Prototype (benchmark-only, not used by the library): the whole GM rollout as one C++/OpenMP loop.

The library's CPU path runs each substep as a few torch.compile'd passes over the (B, K, C, L) policy,
so every substep streams the policy and its (B, K, L) intermediates through memory. Here, as in the
Triton kernel, each (sample, 16-pixel block) keeps x in registers and loops over all its substeps with
its policy tile (K*C*16 floats, 8 KiB at K=32, C=4) resident in L1, with an online softmax over K.
It is offered to the benchmark as the opt-in ``cpp`` backend to measure what such a kernel would gain
on CPU; building it takes about a minute (torch.utils.cpp_extension, -O3 -march=native -fopenmp). -inf logweights
are handled (the running max starts at -FLT_MAX)..

    >>> x_end = gm_rollout_cpp(x_start, means, logweights, logstds, x_src, sigma_src, sigma_start,
    ...                        n_substeps, substep_size, r_start, shift)   # flat layout of ops.gm_torch
"""

from __future__ import annotations

import torch

from piflow_kernels.ops.gm_torch import EPS, _prepare

_SOURCE = r"""
#include <torch/extension.h>
#include <cfloat>
#include <cmath>
#include <algorithm>
constexpr int V = 16;
torch::Tensor gm_rollout_cpu(torch::Tensor x_start, torch::Tensor mu, torch::Tensor mu_sq, torch::Tensor var,
                             torch::Tensor lw, torch::Tensor nu_src, torch::Tensor c_src, torch::Tensor s0,
                             torch::Tensor nsub, torch::Tensor hh, torch::Tensor r0, double shift_d) {
  const int64_t B = mu.size(0), K = mu.size(1), C = mu.size(2), L = mu.size(3);
  auto out = torch::empty_like(x_start);
  const float* MU = mu.data_ptr<float>(); const float* MS = mu_sq.data_ptr<float>(); const float* VAR = var.data_ptr<float>();
  const float* LW = lw.data_ptr<float>(); const float* NS = nu_src.data_ptr<float>(); const float* CS = c_src.data_ptr<float>();
  const float* S0 = s0.data_ptr<float>(); const int* NN = nsub.data_ptr<int>(); const float* H = hh.data_ptr<float>();
  const float* R0 = r0.data_ptr<float>(); const float* X = x_start.data_ptr<float>(); float* O = out.data_ptr<float>();
  const float shift = (float)shift_d; const float EPS = 1e-6f;
  const int64_t nblk = (L + V - 1) / V;
  #pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) for (int64_t ib = 0; ib < nblk; ++ib) {
    const int64_t l0 = ib * V; const int nv = (int)std::min<int64_t>(V, L - l0);
    float x[64][V], nu[64][V], acc[64][V];
    for (int c = 0; c < C; ++c) for (int v = 0; v < V; ++v) x[c][v] = v < nv ? X[(b * C + c) * L + l0 + v] : 0.f;
    float s = S0[b], r = R0[b]; const float h = H[b]; const int n = NN[b];
    for (int step = 0; step < n; ++step) {
      const float r_next = std::max(r - h, 0.f);
      const float s_next = shift * r_next / (1.f + (shift - 1.f) * r_next);
      const float sc = std::max(s, EPS), a = 1.f - sc;
      const float zeta = (a / sc) * (a / sc) - CS[b];
      const float ax = a / (sc * sc);
      for (int c = 0; c < C; ++c) {
        const float* ns = NS + (b * C + c) * L + l0;
        for (int v = 0; v < V; ++v) { nu[c][v] = ax * x[c][v] - (v < nv ? ns[v] : 0.f); acc[c][v] = 0.f; }
      }
      float m[V], den[V], vsum[V];
      for (int v = 0; v < V; ++v) { m[v] = -FLT_MAX; den[v] = 0.f; vsum[v] = 0.f; }
      for (int k = 0; k < K; ++k) {
        const float vk = VAR[b * K + k];
        const float d = std::max(vk * zeta + 1.f, EPS), inv_d = 1.f / d;
        const float* muk = MU + ((b * K + k) * C) * L + l0;
        float dot[V];
        for (int v = 0; v < V; ++v) dot[v] = 0.f;
        for (int c = 0; c < C; ++c) { const float* mc = muk + c * L; for (int v = 0; v < V; ++v) dot[v] += mc[v] * nu[c][v]; }
        const float* lwk = LW + (b * K + k) * L + l0; const float* msk = MS + (b * K + k) * L + l0;
        float p[V], scale[V];
        for (int v = 0; v < V; ++v) {
          const float logit = lwk[v] + (dot[v] - 0.5f * zeta * msk[v]) * inv_d;
          const float mn = std::max(m[v], logit);
          scale[v] = std::exp(m[v] - mn); p[v] = std::exp(logit - mn); m[v] = mn;
          den[v] = den[v] * scale[v] + p[v];
          p[v] *= inv_d;
          vsum[v] = vsum[v] * scale[v] + p[v] * vk;
        }
        for (int c = 0; c < C; ++c) {
          const float* mc = muk + c * L;
          for (int v = 0; v < V; ++v) acc[c][v] = acc[c][v] * scale[v] + p[v] * mc[v];
        }
      }
      const float g = (s_next - s) / sc;
      for (int c = 0; c < C; ++c) for (int v = 0; v < V; ++v) {
        const float x0 = (acc[c][v] + nu[c][v] * vsum[v]) / den[v];
        x[c][v] += (x[c][v] - x0) * g;
      }
      s = s_next; r = r_next;
    }
    for (int c = 0; c < C; ++c) for (int v = 0; v < nv; ++v) O[(b * C + c) * L + l0 + v] = x[c][v];
  }
  return out;
}
"""

_module = None


def _build():
    global _module
    if _module is None:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline(
            "piflow_bench_gm_rollout_cpp",
            cpp_sources=[_SOURCE],
            functions=["gm_rollout_cpu"],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
            extra_ldflags=["-fopenmp"],
        )
    return _module


@torch.no_grad()
def gm_rollout_cpp(x_start, means, logweights, logstds, x_src, sigma_src, sigma_start, n_substeps, substep_size,
                   r_start, shift: float) -> torch.Tensor:  # fmt: skip
    """Same arguments and result as :func:`piflow_kernels.ops.gm_torch.gm_rollout_torch` (float32 CPU, C <= 64)."""
    if means.shape[2] > 64 or x_start.device.type != "cpu":
        raise ValueError("the C++ prototype handles CPU tensors with C <= 64")
    mu, var, lw = _prepare(means, logweights, logstds, x_src, sigma_src)
    mu = mu.contiguous()
    s_src = sigma_src.float().clamp(min=EPS)
    a_src = 1.0 - s_src
    nu_src = ((a_src / s_src**2)[:, None, None] * x_src.float()).contiguous()
    args = (x_start.float().contiguous(), mu, (mu * mu).sum(2).contiguous(), var.contiguous(), lw.contiguous(), nu_src,
            ((a_src / s_src) ** 2).contiguous(), sigma_start.float().contiguous(), n_substeps.int().contiguous(),
            substep_size.float().contiguous(), r_start.float().contiguous(), float(shift))  # fmt: skip
    return _build().gm_rollout_cpu(*args).to(x_start.dtype)
