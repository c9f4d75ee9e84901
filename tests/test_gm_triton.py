"""GM Triton kernels (velocity forward/backward, whole rollout) against the float64 reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay tiny.
Every case draws fresh random inputs with batch-varying sigmas; every buffer the launchers allocate is
NaN-poisoned (``poisoned`` fixture), so an element a kernel never writes fails the comparison.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TOL, rel_err

import piflow_kernels as pk
from piflow_kernels import reference
from piflow_kernels.ops import gm_triton
from piflow_kernels.timesteps import substep_schedule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def poisoned(monkeypatch, poison):
    """Make every kernel output buffer start as NaN."""
    monkeypatch.setattr(gm_triton, "_alloc", lambda shape, dtype, device: poison(torch.empty(shape, dtype=dtype, device=device)))


def _strided(shape, dtype, gen, noncontig):
    """A random tensor of ``shape``; with ``noncontig`` a permuted view whose last axis has stride > 1."""
    if not noncontig:
        return torch.randn(shape, generator=gen).to(dtype)
    *lead, c, n = shape
    return torch.randn(*lead, n, c, generator=gen).to(dtype).transpose(-1, -2)


def make_inputs(b, k, c, length, *, per_component, neg_inf, dtype, noncontig=False, scale=1.0, seed=0):
    """Flat-layout GM policy and a query point: x, sigma, means, logweights, logstds, x_src, sigma_src."""
    gen = torch.Generator().manual_seed(seed)
    means = (scale * _strided((b, k, c, length), torch.float32, gen, noncontig)).to(dtype)
    lw = torch.randn(b, k, length, generator=gen)
    if neg_inf and k > 1:
        lw[:, 0] = float("-inf")  # a component dropped everywhere
        lw[0, -1, 0] = float("-inf")  # and another at a single pixel
    lw = lw.log_softmax(1).to(dtype)
    ls = (torch.randn(b, k if per_component else 1, generator=gen) * 0.3 - 0.7).to(dtype)
    x_src = _strided((b, c, length), dtype, gen, noncontig)
    x = (x_src.float() + 0.5 * torch.randn(b, c, length, generator=gen)).to(dtype)
    if noncontig:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    sigma_src = torch.rand(b, generator=gen) * 0.5 + 0.45
    sigma = sigma_src * (torch.rand(b, generator=gen) * 0.6 + 0.3)  # batch-varying, below sigma_src
    return x, sigma, means, lw, ls, x_src, sigma_src


def ref_velocity(x, sigma, means, lw, ls, x_src, sigma_src):
    """reference.gm_velocity in float64 on the flat layout (one spatial axis L)."""
    d = lambda t: t.double()  # noqa: E731
    return reference.gm_velocity(d(x), d(sigma), d(means), d(lw)[:, :, None], d(ls)[:, :, None, None], d(x_src), d(sigma_src))


# (B, K, C, L, std per component, -inf logweights, non-contiguous)
VELOCITY_CASES = [
    (2, 1, 1, 63, False, False, False),
    (2, 3, 5, 63, True, True, False),
    (3, 8, 16, 30, False, True, False),  # a 2x3x5 video latent, flattened
    (2, 3, 5, 63, False, False, True),
    (2, 40, 5, 9, True, True, False),  # K chunked with an online softmax
    (1, 3, 48, 6, False, False, False),  # C = 48: 4 threads per pixel, K chunked
    (2, 64, 64, 3, True, True, True),  # the corner of the supported range
]


def _vid(case):
    b, k, c, length, per, neg, nc = case
    std = "std-per-comp" if per else "std-per-sample"
    return f"B{b}-K{k}-C{c}-L{length}-{std}" + ("-neginf" if neg else "") + ("-noncontig" if nc else "")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", VELOCITY_CASES, ids=_vid)
def test_velocity_forward(case, dtype, poisoned):
    b, k, c, length, per, neg, nc = case
    dt = DTYPES[dtype]
    scale = 0.3 if c > 16 else 1.0  # keep the mixture posterior well conditioned at large C
    x, sigma, means, lw, ls, x_src, sigma_src = make_inputs(
        b, k, c, length, per_component=per, neg_inf=neg, dtype=dt, noncontig=nc, scale=scale, seed=len(_vid(case))
    )
    u = gm_triton.gm_velocity_triton(x, sigma, means, lw, ls, x_src, sigma_src)
    assert u.shape == (b, c, length) and u.dtype == dt
    assert rel_err(u, ref_velocity(x, sigma, means, lw, ls, x_src, sigma_src)) <= TOL["velocity"][dt]


def test_velocity_case_coverage():
    """The chunked cases above really take the chunked / shared-pixel paths of the kernels."""
    fwd = gm_triton._TILE_BUDGET_FWD
    assert gm_triton._gm_config(40, 5, 9, fwd)["NUM_K_CHUNKS"] > 1
    assert gm_triton._gm_config(3, 48, 6, gm_triton._TILE_BUDGET_BWD)["NUM_K_CHUNKS"] > 1
    assert gm_triton._gm_config(3, 48, 6, fwd)["BLOCK_L"] < 32  # threads share a pixel
    assert gm_triton._gm_config(32, 4, 1024, gm_triton._TILE_BUDGET_ROLLOUT)["NUM_K_CHUNKS"] == 1  # resident


def test_per_pixel_pointers_are_not_alignment_specialized():
    """Every pointer to a per-pixel tensor is in _UNALIGNED: one 16-byte-aligned per-pixel pointer lets
    Triton vectorize along L, and the compute layout then spreads pixels over threads (shuffles and
    barriers in the substep loop). Only per-sample (B,) vectors and the logstds partials may be aligned."""
    import inspect

    per_sample = {"p_sigma", "p_ssrc", "p_ls", "p_s0", "p_n", "p_h", "p_r0", "p_dls"}
    for kernel in (gm_triton._gm_velocity_fwd_kernel, gm_triton._gm_velocity_bwd_kernel, gm_triton._gm_rollout_kernel):
        pointers = {p for p in inspect.signature(kernel.fn).parameters if p.startswith("p_")}
        assert pointers - per_sample <= set(gm_triton._UNALIGNED), kernel.fn.__name__


def test_velocity_fp16_and_at_source(poisoned):
    x, sigma, means, lw, ls, x_src, sigma_src = make_inputs(2, 8, 5, 63, per_component=True, neg_inf=False, dtype=torch.float16)
    u = gm_triton.gm_velocity_triton(x, sigma, means, lw, ls, x_src, sigma_src)
    assert u.dtype == torch.float16
    assert rel_err(u, ref_velocity(x, sigma, means, lw, ls, x_src, sigma_src)) <= TOL["velocity"][torch.float16]
    # at the source point the velocity is the mixture mean of the component velocities
    x, sigma, means, lw, ls, x_src, sigma_src = make_inputs(2, 8, 5, 63, per_component=False, neg_inf=True, dtype=torch.float32)
    u_src = gm_triton.gm_velocity_triton(x_src, sigma_src, means, lw, ls, x_src, sigma_src)
    assert rel_err(u_src, (lw.double().softmax(1)[:, :, None] * means.double()).sum(1)) <= TOL["velocity"][torch.float32]


# (B, K, C, L, std per component, -inf logweights, non-contiguous)
GRAD_CASES = [
    (2, 3, 5, 63, False, False, False),
    (2, 3, 5, 63, True, True, True),
    (2, 8, 16, 30, True, False, False),
    (2, 40, 5, 9, True, True, False),  # chunked over K
    (1, 3, 48, 6, False, False, False),  # shared pixels, chunked over K
    (2, 1, 1, 20, False, False, False),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=_vid)
def test_velocity_backward(case, poisoned):
    b, k, c, length, per, neg, nc = case
    scale = 0.3 if c > 16 else 1.0
    x, sigma, means, lw, ls, x_src, sigma_src = make_inputs(
        b, k, c, length, per_component=per, neg_inf=neg, dtype=torch.float32, noncontig=nc, scale=scale, seed=k + c
    )
    grad_u = torch.randn(b, c, length)
    names = ["x", "means", "logweights", "logstds", "x_src"]
    leaves = [t.detach().clone().requires_grad_() for t in (x, means, lw, ls, x_src)]
    u = gm_triton.gm_velocity_triton(leaves[0], sigma, leaves[1], leaves[2], leaves[3], leaves[4], sigma_src)
    grads = torch.autograd.grad(u, leaves, grad_u)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, means, lw, ls, x_src)]
    u_ref = ref_velocity(ref_leaves[0], sigma, ref_leaves[1], ref_leaves[2], ref_leaves[3], ref_leaves[4], sigma_src)
    ref_grads = torch.autograd.grad(u_ref, ref_leaves, grad_u.double())
    for name, g, g_ref, leaf in zip(names, grads, ref_grads, leaves):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
        assert rel_err(g, g_ref) <= TOL["grad"][torch.float32], name


def test_velocity_backward_bf16_and_partial_grads(poisoned):
    x, sigma, means, lw, ls, x_src, sigma_src = make_inputs(2, 8, 5, 63, per_component=True, neg_inf=True, dtype=torch.bfloat16)
    means = means.requires_grad_()
    ls = ls.requires_grad_()
    u = gm_triton.gm_velocity_triton(x, sigma, means, lw, ls, x_src, sigma_src)  # no grad for x, x_src, lw
    grad_u = torch.randn(u.shape)
    g_means, g_ls = torch.autograd.grad(u, [means, ls], grad_u.to(u.dtype))
    assert g_means.dtype == torch.bfloat16 and g_ls.shape == ls.shape
    d_means = means.detach().double().requires_grad_()
    d_ls = ls.detach().double().requires_grad_()
    u_ref = ref_velocity(x, sigma, d_means, lw, d_ls, x_src, sigma_src)
    r_means, r_ls = torch.autograd.grad(u_ref, [d_means, d_ls], grad_u.double())
    assert rel_err(g_means, r_means) <= TOL["grad"][torch.bfloat16]
    assert rel_err(g_ls, r_ls) <= TOL["grad"][torch.bfloat16]


def _rollout_inputs(b, k, c, length, *, per_component, neg_inf, dtype, noncontig=False, scale=1.0, seed=0):
    x, _, means, lw, ls, x_src, sigma_src = make_inputs(
        b, k, c, length, per_component=per_component, neg_inf=neg_inf, dtype=dtype, noncontig=noncontig, scale=scale, seed=seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    sigma_start = sigma_src * (torch.rand(b, generator=gen) * 0.3 + 0.7)
    sigma_end = sigma_start * torch.rand(b, generator=gen) * 0.8  # batch-varying substep counts
    sigma_end[-1] = 0.0  # one sample integrates all the way to the data
    return x, means, lw, ls, x_src, sigma_src, sigma_start, sigma_end


def ref_rollout(x, means, lw, ls, x_src, sigma_src, sigma_start, sigma_end, total, shift):
    d = lambda t: t.double()  # noqa: E731
    vel = lambda xx, ss: ref_velocity(xx, ss, means, lw, ls, x_src, sigma_src)  # noqa: E731
    return reference.rollout(vel, d(x), d(sigma_start), d(sigma_end), total, shift)


# (B, K, C, L, std per component, -inf logweights, non-contiguous, shift, total substeps)
ROLLOUT_CASES = [
    (2, 1, 1, 63, False, False, False, 1.0, 12),
    (3, 3, 5, 63, True, True, False, 3.2, 12),
    (2, 8, 16, 30, False, False, True, 3.2, 8),  # 2x3x5 video latent, flattened
    (2, 40, 5, 9, True, True, False, 1.0, 8),  # chunks streamed at every substep
    (2, 3, 48, 6, False, False, False, 3.2, 8),  # shared pixels
    (3, 32, 4, 20, False, True, False, 3.2, 16),  # ImageNet policy shape (resident tile)
]


def _rid(case):
    *head, shift, total = case
    return f"{_vid(tuple(head))}-shift{shift}-T{total}"


@pytest.mark.parametrize("case", ROLLOUT_CASES, ids=_rid)
def test_rollout(case, poisoned):
    b, k, c, length, per, neg, nc, shift, total = case
    scale = 0.3 if c > 16 else 1.0
    x, means, lw, ls, x_src, sigma_src, s0, s1 = _rollout_inputs(
        b, k, c, length, per_component=per, neg_inf=neg, dtype=torch.float32, noncontig=nc, scale=scale, seed=k
    )
    n, h, r0 = substep_schedule(s0, s1, total, shift)
    assert len(set(n.tolist())) > 1  # samples really take different numbers of substeps
    x_end = gm_triton.gm_rollout_triton(x, means, lw, ls, x_src, sigma_src, s0, n, h, r0, shift)
    assert x_end.shape == x.shape and x_end.dtype == x.dtype
    ref = ref_rollout(x, means, lw, ls, x_src, sigma_src, s0, s1, total, shift)
    assert rel_err(x_end, ref) <= TOL["rollout"][torch.float32]


# (budget, num_warps) per kernel: the GPU check's sweep points at their extremes
LAUNCH_KNOBS = [
    {"fwd": (16, 1), "bwd": (16, 8), "rollout": (128, 1)},
    {"fwd": (128, 8), "bwd": (64, 2), "rollout": (64, 8)},
]


@pytest.mark.parametrize("knobs", LAUNCH_KNOBS, ids=["small-chunks", "large-chunks"])
@pytest.mark.parametrize("per_component", [False, True], ids=["std-per-sample", "std-per-comp"])
def test_launch_knobs_keep_results(knobs, per_component, monkeypatch, poisoned):
    """Every chunk budget and warp count the GPU check sweeps gives the reference's velocity, gradients and
    rollout (more pixels per program than L, chunked and resident tiles)."""
    for name, (budget, warps) in knobs.items():
        monkeypatch.setitem(gm_triton._LAUNCH, name, {"budget": budget, "num_warps": warps})
    b, k, c, length = 2, 32, 4, 150
    x, sigma, means, lw, ls, x_src, sigma_src = make_inputs(b, k, c, length, per_component=per_component, neg_inf=True,
                                                            dtype=torch.float32, seed=21)  # fmt: skip
    means.requires_grad_()
    lw.requires_grad_()
    u = gm_triton.gm_velocity_triton(x, sigma, means, lw, ls, x_src, sigma_src)
    grad_u = torch.randn(u.shape)
    grads = torch.autograd.grad(u, [means, lw], grad_u)
    d_leaves = [means.detach().double().requires_grad_(), lw.detach().double().requires_grad_()]
    u_ref = ref_velocity(x, sigma, d_leaves[0], d_leaves[1], ls, x_src, sigma_src)
    ref_grads = torch.autograd.grad(u_ref, d_leaves, grad_u.double())
    assert rel_err(u.detach(), u_ref.detach()) <= TOL["velocity"][torch.float32]
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) <= TOL["grad"][torch.float32]
    s0 = sigma_src * 0.9
    s1 = s0 * torch.tensor([0.5, 0.0])
    n, h, r0 = substep_schedule(s0, s1, 10, 3.2)
    x_end = gm_triton.gm_rollout_triton(x, means.detach(), lw.detach(), ls, x_src, sigma_src, s0, n, h, r0, 3.2)
    ref = ref_rollout(x, means.detach(), lw.detach(), ls, x_src, sigma_src, s0, s1, 10, 3.2)
    assert rel_err(x_end, ref) <= TOL["rollout"][torch.float32]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rollout_low_precision(dtype, poisoned):
    dt = DTYPES[dtype]
    x, means, lw, ls, x_src, sigma_src, s0, s1 = _rollout_inputs(2, 8, 5, 63, per_component=True, neg_inf=True, dtype=dt, seed=3)
    n, h, r0 = substep_schedule(s0, s1, 12, 3.2)
    x_end = gm_triton.gm_rollout_triton(x, means, lw, ls, x_src, sigma_src, s0, n, h, r0, 3.2)
    assert x_end.dtype == dt
    assert rel_err(x_end, ref_rollout(x, means, lw, ls, x_src, sigma_src, s0, s1, 12, 3.2)) <= TOL["rollout"][dt]


@pytest.mark.parametrize("spatial", [(7, 9), (2, 3, 5)], ids=["7x9", "2x3x5"])
def test_policy_triton_backend(spatial):
    """The public policy on backend="triton": 4D and 5D, channels-last x, velocity, grads and rollout."""
    b, k, c = 2, 3, 5
    gen = torch.Generator().manual_seed(11)
    means = torch.randn(b, k, c, *spatial, generator=gen)
    lw = torch.randn(b, k, 1, *spatial, generator=gen).log_softmax(1)
    ls = torch.randn(b, k, 1, *([1] * len(spatial)), generator=gen) * 0.3 - 0.7
    x_src = torch.randn(b, c, *spatial, generator=gen)
    sigma_src = torch.tensor([0.9, 0.7])
    x = torch.randn(b, *spatial, c, generator=gen).movedim(-1, 1)  # channels-last view
    pol = pk.GMFlowPolicy(means.requires_grad_(), lw, ls, x_src, sigma_src, backend="triton")
    d_means = means.detach().double().requires_grad_()
    ref_pol = pk.GMFlowPolicy(d_means, lw.double(), ls.double(), x_src.double(), sigma_src, backend="reference")
    sigma = torch.tensor([0.5, 0.35])
    u = pol.velocity(x, sigma)
    u_ref = ref_pol.velocity(x.double(), sigma)
    assert u.shape == x.shape and rel_err(u.detach(), u_ref.detach()) <= TOL["velocity"][torch.float32]
    g = torch.randn(u.shape, generator=gen)
    (g_means,) = torch.autograd.grad(u, [pol.means], g)
    (r_means,) = torch.autograd.grad(u_ref, [ref_pol.means], g.double())
    assert rel_err(g_means, r_means) <= TOL["grad"][torch.float32]
    x_end = pol.rollout(x_src, sigma_src, torch.tensor([0.2, 0.0]), total_substeps=10, shift=3.2)
    ref = ref_rollout(
        x_src.reshape(b, c, -1), means.detach().reshape(b, k, c, -1), lw.reshape(b, k, -1), ls.reshape(b, k),
        x_src.reshape(b, c, -1), sigma_src, sigma_src, torch.tensor([0.2, 0.0]), 10, 3.2,
    )  # fmt: skip
    assert x_end.shape == x_src.shape and rel_err(x_end.reshape(b, c, -1), ref) <= TOL["rollout"][torch.float32]


def test_fallback_outside_range_logs_once_and_is_correct(caplog, monkeypatch):
    monkeypatch.setattr(gm_triton, "_warned", set())
    k = gm_triton.MAX_COMPONENTS + 1
    x, sigma, means, lw, ls, x_src, sigma_src = make_inputs(1, k, 2, 5, per_component=False, neg_inf=False, dtype=torch.float32)
    means.requires_grad_()
    with caplog.at_level(logging.WARNING, logger=gm_triton.__name__):
        u = gm_triton.gm_velocity_triton(x, sigma, means, lw, ls, x_src, sigma_src)
        u2 = gm_triton.gm_velocity_triton(x, sigma, means, lw, ls, x_src, sigma_src)
        s1 = sigma * 0.5
        n, h, r0 = substep_schedule(sigma, s1, 6, 1.0)
        x_end = gm_triton.gm_rollout_triton(x, means.detach(), lw, ls, x_src, sigma_src, sigma, n, h, r0, 1.0)
    reasons = [r for r in caplog.records if "fall back" in r.getMessage()]
    assert len(reasons) == 1 and f"K={k}" in reasons[0].getMessage()
    assert rel_err(u, ref_velocity(x, sigma, means.detach(), lw, ls, x_src, sigma_src)) <= TOL["velocity"][torch.float32]
    assert torch.equal(u, u2)
    (g,) = torch.autograd.grad(u.sum(), [means])  # the fallback stays differentiable
    assert torch.isfinite(g).all()
    ref = ref_rollout(x, means.detach(), lw, ls, x_src, sigma_src, sigma, s1, 6, 1.0)
    assert rel_err(x_end, ref) <= TOL["rollout"][torch.float32]


def _op_args(b=1, k=3, c=2, length=5, per_component=True):
    return make_inputs(b, k, c, length, per_component=per_component, neg_inf=False, dtype=torch.float32, seed=5)


def test_fake_impls_shapes():
    """The fake (meta) kernels give the shapes and dtypes of the real ones, without running them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, sigma, means, lw, ls, x_src, sigma_src = _op_args()
    n, h, r0 = substep_schedule(sigma, sigma * 0.5, 4, 1.0)
    real_f = torch.ops.piflow.gm_velocity(x, sigma, means, lw, ls, x_src, sigma_src, True)
    real_n = torch.ops.piflow.gm_velocity(x, sigma, means, lw, ls, x_src, sigma_src, False)
    real_b = torch.ops.piflow.gm_velocity_bwd(real_f[0], x, sigma, means, lw, ls, x_src, sigma_src, *real_f[1:], True, False)
    real_r = torch.ops.piflow.gm_rollout(x, means, lw, ls, x_src, sigma_src, sigma, n, h, r0, 1.0)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, sigma, means, lw, ls, x_src, sigma_src, n, h, r0)]
        fx, fs, fm, fw, fl, fxs, fss, fn, fh, fr = fake
        fake_f = torch.ops.piflow.gm_velocity(fx, fs, fm, fw, fl, fxs, fss, True)
        fake_n = torch.ops.piflow.gm_velocity(fx, fs, fm, fw, fl, fxs, fss, False)
        fake_b = torch.ops.piflow.gm_velocity_bwd(fake_f[0], fx, fs, fm, fw, fl, fxs, fss, *fake_f[1:], True, False)
        fake_r = torch.ops.piflow.gm_rollout(fx, fm, fw, fl, fxs, fss, fs, fn, fh, fr, 1.0)
    reals, fakes = [*real_f, *real_n, *real_b, real_r], [*fake_f, *fake_n, *fake_b, fake_r]
    assert len(reals) == len(fakes) == 12
    for real, fk in zip(reals, fakes):
        assert tuple(fk.shape) == tuple(real.shape) and fk.dtype == real.dtype


