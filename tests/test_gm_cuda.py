"""GM Triton kernels on a CUDA GPU: large shapes against float64, torch.compile, CUDA graphs, launches, memory.

Skipped without a GPU (``cuda`` marker). conftest defaults TRITON_INTERPRET=1 for the CPU suite, so run
these with TRITON_INTERPRET=0 to get compiled kernels:

    TRITON_INTERPRET=0 python -m pytest tests/test_gm_cuda.py -m cuda
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, capture_cuda_graph, compiled_step_error, rel_err

import piflow_kernels as pk
from piflow_kernels import reference
from piflow_kernels.ops import gm_triton

pytestmark = pytest.mark.cuda


def _needs_compiled_kernels():
    if gm_triton._INTERPRET:
        pytest.skip("kernels were loaded for the interpreter; run the CUDA tests with TRITON_INTERPRET=0")


def _cuda_policy(b, k, c, spatial, dtype=torch.float32, per_component=False, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    means = (scale * torch.randn(b, k, c, *spatial, generator=gen)).to("cuda", dtype)
    lw = torch.randn(b, k, 1, *spatial, generator=gen)
    if k > 1:
        lw[:, 0] = float("-inf")  # one dropped component
    lw = lw.log_softmax(1).to("cuda", dtype)
    ls = (torch.randn(b, k if per_component else 1, 1, *([1] * len(spatial)), generator=gen) * 0.3 - 0.7).to("cuda", dtype)
    x_src = torch.randn(b, c, *spatial, generator=gen).to("cuda", dtype)
    sigma_src = (0.5 + 0.45 * torch.rand(b, generator=gen)).cuda()
    return pk.GMFlowPolicy(means, lw, ls, x_src, sigma_src, backend="triton"), gen


def _ref_velocity(pol, x, sigma, means=None):
    d = lambda t: t.double()  # noqa: E731
    means = pol.means if means is None else means
    return reference.gm_velocity(d(x), d(sigma), d(means), d(pol.logweights), d(pol.logstds), d(pol.x_src), d(pol.sigma_src))


# (B, K, C, spatial, std per component, scale of the means)
CASES = [
    (64, 32, 4, (32, 32), False, 1.0),  # ImageNet training policy
    (1, 8, 16, (64, 64), True, 1.0),  # FLUX-like
    (2, 5, 16, (3, 16, 16), False, 1.0),  # video latent (5D)
    (4, 40, 48, (8, 8), True, 0.3),  # chunked over K, threads sharing a pixel
]


def _cid(case):
    b, k, c, sp, per, _ = case
    return f"B{b}-K{k}-C{c}-{'x'.join(map(str, sp))}-{'std-per-comp' if per else 'std-per-sample'}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_cuda_velocity_and_grads_vs_reference(case, dtype):
    _needs_compiled_kernels()
    b, k, c, sp, per, scale = case
    pol, gen = _cuda_policy(b, k, c, sp, dtype, per, scale=scale)
    leaves = [t.detach().clone().requires_grad_() for t in (pol.means, pol.logweights, pol.logstds, pol.x_src)]
    pol_g = pol._replace(means=leaves[0], logweights=leaves[1], logstds=leaves[2], x_src=leaves[3])
    x = (pol.x_src.float() + 0.5 * torch.randn(pol.x_src.shape, generator=gen).cuda()).to(dtype).requires_grad_()
    sigma = pol.sigma_src * (0.3 + 0.6 * torch.rand(b, generator=gen).cuda())
    u = pol_g.velocity(x, sigma)
    grad_u = torch.randn(u.shape, generator=gen).cuda()
    grads = torch.autograd.grad(u, [*leaves, x], grad_u.to(dtype))

    leaves64 = [t.detach().double().requires_grad_() for t in (*leaves, x)]
    m64, lw64, ls64, xs64, x64 = leaves64
    u64 = reference.gm_velocity(x64, sigma.double(), m64, lw64, ls64, xs64, pol.sigma_src.double())
    grads64 = torch.autograd.grad(u64, leaves64, grad_u.double())
    assert u.dtype == dtype and rel_err(u.detach(), u64.detach()) <= TOL["velocity"][dtype]
    for name, g, g64 in zip(["means", "logweights", "logstds", "x_src", "x"], grads, grads64):
        assert rel_err(g, g64) <= TOL["grad"][dtype], name


# (B, K, C, spatial, std per component, scale, total substeps, shift)
ROLLOUT_CASES = [
    (64, 32, 4, (32, 32), False, 1.0, 128, 1.0),
    (1, 8, 16, (64, 64), True, 1.0, 32, 3.2),
    (2, 5, 16, (3, 16, 16), False, 1.0, 32, 3.2),
    (2, 64, 64, (4, 4), True, 0.3, 32, 3.2),  # streamed chunks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ROLLOUT_CASES, ids=lambda c: f"{_cid(c[:6])}-T{c[6]}-shift{c[7]}")
def test_cuda_rollout_vs_reference(case, dtype):
    _needs_compiled_kernels()
    b, k, c, sp, per, scale, total, shift = case
    pol, gen = _cuda_policy(b, k, c, sp, dtype, per, scale=scale, seed=1)
    s0 = pol.sigma_src
    s1 = s0 * torch.rand(b, generator=gen).cuda() * 0.8  # batch-varying substep counts
    x_end = pol.rollout(pol.x_src, s0, s1, total_substeps=total, shift=shift)
    vel = lambda xx, s: _ref_velocity(pol, xx, s)  # noqa: E731
    x_ref = reference.rollout(vel, pol.x_src.double(), s0.double(), s1.double(), total, shift)
    assert x_end.dtype == dtype and rel_err(x_end, x_ref) <= TOL["rollout"][dtype]


def test_cuda_compile_fullgraph():
    """A sampling step through the public policy (velocity, then a rollout) under torch.compile(fullgraph=True)."""
    _needs_compiled_kernels()
    pol, gen = _cuda_policy(4, 8, 16, (32, 32))
    x = torch.randn(pol.x_src.shape, generator=gen).cuda()
    sigma, s_end = torch.full((4,), 0.7, device="cuda"), torch.full((4,), 0.2, device="cuda")
    assert compiled_step_error(pol, x, sigma, s_end) <= TOL["rollout"][torch.float32]

    means = pol.means.detach().clone().requires_grad_()
    pol_g = pol._replace(means=means)
    loss_fn = torch.compile(lambda x: pol_g.velocity(x, sigma).square().mean(), fullgraph=True)
    (g,) = torch.autograd.grad(loss_fn(x), [means])
    (g_eager,) = torch.autograd.grad(pol_g.velocity(x, sigma).square().mean(), [means])
    assert rel_err(g, g_eager) <= TOL["grad"][torch.float32]


def test_cuda_graph_capture_rollout():
    """The rollout reads substep counts on the device only, so it records into a CUDA graph and replays."""
    _needs_compiled_kernels()
    pol, gen = _cuda_policy(8, 32, 4, (32, 32))
    x_in = torch.randn(pol.x_src.shape, generator=gen).cuda()
    s0 = (0.5 + 0.5 * torch.rand(8, generator=gen)).cuda()
    s1 = s0 * 0.3
    graph, x_out = capture_cuda_graph(lambda: pol.rollout(x_in, s0, s1, total_substeps=128, shift=3.0))
    x_in.copy_(torch.randn(x_in.shape, generator=gen).cuda())
    s1.copy_(s0 * 0.1)  # a new target sigma: the substep counts change on the device
    graph.replay()
    expected = pol.rollout(x_in, s0, s1, total_substeps=128, shift=3.0)
    assert rel_err(x_out, expected) <= 1e-6


def test_cuda_flux_rollout_is_one_launch():
    """FLUX-1024 step (B=1, K=8, C=16, 128x128, 32 substeps): exactly one rollout kernel launch."""
    _needs_compiled_kernels()
    from torch.profiler import ProfilerActivity, profile

    pol, gen = _cuda_policy(1, 8, 16, (128, 128))
    s0, s1 = torch.full((1,), 1.0, device="cuda"), torch.full((1,), 0.75, device="cuda")
    pol.rollout(pol.x_src, s0, s1, total_substeps=128, shift=3.0)  # compile outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pol.rollout(pol.x_src, s0, s1, total_substeps=128, shift=3.0)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert sum("_gm_rollout_kernel" in n for n in names) == 1, names


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_cuda_velocity_fwd_bwd_peak_memory():
    """Forward + backward at a training-like shape: at most 1/4 of autograd through the reference and 1/2 of
    autograd through the torch twin (the kernels save inputs only; the gradients themselves dominate)."""
    _needs_compiled_kernels()
    pol, gen = _cuda_policy(64, 32, 4, (32, 32))
    means = pol.means.detach().clone().requires_grad_()
    lw = pol.logweights.detach().clone().requires_grad_()
    x = torch.randn(pol.x_src.shape, generator=gen).cuda()
    sigma = torch.full((64,), 0.5, device="cuda")
    grad_u = torch.randn(x.shape, generator=gen).cuda()

    def run(backend):
        p = pk.GMFlowPolicy(means, lw, pol.logstds, pol.x_src, pol.sigma_src, backend=backend)
        torch.autograd.grad(p.velocity(x, sigma), [means, lw], grad_u)

    run("triton")  # compile outside the measurement
    triton_peak = _peak_bytes(lambda: run("triton"))
    torch_peak = _peak_bytes(lambda: run("torch"))
    reference_peak = _peak_bytes(lambda: run("reference"))
    assert triton_peak <= 0.25 * reference_peak, (triton_peak, reference_peak)
    assert triton_peak <= 0.5 * torch_peak, (triton_peak, torch_peak)
