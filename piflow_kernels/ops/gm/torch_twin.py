"""GM policy ops on plain PyTorch (the "torch" backend): restructured algebra, any device.

The velocity is differentiable by autograd; the rollout runs one ``torch.compile``'d substep per call (eager
when compiling is off or fails). On CPU tensors the dispatcher prefers the fused native loop
(:mod:`piflow_kernels.ops.gm.native`); this rollout is its fallback and the path on other devices.

Algebra (docs/design.md, [eq:gm-restructured]): with mu_k = x_src - s_src * means_k,
var_k = exp(2 logstd_k) s_src^2,
    nu = a x / s^2 - a_src x_src / s_src^2,  zeta = (a/s)^2 - (a_src/s_src)^2,  d_k = max(var_k zeta + 1, eps)
    logit_k = logweights_k + (mu_k . nu - zeta/2 ||mu_k||^2) / d_k,   w = softmax_k(logit)
    x0 = sum_k (w_k / d_k) mu_k + nu * sum_k w_k var_k / d_k,   u = (x - x0) / s
so per substep only two contractions over (K, C) remain: mu_k . nu and sum_k c_k mu_k. Over a rollout
mu, ||mu||^2, var and the x_src part of nu are constant and computed once.

    >>> u = gm_velocity_torch(x, sigma, GMTensors(means, logweights, logstds, x_src, sigma_src))  # (B, C, L)
"""

from __future__ import annotations

import logging
import os
import time

import torch

from piflow_kernels.constants import GM_EPS
from piflow_kernels.ops.records import GMTensors, RolloutPlan
from piflow_kernels.timesteps import sigma_table

logger = logging.getLogger(__name__)


def variances(policy: GMTensors) -> torch.Tensor:
    """var_k = exp(2 logstd_k) sigma_src^2 (the raw sigma_src, as the reference), (B, K) float32 (expanded)."""
    b, k = policy.means.shape[:2]
    return (torch.exp(2.0 * policy.logstds.float()) * policy.sigma_src.float()[:, None] ** 2).expand(b, k)


def source_terms(sigma_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_src / s_src^2, (a_src / s_src)^2), (B,) float32 with s_src clamped: nu_src = the first times x_src."""
    s_src = sigma_src.float().clamp(min=GM_EPS)
    a_src = 1.0 - s_src
    return a_src / s_src**2, (a_src / s_src) ** 2


def _x0_space(policy: GMTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constant-over-rollout quantities, float32: mu (B,K,C,L), var (B,K), lw (B,K,L)."""
    mu = policy.x_src.float()[:, None] - policy.sigma_src.float()[:, None, None, None] * policy.means.float()
    return mu, variances(policy), policy.logweights.float()


def _posterior_x0(x, s, mu, mu_sq, var, lw, zeta, nu):
    """x0 of the GM posterior. x, nu (B,C,L); s, zeta (B,); mu (B,K,C,L); mu_sq, lw (B,K,L); var (B,K)."""
    d = (var * zeta[:, None] + 1.0).clamp(min=GM_EPS)  # (B, K)
    # elementwise products + sums (not einsum): inductor fuses them into one pass over mu, where an
    # einsum becomes a bmm with a permuted copy of mu every substep (measured 2x slower end to end)
    mu_nu = (mu * nu[:, None]).sum(2)
    logits = lw + (mu_nu - 0.5 * zeta[:, None, None] * mu_sq) / d[:, :, None]
    w = torch.softmax(logits, dim=1)
    c = w / d[:, :, None]  # (B, K, L)
    x0 = (c[:, :, None] * mu).sum(1) + nu * (c * var[:, :, None]).sum(1, keepdim=True)
    return x0


def gm_velocity_torch(x: torch.Tensor, sigma: torch.Tensor, policy: GMTensors) -> torch.Tensor:
    """GM policy velocity u(x, sigma), differentiable (plain autograd).

    Args:
        x: (B, C, L) any float dtype; sigma: (B,) float32; policy: the flat GM policy.
    Returns:
        u (B, C, L) in x.dtype, computed in float32.
    """
    mu, var, lw = _x0_space(policy)
    s = sigma.float().clamp(min=GM_EPS)
    a = 1.0 - s
    cn_src, c_src = source_terms(policy.sigma_src)
    zeta = (a / s) ** 2 - c_src
    xf = x.float()
    nu = (a / s**2)[:, None, None] * xf - cn_src[:, None, None] * policy.x_src.float()
    # one evaluation: the logit contraction in its literal form mu . (nu - zeta mu / 2), which cancels less than
    # mu . nu - zeta ||mu||^2 / 2 far from the source (sigma 0.05: logstds-gradient error 2e-4 -> the fp32
    # reference's own 4e-5); the rollout keeps the split form, whose ||mu||^2 is computed once
    d = (var * zeta[:, None] + 1.0).clamp(min=GM_EPS)
    dot = (mu * (nu[:, None] - (0.5 * zeta)[:, None, None, None] * mu)).sum(2)
    w = torch.softmax(lw + dot / d[:, :, None], dim=1)
    c = w / d[:, :, None]
    x0 = (c[:, :, None] * mu).sum(1) + nu * (c * var[:, :, None]).sum(1, keepdim=True)
    return ((xf - x0) / s[:, None, None]).to(x.dtype)