@pytest.mark.parametrize("op,per_component", [("gm_velocity", False), ("gm_velocity", True), ("gm_rollout", False)])
def test_opcheck(op, per_component):
    """torch.library.opcheck: schema, fake impl, autograd registration, AOT dispatch."""
    x, sigma, means, lw, ls, x_src, sigma_src = _op_args(per_component=per_component)
    if op == "gm_velocity":
        leaves = [t.requires_grad_() for t in (means, lw, ls, x_src)]
        args = (x, sigma, *leaves[:3], leaves[3], sigma_src, True)
    else:
        n, h, r0 = substep_schedule(sigma, sigma * 0.5, 4, 3.2)
        args = (x, means, lw, ls, x_src, sigma_src, sigma, n, h, r0, 3.2)
    torch.library.opcheck(getattr(torch.ops.piflow, op).default, args)


def test_backward_statistics_saved_only_when_needed(monkeypatch):
    """The forward writes the backward's per-pixel statistics (C + 1 floats, C + 3 with per-component stds)
    only when a gradient can flow; the op called without them still differentiates (it recomputes them)."""
    x, sigma, means, lw, ls, x_src, sigma_src = make_inputs(2, 3, 5, 11, per_component=True, neg_inf=True, dtype=torch.float32)
    shapes = []

    def alloc(shape, dtype, device):
        shapes.append(tuple(shape))
        return torch.empty(shape, dtype=dtype, device=device)

    monkeypatch.setattr(gm_triton, "_alloc", alloc)
    with torch.no_grad():
        gm_triton.gm_velocity_triton(x, sigma, means.requires_grad_(), lw, ls, x_src, sigma_src)
    assert shapes == [(2, 5, 11), (0,), (0,)]
    shapes.clear()
    u = gm_triton.gm_velocity_triton(x, sigma, means, lw, ls, x_src, sigma_src)
    assert shapes == [(2, 5, 11), (2, 5, 11), (2, 3, 11)]
    grad_u = torch.randn(u.shape)
    (g_saved,) = torch.autograd.grad(u, [means], grad_u)
    u2, ybar, stats = torch.ops.piflow.gm_velocity(x, sigma, means, lw, ls, x_src, sigma_src, False)
    assert ybar.numel() == stats.numel() == 0
    (g_recomputed,) = torch.autograd.grad(u2, [means], grad_u)
    assert torch.equal(g_saved, g_recomputed)
    d_means = means.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(ref_velocity(x, sigma, d_means, lw, ls, x_src, sigma_src), [d_means], grad_u.double())
    assert rel_err(g_saved, g_ref) <= TOL["grad"][torch.float32]


