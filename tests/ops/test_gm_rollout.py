"""GM rollout: ``reference/rollout.py::rollout`` of ``reference/gm.py::gm_velocity`` against its twins
``ops/gm/*::gm_rollout_<impl>``.

Implementations by name (``op_cases.implementation``): the torch twin (one substep per call; eager here,
the compiled substep has its own test), the fused native CPU loop, the one-launch Triton kernel (in the
interpreter on CPU) and the literal reference in float32. Fresh random inputs, odd pixel counts (the native
loop's blocks of 16 or 8 pixels with a partial last one), batch-varying substep counts with one sample run to
sigma 0, -inf logweights, one std per sample and per component; Triton outputs NaN-poisoned (``poisoned``). CUDA
cases at the end (``cuda`` marker; run with TRITON_INTERPRET=0 to get compiled kernels).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, rel_err

import piflow_kernels as pk
from piflow_kernels import reference as R
from piflow_kernels.ops.gm import native, torch_twin, triton_common, triton_rollout
from piflow_kernels.ops.gm.oracle import gm_rollout_reference
from piflow_kernels.ops.gm.triton_rollout import gm_rollout_triton
from piflow_kernels.ops.records import GMTensors, RolloutPlan

from . import op_cases as cases
from .op_cases import (
    device_for,
    gm_inputs,
    gm_rollout_inputs,
    implementation,
    make_gm,
    ref_gm_rollout,
    ref_gm_rollout_flat,
    ref_gm_velocity_flat,
)

IMPLS = cases.IMPLEMENTATIONS["gm_rollout"]
needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler for the native CPU rollout")

# (B, K, C, L, std per component, -inf logweights, non-contiguous, shift, total substeps)
ROLLOUT_CASES = [
    (2, 1, 1, 63, False, False, False, 1.0, 12),
    (3, 3, 5, 63, True, True, False, 3.2, 12),
    (2, 8, 16, 30, False, False, True, 3.2, 8),  # 2x3x5 video latent, flattened
    (2, 8, 16, 30, False, False, False, 3.2, 8),
    (2, 40, 5, 9, True, True, False, 1.0, 8),  # chunks streamed at every substep
    (2, 3, 48, 6, False, False, False, 3.2, 8),  # shared pixels
    (3, 32, 4, 20, False, True, False, 3.2, 16),  # ImageNet policy shape (resident tile)
    (2, 1, 1, 20, False, False, False, 1.0, 16),  # one native block and a partial one
    (3, 32, 4, 37, False, True, False, 3.2, 16),
    (3, 64, 3, 17, False, True, False, 1.0, 12),
]


def rollout_case_id(case):
    *head, shift, total = case
    return f"{cases.gm_case_id(tuple(head))}-shift{shift}-T{total}"


@pytest.fixture
def eager_twin(monkeypatch):
    """The torch twin without torch.compile: each (K, C, L) would compile once (seconds on CPU); the compiled
    substep is checked against the eager one and the reference in test_gm_rollout_compiled_matches_eager."""
    monkeypatch.setenv("PIFLOW_COMPILE", "0")


# ------------------------------------------------------------------------------------------ accuracy, every implementation


@pytest.mark.parametrize("case", ROLLOUT_CASES, ids=rollout_case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_gm_rollout_matches_reference(impl, case, poisoned, eager_twin):
    b, k, c, length, per, neg, nc, shift, total = case
    fn = implementation("gm_rollout", impl)
    scale = 0.3 if c > 16 else 1.0
    x, policy, s0, s1 = gm_rollout_inputs(b, k, c, length, per_component=per, neg_inf=neg, dtype=torch.float32, noncontig=nc,
                                          scale=scale, seed=b + k + c + length, device=device_for(impl))  # fmt: skip
    plan = RolloutPlan.build(s0, s1, total, shift)
    assert len(set(plan.n_substeps.tolist())) > 1  # samples really take different numbers of substeps
    x_end = fn(x, policy, plan)
    assert x_end.shape == x.shape and x_end.dtype == x.dtype
    assert rel_err(x_end, ref_gm_rollout_flat(x, policy, s0, s1, total, shift)) <= TOL["rollout"][torch.float32]
    moved = (x_end - x).abs().amax(dim=(1, 2))
    assert bool((moved > 0).all())  # every sample was integrated (s_end < s_start for all)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gm_rollout_low_precision(impl, dtype, poisoned, eager_twin):
    dt = cases.DTYPES[dtype]
    fn = implementation("gm_rollout", impl)
    x, policy, s0, s1 = gm_rollout_inputs(2, 8, 5, 63, per_component=True, neg_inf=True, dtype=dt, seed=3,
                                          device=device_for(impl))  # fmt: skip
    x_end = fn(x, policy, RolloutPlan.build(s0, s1, 12, 3.2))
    assert x_end.dtype == dt
    assert rel_err(x_end, ref_gm_rollout_flat(x, policy, s0, s1, 12, 3.2)) <= TOL["rollout"][dt]


@pytest.mark.parametrize("per_component", [False, True], ids=["std-per-sample", "std-per-comp"])
def test_gm_rollout_compiled_matches_eager(monkeypatch, per_component):
    """The torch.compile'd substep of the torch twin equals the eager one and the reference (each branch of the
    centred substep compiles on its own: var is (B, 1) or (B, K))."""
    twin = implementation("gm_rollout", "torch")
    means, lw, ls, x_src, s_src = make_gm(3, 8, 4, (5, 7), per_component=per_component, seed=2)
    policy, x = cases.gm_flat(means, lw, ls, x_src, s_src), x_src.reshape(3, 4, -1)
    plan = RolloutPlan.build(s_src, torch.zeros(3), 64, 2.0)
    monkeypatch.setenv("PIFLOW_COMPILE", "0")
    eager = twin(x, policy, plan)
    monkeypatch.setenv("PIFLOW_COMPILE", "1")
    compiled = twin(x, policy, plan)
    assert torch_twin.compile_enabled()
    ref = ref_gm_rollout(x_src, s_src, 0.0, 64, 2.0, means, lw, ls, x_src, s_src)
    assert rel_err(compiled, ref.reshape(x.shape)) <= TOL["rollout"][torch.float32]
    assert rel_err(compiled, eager) <= 1e-5
    # a second shape with another batch size reuses the compilation of the first
    means2, lw2, ls2, x2, s2 = make_gm(2, 5, 3, (4, 9), per_component=per_component, seed=3)
    out2 = twin(
        x2.reshape(2, 3, -1), cases.gm_flat(means2, lw2, ls2, x2, s2), RolloutPlan.build(s2, torch.full((2,), 0.1), 16, 1.0)
    )
    ref2 = ref_gm_rollout(x2, s2, 0.1, 16, 1.0, means2, lw2, ls2, x2, s2)
    assert rel_err(out2, ref2.reshape(out2.shape)) <= TOL["rollout"][torch.float32]


# ------------------------------------------------------------------------------------------ the torch twin at the edges

EDGE_SIGMA_SRCS = (1.0, 1e-2, 1e-4, 1e-6)
EDGE_STDS = {"std-per-sample": False, "std-per-comp": True}


@pytest.mark.parametrize("end", [0.5, 0.0], ids=["to-half", "to-0"])
@pytest.mark.parametrize("sigma_src", EDGE_SIGMA_SRCS, ids=lambda s: f"ssrc{s:g}")
@pytest.mark.parametrize("std", EDGE_STDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("impl", ["torch", "native", "triton"])
def test_gm_rollout_centred_at_small_sigma_src(impl, dtype, std, sigma_src, end, poisoned, eager_twin):
    """The x_src-centred rollouts (the torch twin's substep, the native loop, the Triton kernel) from sigma_src (and
    0.9, 0.8, 0.6 of it) to end * that, 128 substeps per unit raw time, K = 3, C = 5, 7x9, logstds uniform in
    [-10, 3], fp32 / bf16 / fp16 inputs, against the float64 reference rollout on the same inputs: within
    max(2 * err32, TOL) (err32: the literal float32 reference's own error, tests/ops/test_gm_velocity_edges.py's
    rule) and within TOL itself. At sigma_src 1e-6 with per-component stds err32 is 0.2 to 0.3 here; the twin's
    former x0-space substep was 0.3 to 0.6 off (x - x0 is O(sigma) out of O(1) terms, mu_k . nu ~1e12) and the
    native loop, then centred on the prior mixture mean, 2e-3 in fp32; both centred on x_src stay near 1e-7. The
    Triton kernel (centred on x_src too) runs the few-substep cases here, sigma_src <= 1e-2 (in the interpreter a
    128-substep rollout of this shape takes a minute); its many-substep rollouts are held to the float64 reference
    in test_gm_velocity_edges.py."""
    if impl == "triton" and sigma_src > 1e-2:
        pytest.skip("128 interpreted substeps: covered at another shape by test_gm_velocity_edges.py")
    fn = implementation("gm_rollout", impl)
    dt = cases.DTYPES[dtype]
    x, _, policy = cases.gm_edge_inputs(4, 3, 5, 63, sigma_src, 1.0, per_component=EDGE_STDS[std],
                                        seed=71 + EDGE_SIGMA_SRCS.index(sigma_src))  # fmt: skip
    x = x.to(dt)
    policy = policy._replace(**{n: getattr(policy, n).to(dt) for n in ("means", "logweights", "logstds", "x_src")})
    s0 = policy.sigma_src * torch.tensor([1.0, 0.9, 0.8, 0.6])
    s1 = s0 * end
    plan = RolloutPlan.build(s0, s1, 128, 1.0)
    ref64 = ref_gm_rollout_flat(x, policy, s0, s1, 128, 1.0)
    own = rel_err(gm_rollout_reference(x, policy, plan), ref64)
    x_end = fn(x, policy, plan)
    assert x_end.dtype == dt and x_end.shape == x.shape
    err = rel_err(x_end, ref64)
    tol = TOL["rollout"][dt]
    assert err <= max(2.0 * own, tol), f"{err:.2e} > max(2 * {own:.2e}, {tol:g})"
    assert err <= tol, f"{err:.2e} > {tol:g} (float32 reference: {own:.2e})"


@pytest.mark.parametrize(
    "sigma_src, sigma",
    [(0.3, 0.3), (0.3, 0.15), (1.0, 0.5), (0.6, 0.05), (1e-6, 1e-6), (1e-6, 0.0), (0.1, 0.9), (0.5, 0.7)],
    ids=["source", "midway", "from-1", "near-data", "tiny-source", "tiny-to-0", "out-of-domain-clamped-d", "out-of-domain"],
)
@pytest.mark.parametrize("std", EDGE_STDS)
def test_gm_substep_centred_algebra_is_exact(std, sigma_src, sigma):
    """The centred substep on its precomputed source terms, run in float64, moves x by u (s_next - s) with u the
    literal float64 reference velocity (and gm_velocity_centred's, whose clamps and out-of-domain semantics it
    keeps: sigma > sigma_src, d_k clamped at GM_EPS); a sample whose step is over (s_next == s) stays put."""
    b, k, c, length = 3, 11, 6, 7
    x, _, policy = cases.gm_edge_inputs(b, k, c, length, sigma_src, 1.0, per_component=EDGE_STDS[std], seed=81,
                                        logstd_range=(-3.0, 3.0))  # fmt: skip
    x = x.double()
    s = torch.full((b,), sigma, dtype=torch.float64)
    s_next = s - torch.tensor([1e-3, 0.25, 0.0], dtype=torch.float64) * max(sigma, 1e-6)  # the last sample is over
    moved = torch_twin._gm_substep(x, s, s_next, *torch_twin.rollout_source(policy, torch.float64))
    u64 = ref_gm_velocity_flat(x, s, policy)
    centred = torch_twin.gm_velocity_centred(x, s, GMTensors(*(t.double() for t in policy)), torch.float64)
    u = (moved[:2] - x[:2]) / (s_next - s)[:2, None, None]
    assert rel_err(u, u64[:2]) <= 1e-9
    assert rel_err(u, centred[:2]) <= 1e-12
    assert torch.equal(moved[2], x[2])


# ------------------------------------------------------------------------------------------ through the public policy


@pytest.mark.parametrize("shift", [1.0, 3.2], ids=lambda s: f"shift{s}")
@pytest.mark.parametrize("case", cases.GM_ND_CASES[:5], ids=cases.gm_nd_case_id)
@pytest.mark.parametrize("backend", ["torch", "reference"])  # 128 substeps: too long for the Triton interpreter
def test_gm_rollout_policy_matches_reference(backend, case, shift):
    b, k, c, sp = case
    means, lw, ls, x_src, s_src = make_gm(b, k, c, sp, seed=1)
    s_end = s_src * torch.rand(b)  # batch-varying ends: different substep counts per sample
    pol = pk.GMFlowPolicy(means, lw, ls, x_src, s_src, backend=backend)
    out = pol.rollout(x_src, s_src, s_end, total_substeps=128, shift=shift)
    ref = ref_gm_rollout(x_src, s_src, s_end, 128, shift, means, lw, ls, x_src, s_src)
    assert out.shape == x_src.shape
    assert rel_err(out, ref) <= TOL["rollout"][torch.float32]


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_gm_rollout_backends_agree(backend):
    dev = device_for(backend)
    means, lw, ls, x_src, s_src = (t.to(dev) for t in make_gm(2, 4, 3, (5, 5), seed=6))
    pol = pk.GMFlowPolicy(means, lw, ls, x_src, s_src, backend=backend)
    assert pol.backend == backend
    out = pol.rollout(x_src, s_src, 0.05, total_substeps=32, shift=1.5)
    ref = ref_gm_rollout(x_src, s_src, 0.05, 32, 1.5, means, lw, ls, x_src, s_src)
    assert rel_err(out, ref) <= TOL["rollout"][torch.float32]


@pytest.mark.parametrize("spatial", [(7, 9), (2, 3, 5)], ids=["7x9", "2x3x5"])
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_gm_rollout_policy_4d_and_5d(backend, spatial):
    """The public policy's rollout on 4D and 5D latents."""
    dev = device_for(backend)
    means, lw, ls, x_src, sigma_src = (t.to(dev) for t in make_gm(2, 3, 5, spatial, seed=11))
    sigma_end = torch.tensor([0.2, 0.0], device=dev)
    pol = pk.GMFlowPolicy(means, lw, ls, x_src, sigma_src, backend=backend)
    x_end = pol.rollout(x_src, sigma_src, sigma_end, total_substeps=10, shift=3.2)
    ref = ref_gm_rollout(x_src, sigma_src, sigma_end, 10, 3.2, means, lw, ls, x_src, sigma_src)
    assert x_end.shape == x_src.shape and rel_err(x_end, ref) <= TOL["rollout"][torch.float32]


