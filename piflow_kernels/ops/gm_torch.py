"""GMFlow policy ops, CPU twin ("torch" backend): restructured algebra, torch.compile'd rollout substep.

On the CPU the rollout runs as one fused native loop instead (:mod:`piflow_kernels.ops.gm_native`) when
the system compiler can build it; the compiled substep here is its fallback and the path on other devices.

Flat layout used by every GM op (the policy reshapes to it):
    x, x_src    (B, C, L)     latents, L = prod(spatial)
    means       (B, K, C, L)  velocity-space component means
    logweights  (B, K, L)     log-softmax over K (may hold -inf)
    logstds     (B, K1)       K1 = 1 (one std per sample) or K (per component)
    sigma*      (B,)          float32

Algebra (DESIGN.md section 3): with mu_k = x_src - s_src * means_k, var_k = exp(2 logstd_k) s_src^2,
    nu = a x / s^2 - a_src x_src / s_src^2,  zeta = (a/s)^2 - (a_src/s_src)^2,  d_k = max(var_k zeta + 1, eps)
    logit_k = logweights_k + (mu_k . nu - zeta/2 ||mu_k||^2) / d_k,   w = softmax_k(logit)
    x0 = sum_k (w_k / d_k) mu_k + nu * sum_k w_k var_k / d_k,   u = (x - x0) / s
so per substep only two contractions over (K, C) remain: mu_k . nu and sum_k c_k mu_k. Over a rollout
mu, ||mu||^2, var and the x_src part of nu are constant and computed once.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from piflow_kernels.ops import gm_native
from piflow_kernels.timesteps import sigma_table

EPS = 1e-6
logger = logging.getLogger(__name__)


def _variances(logstds: torch.Tensor, sigma_src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """var_k = exp(2 logstd_k) sigma_src^2 (the raw sigma_src, as the reference), (B, K) float32 (expanded)."""
    return (torch.exp(2.0 * logstds.float()) * sigma_src.float()[:, None] ** 2).expand(shape[0], shape[1])


def _source_terms(sigma_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_src / s_src^2, (a_src / s_src)^2), (B,) float32 with s_src clamped: nu_src = the first times x_src."""
    s_src = sigma_src.float().clamp(min=EPS)
    a_src = 1.0 - s_src
    return a_src / s_src**2, (a_src / s_src) ** 2


def _prepare(means, logweights, logstds, x_src, sigma_src):
    """Constant-over-rollout quantities, float32: mu (B,K,C,L), var (B,K), lw (B,K,L)."""
    mu = x_src.float()[:, None] - sigma_src.float()[:, None, None, None] * means.float()
    return mu, _variances(logstds, sigma_src, means.shape), logweights.float()


def _posterior_x0(x, s, mu, mu_sq, var, lw, zeta, nu):
    """x0 of the GM posterior. x, nu (B,C,L); s, zeta (B,); mu (B,K,C,L); mu_sq, lw (B,K,L); var (B,K)."""
    d = (var * zeta[:, None] + 1.0).clamp(min=EPS)  # (B, K)
    # elementwise products + sums (not einsum): inductor fuses them into one pass over mu, where an
    # einsum becomes a bmm with a permuted copy of mu every substep (measured 2x slower end to end)
    mu_nu = (mu * nu[:, None]).sum(2)
    logits = lw + (mu_nu - 0.5 * zeta[:, None, None] * mu_sq) / d[:, :, None]
    w = torch.softmax(logits, dim=1)
    c = w / d[:, :, None]  # (B, K, L)
    x0 = (c[:, :, None] * mu).sum(1) + nu * (c * var[:, :, None]).sum(1, keepdim=True)
    return x0


def gm_velocity_torch(
    x: torch.Tensor,
    sigma: torch.Tensor,
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
) -> torch.Tensor:
    """GM policy velocity u(x, sigma), differentiable (plain autograd). Returns (B, C, L) in x.dtype."""
    mu, var, lw = _prepare(means, logweights, logstds, x_src, sigma_src)
    s = sigma.float().clamp(min=EPS)
    a = 1.0 - s
    cn_src, c_src = _source_terms(sigma_src)
    zeta = (a / s) ** 2 - c_src
    xf = x.float()
    nu = (a / s**2)[:, None, None] * xf - cn_src[:, None, None] * x_src.float()
    # one evaluation: the logit contraction in its literal form mu . (nu - zeta mu / 2), which cancels less than
    # mu . nu - zeta ||mu||^2 / 2 far from the source (sigma 0.05: logstds-gradient error 2e-4 -> the fp32
    # reference's own 4e-5); the rollout keeps the split form, whose ||mu||^2 is computed once
    d = (var * zeta[:, None] + 1.0).clamp(min=EPS)
    dot = (mu * (nu[:, None] - (0.5 * zeta)[:, None, None, None] * mu)).sum(2)
    w = torch.softmax(lw + dot / d[:, :, None], dim=1)
    c = w / d[:, :, None]
    x0 = (c[:, :, None] * mu).sum(1) + nu * (c * var[:, :, None]).sum(1, keepdim=True)
    return ((xf - x0) / s[:, None, None]).to(x.dtype)