def _gm_substep(x, s, s_next, mu, mu_sq, var, lw, nu_src, c_src):
    """One Euler substep in float32. x (B,C,L); s, s_next (B,); nu_src = a_src x_src / s_src^2 (B,C,L);
    c_src = (a_src / s_src)^2 (B,). Samples whose step is over pass s_next == s and stay put."""
    s_c = s.clamp(min=GM_EPS)
    a = 1.0 - s_c
    zeta = (a / s_c) ** 2 - c_src
    nu = (a / s_c**2)[:, None, None] * x - nu_src
    x0 = _posterior_x0(x, s_c, mu, mu_sq, var, lw, zeta, nu)
    u = (x - x0) / s_c[:, None, None]
    return x + u * (s_next - s)[:, None, None]


# The compiled substep and what happened to it in this process. A failed compile (no C++ toolchain, an
# unsupported platform) is remembered here, never written to os.environ: the process keeps its settings.
_compiled = {"fn": None, "seconds": None, "failure": None}


def compile_enabled() -> bool:
    """Whether the rollout substep is ``torch.compile``'d: unless ``PIFLOW_COMPILE=0`` or a compile failed here."""
    return os.environ.get("PIFLOW_COMPILE", "1") != "0" and _compiled["failure"] is None


def compile_failure() -> str | None:
    """Why compiling the substep failed in this process (None if it did not)."""
    return _compiled["failure"]


def last_compile_seconds() -> float | None:
    """Wall time of the first compiled call in this process (compilation included), for benchmarks."""
    return _compiled["seconds"]


def _compiled_substep():
    """The compiled substep. Only the batch dimension is dynamic (marked at each call); K, C and L are
    static, so a policy shape compiles once and every later call, whatever its batch size, reuses it.
    Fully dynamic shapes cost vectorisation: measured on 2 cores at B=16, K=32, C=4, 32x32, 1 thread,
    3.9 ms CPU per substep with ``dynamic=True`` against 2.7 ms with only B dynamic (eager: 10 ms)."""
    if _compiled["fn"] is None:
        _compiled["fn"] = torch.compile(_gm_substep, dynamic=False)
    return _compiled["fn"]


def _call_substep(*args):
    if not compile_enabled():
        return _gm_substep(*args)
    fn = _compiled_substep()
    for a in args:
        torch._dynamo.maybe_mark_dynamic(a, 0)  # batch size: symbolic (no recompile per B)
    try:
        if _compiled["seconds"] is None:
            t0 = time.perf_counter()
            out = fn(*args)
            _compiled["seconds"] = time.perf_counter() - t0
            return out
        return fn(*args)
    except Exception as err:  # no C++ compiler, unsupported platform: eager from now on, say why once
        _compiled["failure"] = f"{type(err).__name__}: {err}"
        _compiled["fn"] = None
        logger.warning("piflow_kernels: torch.compile of the GM substep failed (%s); using eager", err)
        return _gm_substep(*args)


@torch.no_grad()
def gm_rollout_torch(x_start: torch.Tensor, policy: GMTensors, plan: RolloutPlan) -> torch.Tensor:
    """Whole GM rollout ([eq:rollout]) as one compiled (or eager) substep per call over the whole batch.

    Args:
        x_start: (B, C, L) any float dtype; policy: the flat GM policy; plan: the substep plan.
    Returns:
        x_end (B, C, L) in x_start.dtype.
    """
    sigmas = sigma_table(*plan.kernel_args)
    cn_src, c_src = source_terms(policy.sigma_src)
    mu, var, lw = _x0_space(policy)
    mu_sq = (mu * mu).sum(2)
    nu_src = cn_src[:, None, None] * policy.x_src.float()
    x = x_start.float().clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = _call_substep(x, s, s_next, mu, mu_sq, var, lw, nu_src, c_src)
    return x.to(x_start.dtype)


__all__ = [
    "compile_enabled",
    "compile_failure",
    "gm_rollout_torch",
    "gm_velocity_torch",
    "last_compile_seconds",
    "source_terms",
    "variances",
]