# ------------------------------------------------------------------------------------------ the native CPU loop


@needs_native
def test_gm_rollout_native_same_bits_on_any_thread_count():
    x, policy, _, _ = gm_rollout_inputs(3, 16, 4, 700, per_component=True, neg_inf=False, dtype=torch.float32, seed=9)
    plan = RolloutPlan.build(torch.full((3,), 0.9), torch.tensor([0.3, 0.1, 0.0]), 32, 3.2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.gm_rollout_native(x, policy, plan)
        torch.set_num_threads(max(2, threads))
        many = native.gm_rollout_native(x, policy, plan)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_native
def test_gm_rollout_native_build_is_cached(monkeypatch, tmp_path):
    """The second process (here: a reset state) loads the cached build without running the compiler."""
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.available()
    assert len(list(tmp_path.glob("gm_native_*.so"))) == 1

    def no_compiler(*a, **kw):
        raise AssertionError("the compiler ran again")

    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    monkeypatch.setattr(native, "_state", {})
    assert native.available()


# ------------------------------------------------------------------------------------------ the Triton kernel


def test_gm_rollout_triton_policy_tile_stays_resident():
    """The ImageNet policy shape keeps its whole (K, C) tile in registers over the substeps."""
    assert triton_common.launch_config(32, 4, 1024, triton_common.TILE_BUDGET_ROLLOUT)["NUM_K_CHUNKS"] == 1


def test_gm_rollout_triton_per_pixel_pointers_are_not_alignment_specialized():
    cases.assert_per_pixel_pointers_unaligned(triton_rollout._gm_rollout_kernel)


@pytest.mark.parametrize("knobs", cases.LAUNCH_KNOBS, ids=cases.LAUNCH_KNOB_IDS)
@pytest.mark.parametrize("per_component", [False, True], ids=["std-per-sample", "std-per-comp"])
def test_gm_rollout_triton_launch_knobs_keep_results(knobs, per_component, monkeypatch, poisoned):
    """Every chunk budget and warp count the GPU check sweeps gives the reference's rollout."""
    cases.set_launch_knobs(monkeypatch, knobs, ("rollout",))
    x, _, policy = gm_inputs(2, 32, 4, 150, per_component=per_component, neg_inf=True, dtype=torch.float32, seed=21,
                             device=device_for("triton"))  # fmt: skip
    s0 = policy.sigma_src * 0.9
    s1 = s0 * torch.tensor([0.5, 0.0], device=x.device)
    x_end = gm_rollout_triton(x, policy, RolloutPlan.build(s0, s1, 10, 3.2))
    assert rel_err(x_end, ref_gm_rollout_flat(x, policy, s0, s1, 10, 3.2)) <= TOL["rollout"][torch.float32]


def _op_inputs():
    x, sigma, policy = gm_inputs(1, 3, 2, 5, per_component=True, neg_inf=False, dtype=torch.float32, seed=5,
                                 device=device_for("triton"))  # fmt: skip
    return x, policy, RolloutPlan.build(sigma, sigma * 0.5, 4, 3.2)


def test_gm_rollout_triton_fake_impl_shape():
    """The fake (meta) kernel gives the shape and dtype of the real one, without running it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, policy, plan = _op_inputs()
    real = torch.ops.piflow.gm_rollout(x, *policy, *plan.kernel_args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in (x, *policy, *plan.kernel_args)]
        fake = torch.ops.piflow.gm_rollout(*fake_args)
    assert tuple(fake.shape) == tuple(real.shape) and fake.dtype == real.dtype


def test_gm_rollout_triton_opcheck():
    """torch.library.opcheck: schema, fake impl, autograd registration, AOT dispatch."""
    x, policy, plan = _op_inputs()
    torch.library.opcheck(torch.ops.piflow.gm_rollout.default, (x, *policy, *plan.kernel_args))


def test_gm_rollout_triton_compile_fullgraph_no_graph_breaks():
    """torch.compile(fullgraph=True) traces the rollout (plan included) as one opaque node: any graph break
    raises. aot_eager keeps it cheap on CPU; the CUDA tests compile with inductor."""
    x, sigma, policy = gm_inputs(2, 3, 4, 12, per_component=False, neg_inf=True, dtype=torch.float32, device=device_for("triton"))
    s_end = sigma * 0.5
    step = lambda x: gm_rollout_triton(x, policy, RolloutPlan.build(sigma, s_end, 8, 3.2))  # noqa: E731
    x_end = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(x_end, step(x)) <= 1e-6


# ------------------------------------------------------------------------------------------ CUDA only

# (B, K, C, spatial, std per component, scale, total substeps, shift)
CUDA_CASES = [
    (64, 32, 4, (32, 32), False, 1.0, 128, 1.0),
    (1, 8, 16, (64, 64), True, 1.0, 32, 3.2),
    (2, 5, 16, (3, 16, 16), False, 1.0, 32, 3.2),
    (2, 64, 64, (4, 4), True, 0.3, 32, 3.2),  # streamed chunks
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"{cases.gm_cuda_case_id(c)}-T{c[6]}-shift{c[7]}")
def test_gm_rollout_cuda_vs_reference(case, dtype):
    b, k, c, sp, per, scale, total, shift = case
    pol, gen = cases.gm_cuda_policy(b, k, c, sp, dtype, per, scale=scale, seed=1)
    s0 = pol.sigma_src
    s1 = s0 * torch.rand(b, generator=gen).cuda() * 0.8  # batch-varying substep counts
    x_end = pol.rollout(pol.x_src, s0, s1, total_substeps=total, shift=shift)
    vel = lambda xx, s: cases.ref_gm_velocity_of(pol, xx, s)  # noqa: E731
    x_ref = R.rollout(vel, pol.x_src.double(), s0.double(), s1.double(), total, shift)
    assert x_end.dtype == dtype and rel_err(x_end, x_ref) <= TOL["rollout"][dtype]


@pytest.mark.cuda
def test_gm_rollout_cuda_compiled_sampling_step():
    """A sampling step through the public policy (velocity, then a rollout) under torch.compile(fullgraph=True)."""
    assert cases.cuda_compiled_step_error(*cases.gm_cuda_policy(4, 8, 16, (32, 32))) <= TOL["rollout"][torch.float32]


@pytest.mark.cuda
def test_gm_rollout_cuda_graph_capture():
    """The rollout reads substep counts on the device only, so it records into a CUDA graph and replays."""
    assert cases.cuda_graph_replay_error(*cases.gm_cuda_policy(8, 32, 4, (32, 32)), 128, new_target=True) <= 1e-6


@pytest.mark.cuda
def test_gm_rollout_cuda_flux_step_is_one_launch():
    """FLUX-1024 step (B=1, K=8, C=16, 128x128, 32 substeps): exactly one rollout kernel launch."""
    from torch.profiler import ProfilerActivity, profile

    pol, gen = cases.gm_cuda_policy(1, 8, 16, (128, 128))
    s0, s1 = torch.full((1,), 1.0, device="cuda"), torch.full((1,), 0.75, device="cuda")
    pol.rollout(pol.x_src, s0, s1, total_substeps=128, shift=3.0)  # compile outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pol.rollout(pol.x_src, s0, s1, total_substeps=128, shift=3.0)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert sum("_gm_rollout_kernel" in n for n in names) == 1, names
