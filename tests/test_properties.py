"""Property-based tests of GMFlowPolicy and DXPolicy over their whole input domain (docs/design.md#domain-of-the-inputs):
every backend ("torch" with the native CPU GM rollout, the torch twin's GM rollout, "reference", "triton" in the
interpreter on tiny shapes), every output finite and in agreement with the float64 reference.

Strategies. One example is one policy and its queries; hypothesis draws the structure, the scales and a seed, and
the tensors come from a ``torch.Generator`` with that seed (shrinking then works on a few numbers, not on tensors).

- shapes: B in 1..3, K (GM) or N (DX) in 1..5, C in 1..4, 4D latents (H, W in 1..4) or 5D (T, H, W in 1..3);
  the Triton tests B <= 2, K or N <= 4, C <= 3 and at most 3 per spatial axis.
- dtype of every tensor: fp32, bf16 or fp16 (the policy math runs in float32 whatever it is).
- GM: means N(0, scale^2), scale in [0.05, 4]; logweights N(0, scale^2), scale in [0, 8], a fraction in [0, 0.9]
  of them -inf (per pixel, or whole components), at least one finite per pixel, log-softmax normalised or not;
  logstds per sample or per component, uniform in a drawn [lo, hi] inside [-10, 3] (both edges drawn often).
- DX: grid N(0, scale^2), scale in [0.05, 4]; segment_size in [1e-4, 2] (1e-4, 1 and 2 drawn often); the
  policy's shift in [0.5, 5]; mode "grid" or "polynomial".
- sigmas, per sample, float32: sigma_src in [0, 1] with 0, 1e-6, 1e-4 and 1 drawn often; the query sigma and the
  rollout's sigma_start at a fraction in [0, 1] of sigma_src (0 and 1 drawn often: data and the source point);
  sigma_end at a fraction in [0, 1] of sigma_start; the rollout's shift in [0.5, 5]; total_substeps in 1..16.
- query point: x = x_src + offset * noise, offset in [0, 3] (0 drawn often: x is exactly x_src); the rollout
  starts from the same x.

Agreement rule, for each output (the velocity; its gradients w.r.t. means, logweights, logstds or grid, x and
x_src; the rollout's x_end), backend and dtype. With ``err = rel_err(out, ref64)`` (tests/conftest.py: max |out -
ref| / max |ref|, with the floors under max |ref| below) and ``err32`` the same error of the literal reference run
in float32 on the same inputs, its result cast to the output's dtype:

    pass  iff  out is finite  and  (err <= TOL[kind][dtype]  or  err <= 2 * err32 + FLOOR  or  err32 >= 1)

- ``FLOOR = 1e-6`` (relative, about 8 float32 ulps). The second branch is the flash-attention convention: where
  the problem is ill-conditioned in float32 (sigma near 0 against a far source, large stds, a posterior that
  hardly prefers one component) the fixed tolerance is beyond float32, and a fast path may be as wrong as the
  literal equations in float32, but not much more.
- The logweights gradient w_k (e_k - sum_j w_j e_j), e_k = dL/dw_k, is formed to about eps * max |e| by any
  direct formula, float64 autograd of the reference included; where the posterior is nearly hard (weights of
  1e-17 off the dominant component) every entry lies far below that, and the reference's own rounding is the
  whole of it. Its errors are therefore taken relative to max(max |ref|, max |e|) instead of max |ref|.
- Likewise a velocity's errors are taken relative to at least the float64 reference's own rounding of (x - x0) / s'
  (``velocity_floor``, about 1e-16 (|x| + |x0|) / s'): at sigma_src = 1e-38 the true velocity is 1e-32 and the
  reference rounds it to 0.
- ``err32 >= 1``: the float32 equations keep no correct digit (a logstds gradient at sigma 0, where u depends on
  the stds through terms of 1e-14); two such errors only compare rounding noise, so only finiteness is checked.
- Overflow: elements whose float64 value is within a factor 2 of the largest finite value of the output dtype
  (an fp16 velocity (x - x0) / 1e-6 near sigma 0) may be an infinity of the right sign; they are left out of both
  errors. The "reference" backend is the float32 equations themselves: it may be non-finite where the float32
  reference is (its fp16 gradients at sigma_src 1e-6, say); every other backend must be finite.

Profiles (hypothesis settings, registered here): "ci", the default, is derandomised (the same examples on every
run) and small enough for the file to take well under a minute on two CPU cores; "long" draws many random
examples: ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py``. The table of bad inputs and
the error each one gets is tests/test_policy_domain.py; a longer random run is ``python -m bench.fuzz``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from conftest import TOL
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import piflow_kernels as pk
from piflow_kernels import reference as R
from piflow_kernels.ops.gm import native
from piflow_kernels.ops.gm.torch_twin import gm_rollout_torch
from piflow_kernels.ops.records import RolloutPlan

pytestmark = [
    # the Triton interpreter (numpy) warns where an fp16 output overflows, as the rule below allows
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
    pytest.mark.usefixtures("one_thread_per_module"),  # tiny tensors: one torch thread
]

_COMMON = dict(deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
# "ci": the same examples every run, and a failure reported as drawn: shrinking a Triton example (about 0.5 s each in
# the interpreter) took 5 minutes. max_examples is per CPU test; a Triton test runs a fifth of it.
settings.register_profile("ci", derandomize=True, max_examples=150, phases=[Phase.explicit, Phase.generate], **_COMMON)
settings.register_profile("long", max_examples=3000, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
CPU_SETTINGS = settings(PROFILE)
TRITON_SETTINGS = settings(PROFILE, max_examples=max(1, PROFILE.max_examples // 5))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR = 1e-6
EDGE_SIGMAS = (0.0, 1e-6, 1e-4, 1.0)


# ------------------------------------------------------------------------------------------------ strategies


def _in_unit(edges=(0.0, 1.0)):
    """A float32 in [0, 1], the edges drawn often."""
    return st.one_of(st.sampled_from(edges), st.floats(0.0, 1.0, width=32))


@dataclass(frozen=True)
class Queries:
    """Per-sample sigmas of one velocity query and one rollout, and the rollout's settings."""

    sigma_src: tuple[float, ...]
    sigma_frac: tuple[float, ...]  # sigma = sigma_src * frac
    start_frac: tuple[float, ...]  # sigma_start = sigma_src * frac
    end_frac: tuple[float, ...]  # sigma_end = sigma_start * frac
    total_substeps: int
    shift: float
    x_offset: float  # x = x_src + x_offset * noise

    def sigmas(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigma_src, sigma, sigma_start, sigma_end), (B,) float32 each, products in float32 so every bound holds."""
        s_src = torch.tensor(self.sigma_src, dtype=torch.float32)
        s0 = s_src * torch.tensor(self.start_frac, dtype=torch.float32)
        return s_src, s_src * torch.tensor(self.sigma_frac, dtype=torch.float32), s0, s0 * torch.tensor(self.end_frac)


@st.composite
def queries(draw, b: int) -> Queries:
    per_sample = lambda s: st.lists(s, min_size=b, max_size=b).map(tuple)  # noqa: E731
    return Queries(
        sigma_src=draw(per_sample(_in_unit(EDGE_SIGMAS))),
        sigma_frac=draw(per_sample(_in_unit())),
        start_frac=draw(per_sample(_in_unit())),
        end_frac=draw(per_sample(_in_unit())),
        total_substeps=draw(st.integers(1, 16)),
        shift=draw(st.one_of(st.sampled_from([0.5, 1.0, 5.0]), st.floats(0.5, 5.0))),
        x_offset=draw(st.one_of(st.just(0.0), st.floats(0.0, 3.0))),
    )


@st.composite
def shapes(draw, max_b: int, max_k: int, max_c: int, max_side: int) -> tuple[int, int, int, tuple[int, ...]]:
    """(B, K or N, C, spatial), spatial 2D or 3D (4D or 5D latents)."""
    b, k, c = draw(st.integers(1, max_b)), draw(st.integers(1, max_k)), draw(st.integers(1, max_c))
    nd = draw(st.sampled_from([2, 3]))
    side = max_side if nd == 2 else min(max_side, 3)
    return b, k, c, tuple(draw(st.lists(st.integers(1, side), min_size=nd, max_size=nd)))


@dataclass(frozen=True)
class GMCase:
    b: int
    k: int
    c: int
    spatial: tuple[int, ...]
    dtype: str
    per_component: bool  # logstds (B, K, 1, *1) instead of (B, 1, 1, *1)
    logstd_range: tuple[float, float]
    mean_scale: float
    logweight_scale: float
    drop: float  # fraction of logweights at -inf
    drop_components: bool  # whole components dropped (as dropout does) instead of single entries
    normalised: bool  # logweights log-softmax normalised
    q: Queries
    seed: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(means, logweights, logstds, x_src, x, grad_u), all of the case's dtype."""
        g = torch.Generator().manual_seed(self.seed)
        b, k, c, sp = self.b, self.k, self.c, self.spatial
        means = self.mean_scale * torch.randn(b, k, c, *sp, generator=g)
        lw = self.logweight_scale * torch.randn(b, k, 1, *sp, generator=g)
        drop_shape = (b, k, 1, *([1] * len(sp))) if self.drop_components else lw.shape
        dropped = (torch.rand(drop_shape, generator=g) < self.drop).expand(lw.shape).clone()
        lonely = dropped.all(dim=1, keepdim=True)  # pixels left without a finite entry keep one, drawn at random
        keep = torch.randint(k, (b, 1, 1, *sp), generator=g)
        dropped &= ~(lonely & (torch.arange(k).reshape(1, k, *([1] * (len(sp) + 1))) == keep))
        lw = lw.masked_fill(dropped, float("-inf"))
        if self.normalised:
            lw = lw.log_softmax(1)
        lo, hi = self.logstd_range
        ls = lo + (hi - lo) * torch.rand(b, k if self.per_component else 1, 1, *([1] * len(sp)), generator=g)
        x_src = torch.randn(b, c, *sp, generator=g)
        x = x_src + self.q.x_offset * torch.randn(b, c, *sp, generator=g)
        grad_u = torch.randn(b, c, *sp, generator=g)
        return tuple(t.to(DTYPES[self.dtype]) for t in (means, lw, ls, x_src, x, grad_u))