def test_single_component_pixels_have_zero_logweight_gradient(poisoned):
    """Where every other component has logweight -inf the softmax is constant: dL/dlogweights is exactly 0
    there (the backward forms w_k (e_k - sum_j w_j e_j) without cancelling large terms)."""
    for per_component in (False, True):
        x, sigma, means, lw, ls, x_src, sigma_src = make_inputs(
            2, 4, 3, 17, per_component=per_component, neg_inf=False, dtype=torch.float32, seed=11
        )
        lw[:, 1:, :5] = float("-inf")
        lw.requires_grad_()
        u = gm_triton.gm_velocity_triton(x, sigma, means, lw, ls, x_src, sigma_src)
        (g,) = torch.autograd.grad(u, [lw], torch.randn(u.shape))
        assert torch.all(g[:, :, :5] == 0), per_component
        assert torch.isfinite(g).all() and g[:, :, 5:].abs().max() > 0


def test_compile_fullgraph_no_graph_breaks():
    """torch.compile(fullgraph=True) traces through the ops (velocity with its backward, rollout): any graph
    break raises. aot_eager keeps it cheap on CPU; the CUDA tests compile with inductor."""
    x, sigma, means, lw, ls, x_src, sigma_src = make_inputs(2, 3, 4, 12, per_component=False, neg_inf=True, dtype=torch.float32)
    s_end = sigma * 0.5
    means.requires_grad_()

    def step(x):
        u = gm_triton.gm_velocity_triton(x, sigma, means, lw, ls, x_src, sigma_src)
        n, h, r0 = substep_schedule(sigma, s_end, 8, 3.2)
        x_end = gm_triton.gm_rollout_triton(x - 0.01 * u.detach(), means.detach(), lw, ls, x_src, sigma_src, sigma, n, h, r0, 3.2)
        return u, x_end

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    u, x_end = compiled(x)
    u_eager, x_end_eager = step(x)
    assert rel_err(u.detach(), u_eager.detach()) <= 1e-6 and rel_err(x_end, x_end_eager) <= 1e-6
    (g,) = torch.autograd.grad(u.square().sum(), [means])
    (g_eager,) = torch.autograd.grad(u_eager.square().sum(), [means])
    assert rel_err(g, g_eager) <= 1e-6
