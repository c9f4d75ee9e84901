"""Baselines in the style of the official pi-Flow code: eager tensor ops, posterior recomputed every substep.

The official sampler evaluates a GMFlow policy by converting it to x0 space once, then, at every
substep, recomputing the full Gaussian-mixture posterior over the (B, K, C, *S) tensors (about 15
eager ops, each a full pass over memory), inside a Python loop whose length is read back from the
device (``.item()``). Its policy also checks, each call, whether (x, sigma) is the source point
(a comparison pass and a host synchronisation). This module reproduces that cost structure from the
equations of docs/design.md#gmflow-policy and #rollout so the benchmarks can compare against it without the official
package (which needs mmcv/mmgen). The posterior function is run through ``torch.jit.script`` when that
works, as the official code does; ``torch.compile`` of the substep is the second baseline.

    >>> pol = OfficialStyleGMPolicy(means, logweights, logstds, x_src, sigma_src)
    >>> x_end = official_style_rollout(pol, x_src, sigma_src, sigma_end, total_substeps=128)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

GM_EPS = 1e-6
DX_EPS = 1e-4


def gm_posterior_x0(
    sigma_src: torch.Tensor,
    sigma: torch.Tensor,
    x_src: torch.Tensor,
    x: torch.Tensor,
    means_x0: torch.Tensor,
    gm_vars: torch.Tensor,
    logweights: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """x0 of the GM posterior given both observations, op by op over the full (B, K, C, *S) tensors.

    sigma_src, sigma: (B, 1, *1); x_src, x: (B, C, *S); means_x0: (B, K, C, *S); gm_vars: (B, K|1, 1, *1);
    logweights: (B, K, 1, *S). Returns (B, C, *S).
    """
    s_src = sigma_src.clamp(min=eps)
    s = sigma.clamp(min=eps)
    ratio_src = (1 - s_src) / s_src
    ratio = (1 - s) / s
    zeta = (ratio * ratio - ratio_src * ratio_src).unsqueeze(1)  # (B, 1, 1, *1)
    nu = (ratio * x / s - ratio_src * x_src / s_src).unsqueeze(1)  # (B, 1, C, *S)
    denom = (gm_vars * zeta + 1).clamp(min=eps)
    component_means = (gm_vars * nu + means_x0) / denom  # (B, K, C, *S)
    logit_shift = (means_x0 * (nu - 0.5 * zeta * means_x0)).sum(dim=2, keepdim=True) / denom
    weights = (logweights + logit_shift).softmax(dim=1)  # (B, K, 1, *S)
    return (component_means * weights).sum(dim=1)


_scripted: dict[str, Callable | None] = {}


def scripted_posterior() -> Callable:
    """``gm_posterior_x0`` through ``torch.jit.script`` (as the official code runs it), or eager if that fails."""
    if "gm" not in _scripted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _scripted["gm"] = torch.jit.script(gm_posterior_x0)
        except Exception:  # TorchScript deprecated or unavailable: the eager function has the same op structure
            _scripted["gm"] = None
    return _scripted["gm"] or gm_posterior_x0


def posterior_is_scripted() -> bool:
    return scripted_posterior() is not gm_posterior_x0


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.dim() == 0:
        value = value.expand(like.shape[0])
    return value.reshape(like.shape[0], *([1] * (like.dim() - 1)))


class OfficialStyleGMPolicy:
    """GMFlow policy evaluated as the official code does. Shapes as :class:`piflow_kernels.GMFlowPolicy`.

    Computes in the dtype it is given (the benchmarks pass float32).
    """

    def __init__(self, means, logweights, logstds, x_src, sigma_src, jit: bool = True):
        self.x_src = x_src
        self.sigma_src = _per_sample(sigma_src, x_src)
        s_src = self.sigma_src.unsqueeze(1)
        self.means_x0 = x_src.unsqueeze(1) - s_src * means
        self.gm_vars = (2 * logstds).exp() * s_src.square()
        self.logweights = logweights
        self.posterior = scripted_posterior() if jit else gm_posterior_x0
        self.check_source_point = True

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        if self.check_source_point and bool((sigma == self.sigma_src).all()) and bool((x == self.x_src).all()):
            x0 = (self.logweights.softmax(dim=1) * self.means_x0).sum(dim=1)
        else:
            x0 = self.posterior(self.sigma_src, sigma, self.x_src, x, self.means_x0, self.gm_vars, self.logweights, GM_EPS)
        return (x - x0) / sigma.clamp(min=GM_EPS)


class OfficialStyleDXPolicy:
    """DX policy evaluated as the official code does (gather of the two neighbouring grid points)."""

    def __init__(self, grid, x_src, sigma_src, segment_size=1.0, shift=1.0, mode="grid"):
        self.x_src = x_src
        self.shift = shift
        self.mode = mode
        self.sigma_src = _per_sample(sigma_src, x_src)
        self.r_src = self._unwarp(self.sigma_src)
        self.r_dst = (self.r_src - segment_size).clamp(min=0)
        self.seg = (self.r_src - self.r_dst).clamp(min=DX_EPS)
        self.x0_points = x_src.unsqueeze(1) - self.sigma_src.unsqueeze(1) * grid  # (B, N, C, *S)

    def _unwarp(self, sigma):
        return sigma / (self.shift + (1 - self.shift) * sigma)

    def _interpolate(self, t):
        pts = self.x0_points
        n = pts.shape[1]
        if n == 1:
            return pts[:, 0]
        p = t.clamp(0, 1) * (n - 1)
        lo = p.floor().long().clamp(0, n - 2)
        idx = torch.stack([lo, lo + 1], dim=1).expand(-1, -1, *pts.shape[2:])
        two = torch.gather(pts, 1, idx)
        return (lo + 1 - p) * two[:, 0] + (p - lo) * two[:, 1]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        r = self._unwarp(sigma)
        if self.mode == "grid":
            x0 = self._interpolate((r - self.r_dst) / self.seg)
        else:
            diff = self.r_src - r
            basis = torch.stack([diff**i for i in range(self.x0_points.shape[1])], dim=1)
            x0 = (basis * self.x0_points).sum(dim=1)
        return (x - x0) / sigma.clamp(min=DX_EPS)


def _warp(r, shift):
    return shift * r / (1 + (shift - 1) * r)


def _unwarp(s, shift):
    return s / (shift + (1 - shift) * s)


@torch.no_grad()
def official_style_rollout(
    policy,
    x_start: torch.Tensor,
    sigma_start: torch.Tensor | float,
    sigma_end: torch.Tensor | float,
    total_substeps: int = 128,
    shift: float = 1.0,
    substep_rule: str = "round",
) -> torch.Tensor:
    """Euler substeps uniform in raw time, per-sample counts, as the official ``policy_rollout`` loop.

    The loop length is read back from the device once per rollout; masks keep finished samples still.
    ``substep_rule``: "round" (LakonLab before v0.2.0) or "ceil" (v0.2.0's bare ``ceil``).
    """
    s = _per_sample(sigma_start, x_start)
    r = _unwarp(s, shift)
    r_end = _unwarp(_per_sample(sigma_end, x_start), shift)
    n_substeps = _count(r - r_end, total_substeps, substep_rule)
    h = (r - r_end) / n_substeps
    x = x_start
    for step in range(int(n_substeps.max().item())):
        u = policy.velocity(x, s)
        r_next = (r - h).clamp(min=0)
        s_next = _warp(r_next, shift)
        x_next = x + u * (s_next - s)
        active = n_substeps > step
        x = torch.where(active, x_next, x)
        s = torch.where(active, s_next, s)
        r = torch.where(active, r_next, r)
    return x


def _count(delta: torch.Tensor, total_substeps: int, substep_rule: str) -> torch.Tensor:
    """Per-sample substep counts (B,) int64 of a raw-time span under the official rule of that version."""
    if substep_rule not in ("round", "ceil"):
        raise ValueError(f"substep_rule must be 'round' or 'ceil', got {substep_rule!r}")
    n = delta * total_substeps
    return (n.round() if substep_rule == "round" else n.ceil()).long().clamp(min=1)


def gm_substep(x, s, s_next, x_src, sigma_src, means_x0, gm_vars, logweights):
    """One official-style GM substep (posterior from scratch + Euler update); the unit ``torch.compile`` sees."""
    x0 = gm_posterior_x0(sigma_src, s, x_src, x, means_x0, gm_vars, logweights, GM_EPS)
    return x + (x - x0) / s.clamp(min=GM_EPS) * (s_next - s)


_compiled_substep: dict[str, Callable] = {}


@torch.no_grad()
def compiled_official_style_rollout(
    policy: OfficialStyleGMPolicy,
    x_start: torch.Tensor,
    sigma_start: torch.Tensor | float,
    sigma_end: torch.Tensor | float,
    total_substeps: int = 128,
    shift: float = 1.0,
) -> torch.Tensor:
    """The official-style loop with its substep under ``torch.compile`` (one graph per substep).

    The source-point check is data-dependent control flow, so it is left out here (a best case for
    the compiled baseline). Shapes are static per benchmark case, so compile once per shape.
    """
    if "gm" not in _compiled_substep:
        _compiled_substep["gm"] = torch.compile(gm_substep)
    step_fn = _compiled_substep["gm"]
    s = _per_sample(sigma_start, x_start)
    r = _unwarp(s, shift)
    r_end = _unwarp(_per_sample(sigma_end, x_start), shift)
    n_substeps = ((r - r_end) * total_substeps).round().long().clamp(min=1)
    h = (r - r_end) / n_substeps
    x = x_start
    for step in range(int(n_substeps.max().item())):
        r_next = (r - h).clamp(min=0)
        active = n_substeps > step
        s_next = torch.where(active, _warp(r_next, shift), s)
        x = step_fn(x, s, s_next, policy.x_src, policy.sigma_src, policy.means_x0, policy.gm_vars, policy.logweights)
        s = s_next
        r = torch.where(active, r_next, r)
    return x


def reset_compiled() -> None:
    """Forget the compiled substep (so a benchmark can time a first call again)."""
    _compiled_substep.clear()