def _gm_substep(x, s, s_next, mu, mu_sq, var, lw, nu_src, c_src):
    """One Euler substep in float32. x (B,C,L); s, s_next (B,); nu_src = a_src x_src / s_src^2 (B,C,L);
    c_src = (a_src / s_src)^2 (B,). Samples whose step is over pass s_next == s and stay put."""
    s_c = s.clamp(min=EPS)
    a = 1.0 - s_c
    zeta = (a / s_c) ** 2 - c_src
    nu = (a / s_c**2)[:, None, None] * x - nu_src
    x0 = _posterior_x0(x, s_c, mu, mu_sq, var, lw, zeta, nu)
    u = (x - x0) / s_c[:, None, None]
    return x + u * (s_next - s)[:, None, None]


_compiled_substep = None
_compile_seconds: float | None = None


def compile_enabled() -> bool:
    """torch.compile is used unless PIFLOW_COMPILE=0 (or no working C++ toolchain, detected at first use)."""
    return os.environ.get("PIFLOW_COMPILE", "1") != "0"


def _substep_fn():
    """The compiled substep, or eager.

    Only the batch dimension is dynamic (marked at each call); K, C and L are static, so a policy shape
    compiles once and every later call, whatever its batch size, reuses it. Fully dynamic shapes cost
    vectorisation: measured on 2 cores at B=16, K=32, C=4, 32x32, 1 thread, 3.9 ms CPU per substep with
    ``dynamic=True`` against 2.7 ms with only B dynamic (eager: 10 ms).
    """
    global _compiled_substep
    if not compile_enabled():
        return _gm_substep
    if _compiled_substep is None:
        _compiled_substep = torch.compile(_gm_substep, dynamic=False)
    return _compiled_substep


def last_compile_seconds() -> float | None:
    """Wall time of the first compiled call in this process (compilation included), for benchmarks."""
    return _compile_seconds


def _call_substep(*args):
    global _compiled_substep, _compile_seconds
    fn = _substep_fn()
    if fn is _gm_substep:
        return fn(*args)
    for a in args:
        torch._dynamo.maybe_mark_dynamic(a, 0)  # batch size: symbolic (no recompile per B)
    try:
        if _compile_seconds is None:
            t0 = time.perf_counter()
            out = fn(*args)
            _compile_seconds = time.perf_counter() - t0
            return out
        return fn(*args)
    except Exception as err:  # no C++ compiler, unsupported platform: fall back, say why once
        logger.warning("piflow_kernels: torch.compile of the GM substep failed (%s); using eager", err)
        os.environ["PIFLOW_COMPILE"] = "0"
        _compiled_substep = None
        return _gm_substep(*args)


@torch.no_grad()
def gm_rollout_torch(
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
    """Whole rollout (DESIGN.md section 4). n_substeps (B,) int32, substep_size and r_start (B,) float32.

    On the CPU the rollout runs as one fused native loop (:mod:`piflow_kernels.ops.gm_native`) when it can be
    built; otherwise, and on other devices, as one compiled substep per call over the whole batch.
    Returns x_end (B, C, L) in x_start.dtype.
    """
    sigmas = sigma_table(sigma_start, n_substeps, substep_size, r_start, shift)
    cn_src, c_src = _source_terms(sigma_src)
    if x_start.device.type == "cpu" and not torch.compiler.is_compiling():
        var = _variances(logstds, sigma_src, means.shape)
        table = torch.stack(sigmas, 1)
        out = gm_native.gm_rollout_native(
            x_start, means, logweights, x_src, var, sigma_src, cn_src, c_src, table, logstds.shape[1] > 1
        )
        if out is not None:
            return out.to(x_start.dtype)
    mu, var, lw = _prepare(means, logweights, logstds, x_src, sigma_src)
    mu_sq = (mu * mu).sum(2)
    nu_src = cn_src[:, None, None] * x_src.float()
    x = x_start.float().clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = _call_substep(x, s, s_next, mu, mu_sq, var, lw, nu_src, c_src)
    return x.to(x_start.dtype)