@st.composite
def gm_cases(draw, max_b=3, max_k=5, max_c=4, max_side=4) -> GMCase:
    b, k, c, spatial = draw(shapes(max_b, max_k, max_c, max_side))
    logstd_edges = st.one_of(st.sampled_from([-10.0, 3.0]), st.floats(-10.0, 3.0))
    return GMCase(
        b, k, c, spatial,
        dtype=draw(st.sampled_from(list(DTYPES))),
        per_component=draw(st.booleans()),
        logstd_range=tuple(sorted((draw(logstd_edges), draw(logstd_edges)))),
        mean_scale=draw(st.floats(0.05, 4.0)),
        logweight_scale=draw(st.one_of(st.just(0.0), st.floats(0.0, 8.0))),
        drop=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9))),
        drop_components=draw(st.booleans()),
        normalised=draw(st.booleans()),
        q=draw(queries(b)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


@dataclass(frozen=True)
class DXCase:
    b: int
    n: int
    c: int
    spatial: tuple[int, ...]
    dtype: str
    grid_scale: float
    segment_size: float
    policy_shift: float
    mode: str
    q: Queries
    seed: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(grid, x_src, x, grad_u), all of the case's dtype."""
        g = torch.Generator().manual_seed(self.seed)
        grid = self.grid_scale * torch.randn(self.b, self.n, self.c, *self.spatial, generator=g)
        x_src = torch.randn(self.b, self.c, *self.spatial, generator=g)
        x = x_src + self.q.x_offset * torch.randn(x_src.shape, generator=g)
        grad_u = torch.randn(x_src.shape, generator=g)
        return tuple(t.to(DTYPES[self.dtype]) for t in (grid, x_src, x, grad_u))

    @property
    def policy_args(self) -> dict:
        return dict(segment_size=self.segment_size, shift=self.policy_shift, mode=self.mode)


@st.composite
def dx_cases(draw, max_b=3, max_n=5, max_c=4, max_side=4) -> DXCase:
    b, n, c, spatial = draw(shapes(max_b, max_n, max_c, max_side))
    return DXCase(
        b, n, c, spatial,
        dtype=draw(st.sampled_from(list(DTYPES))),
        grid_scale=draw(st.floats(0.05, 4.0)),
        segment_size=draw(st.one_of(st.sampled_from([1e-4, 1.0, 2.0]), st.floats(1e-4, 2.0))),
        policy_shift=draw(st.one_of(st.sampled_from([0.5, 1.0, 5.0]), st.floats(0.5, 5.0))),
        mode=draw(st.sampled_from(["grid", "polynomial"])),
        q=draw(queries(b)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ the rule


def _err(out: torch.Tensor, ref: torch.Tensor, scale: float) -> float:
    """max |out - ref| / max(max |ref|, scale): tests/conftest.py rel_err with a floor under its denominator."""
    if ref.numel() == 0:
        return 0.0
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref.double()).abs().max()) / max(float(ref.abs().max()), scale, 1e-30)


def agreement(out, ref64, ref32, kind: str, scale: float = 0.0, literal: bool = False) -> tuple[bool, str]:
    """(passes, description) of the module's rule for one output. ``ref32`` is already in out's dtype; ``scale``
    floors the errors' denominator; ``literal`` marks the "reference" backend (the float32 equations themselves)."""
    near = ref64.abs() > torch.finfo(out.dtype).max / 2  # may overflow: an infinity of the right sign will do
    wrong_inf = torch.isinf(out) & (out.double().sign() != ref64.sign())
    allowed = (near & ~torch.isnan(out) & ~wrong_inf) | (~torch.isfinite(ref32) if literal else False)
    n_bad = int((~torch.isfinite(out) & ~allowed).sum())
    keep = ~near & torch.isfinite(out) & (torch.isfinite(ref32) if literal else True)
    err, err32 = _err(out[keep], ref64[keep], scale), _err(ref32[~near], ref64[~near], scale)
    bound = float("inf") if err32 >= 1 else max(TOL[kind][out.dtype], 2 * err32 + FLOOR)
    ok = n_bad == 0 and err <= bound
    return ok, f"err {err:.3g} (fp32 reference {err32:.3g}, bound {bound:.3g}), {n_bad} non-finite"


def check_all(results: dict[str, tuple]) -> None:
    """Assert the rule for every output, {"<backend> <output>": (out, ref64, ref32, kind, scale)}; the message lists
    every failure."""
    failures = []
    for name, (out, ref64, ref32, kind, scale) in results.items():
        ok, what = agreement(out.detach(), ref64.detach(), ref32.detach(), kind, scale, literal=name.startswith("reference"))
        if not ok:
            failures.append(f"{name}: {what}")
    assert not failures, "; ".join(failures)


def velocity_floor(x, x_src, points, s_src, sigma, eps: float, n_terms: int) -> float:
    """The float64 reference's own rounding of a velocity (x - x0) / max(sigma, eps), x0 a combination of
    ``n_terms`` points x_src - s_src * points_k: 4 * 2^-52 * max_b (|x| + n_terms (|x_src| + s_src |points|)) / s'.
    Where the true velocity lies below it (1e-32 at sigma_src = 1e-38, which the reference rounds to 0) a relative
    error means nothing."""
    per_sample = lambda t: t.detach().double().abs().flatten(1).amax(1)  # noqa: E731
    size = per_sample(x) + n_terms * (per_sample(x_src) + s_src.double() * per_sample(points))
    return float((4 * 2.0**-52 * size / sigma.double().clamp(min=eps)).max())


# ------------------------------------------------------------------------------------------------ GM


GM_NAMES = ("means", "logweights", "logstds", "x_src", "x")


def _gm_reference(case: GMCase, tensors, dtype: torch.dtype):
    """Velocity, its gradients (GM_NAMES) and the rollout of the literal reference in ``dtype``, cast back to
    the case's dtype for float32 (the yardstick), kept in float64 otherwise."""
    means, lw, ls, x_src, x, grad_u = tensors
    s_src, sigma, s0, s1 = (s.to(dtype) for s in case.q.sigmas())
    leaves = [t.detach().to(dtype).requires_grad_() for t in (means, lw, ls, x_src, x)]
    m, lw_, ls_, xs, xq = leaves
    u = R.gm_velocity(xq, sigma, m, lw_, ls_, xs, s_src)
    grads = torch.autograd.grad(u, leaves, grad_u.to(dtype))
    with torch.no_grad():
        velocity = lambda y, s: R.gm_velocity(y, s, *(t.detach() for t in (m, lw_, ls_, xs)), s_src)  # noqa: E731
        x_end = R.rollout(velocity, x.to(dtype), s0, s1, case.q.total_substeps, case.q.shift)
    out = [u.detach(), *grads, x_end]
    return [t.to(means.dtype) for t in out] if dtype == torch.float32 else out


def _logweights_grad_scale(case: GMCase, tensors) -> float:
    """max |e_k| over the finite components, e_k = dL/dw_k the loss's derivative w.r.t. the posterior weight of
    component k: dL/dlogweights_k = w_k (e_k - sum_j w_j e_j) is formed to about eps * max |e| (float64 autograd of
    the reference included), so this is the floor of its errors' denominator. e_k = <g, u_k - x / s'>, u_k the
    velocity of component k alone (its posterior mean m_k does not depend on the other components)."""
    means, lw, ls, x_src, x, g = (t.double() for t in tensors)
    s_src, sigma, _, _ = (s.double() for s in case.q.sigmas())
    s = sigma.clamp(min=R.gm.EPS).reshape(-1, *([1] * (x.dim() - 1)))
    e = []
    for k in range(case.k):
        ls_k = ls[:, k : k + 1] if case.per_component else ls
        u_k = R.gm_velocity(x, sigma, means[:, k : k + 1], torch.zeros_like(lw[:, :1]), ls_k, x_src, s_src)
        e.append((g * (u_k - x / s)).sum(1))
    e = torch.stack(e, 1)  # (B, K, *S)
    return float(e[torch.isfinite(lw[:, :, 0])].abs().max())


def _gm_policy_outputs(case: GMCase, tensors, backend: str):
    """Velocity, gradients and rollout of the public policy on ``backend``."""
    means, lw, ls, x_src, x, grad_u = tensors
    s_src, sigma, s0, s1 = case.q.sigmas()
    leaves = [t.clone().requires_grad_() for t in (means, lw, ls, x_src, x)]
    pol = pk.GMFlowPolicy(*leaves[:4], s_src, backend=backend)
    u = pol.velocity(leaves[4], sigma)
    assert u.shape == x.shape and u.dtype == x.dtype
    grads = torch.autograd.grad(u, leaves, grad_u)
    x_end = pol.rollout(x, s0, s1, total_substeps=case.q.total_substeps, shift=case.q.shift)
    assert x_end.shape == x.shape and x_end.dtype == x.dtype
    return pol, [u, *grads, x_end]


def _gm_results(case: GMCase, backends: tuple[str, ...]) -> dict:
    tensors = case.tensors()
    ref64 = _gm_reference(case, tensors, torch.float64)
    ref32 = _gm_reference(case, tensors, torch.float32)
    kinds = ["velocity"] + ["grad"] * len(GM_NAMES) + ["rollout"]
    labels = ["velocity", *(f"d/d{n}" for n in GM_NAMES), "rollout"]
    s_src, sigma, s0, s1 = case.q.sigmas()
    floors = {
        "velocity": velocity_floor(tensors[4], tensors[3], tensors[0], s_src, sigma, R.gm.EPS, 1),
        "d/dlogweights": _logweights_grad_scale(case, tensors),
    }
    scales = [floors.get(label, 0.0) for label in labels]
    results = {}
    for backend in backends:
        pol, outs = _gm_policy_outputs(case, tensors, backend)
        rollout = "native rollout" if backend == "torch" and native.available() else "rollout"
        for label, kind, out, r64, r32, scale in zip(labels, kinds, outs, ref64, ref32, scales):
            results[f"{backend} {rollout if label == 'rollout' else label}"] = (out, r64, r32, kind, scale)
        if backend == "torch":  # the twin's own rollout: what runs on CPU without a C compiler (eager here)
            plan = RolloutPlan.build(s0, s1, case.q.total_substeps, case.q.shift)
            with mock.patch.dict(os.environ, {"PIFLOW_COMPILE": "0"}):
                x_end = gm_rollout_torch(pol._flat(tensors[4]), pol._tensors(), plan).reshape(tensors[4].shape)
            results["torch twin rollout"] = (x_end, ref64[-1], ref32[-1], "rollout", 0.0)
    return results


@CPU_SETTINGS
@given(case=gm_cases())
def test_gm_policy_agrees_with_float64_reference(case):
    check_all(_gm_results(case, ("torch", "reference")))


@TRITON_SETTINGS
@given(case=gm_cases(max_b=2, max_k=4, max_c=3, max_side=3))
def test_gm_policy_triton_agrees_with_float64_reference(case):
    check_all(_gm_results(case, ("triton",)))


# ------------------------------------------------------------------------------------------------ DX


DX_NAMES = ("grid", "x_src", "x")


def _dx_reference(case: DXCase, tensors, dtype: torch.dtype):
    grid, x_src, x, grad_u = tensors
    s_src, sigma, s0, s1 = (s.to(dtype) for s in case.q.sigmas())
    leaves = [t.detach().to(dtype).requires_grad_() for t in (grid, x_src, x)]
    gr, xs, xq = leaves
    u = R.dx_velocity(xq, sigma, gr, xs, s_src, **case.policy_args)
    grads = torch.autograd.grad(u, leaves, grad_u.to(dtype))
    with torch.no_grad():
        velocity = lambda y, s: R.dx_velocity(y, s, gr.detach(), xs.detach(), s_src, **case.policy_args)  # noqa: E731
        x_end = R.rollout(velocity, x.to(dtype), s0, s1, case.q.total_substeps, case.q.shift)
    out = [u.detach(), *grads, x_end]
    return [t.to(grid.dtype) for t in out] if dtype == torch.float32 else out


def _dx_results(case: DXCase, backends: tuple[str, ...]) -> dict:
    tensors = case.tensors()
    grid, x_src, x, grad_u = tensors
    s_src, sigma, s0, s1 = case.q.sigmas()
    ref64 = _dx_reference(case, tensors, torch.float64)
    ref32 = _dx_reference(case, tensors, torch.float32)
    floor = velocity_floor(x, x_src, grid, s_src, sigma, R.dx.EPS, case.n)
    kinds = ["velocity"] + ["grad"] * len(DX_NAMES) + ["rollout"]
    labels = ["velocity", *(f"d/d{n}" for n in DX_NAMES), "rollout"]
    results = {}
    for backend in backends:
        leaves = [t.clone().requires_grad_() for t in (grid, x_src, x)]
        pol = pk.DXPolicy(leaves[0], leaves[1], s_src, **case.policy_args, backend=backend)
        u = pol.velocity(leaves[2], sigma)
        assert u.shape == x.shape and u.dtype == x.dtype
        grads = torch.autograd.grad(u, leaves, grad_u)
        x_end = pol.rollout(x, s0, s1, total_substeps=case.q.total_substeps, shift=case.q.shift)
        for label, kind, out, r64, r32 in zip(labels, kinds, [u, *grads, x_end], ref64, ref32):
            results[f"{backend} {label}"] = (out, r64, r32, kind, floor if label == "velocity" else 0.0)
    return results


@CPU_SETTINGS
@given(case=dx_cases())
def test_dx_policy_agrees_with_float64_reference(case):
    check_all(_dx_results(case, ("torch", "reference")))


@TRITON_SETTINGS
@given(case=dx_cases(max_b=2, max_n=4, max_c=3, max_side=3))
def test_dx_policy_triton_agrees_with_float64_reference(case):
    check_all(_dx_results(case, ("triton",)))
