"""DX Triton kernels (velocity forward/backward, whole rollout) against the float64 reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small.
Every case draws fresh random inputs and batch-varying sigmas; the launcher tests write into
NaN-poisoned buffers so an element a kernel never writes fails.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TOL, capture_cuda_graph, compiled_step_error, rel_err

import piflow_kernels as pk
from piflow_kernels import reference
from piflow_kernels.ops import dx_triton
from piflow_kernels.ops.dx_torch import dx_velocity_torch
from piflow_kernels.timesteps import substep_schedule, unwarp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# with a GPU the kernels are compiled and need CUDA tensors; without one they run in the interpreter on CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = 3
SIGMA_SRC = [0.93, 0.61, 1.0]
SIGMA = [0.71, 0.27, 0.88]  # batch-varying, inside each sample's segment or not


def _policy_inputs(n, c, spatial, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randn(B, n, c, *spatial, generator=gen).to(DEVICE, dtype)
    x_src = torch.randn(B, c, *spatial, generator=gen).to(DEVICE, dtype)
    x = (x_src.float() + 0.3 * torch.randn(B, c, *spatial, generator=gen).to(DEVICE)).to(dtype)
    return grid, x_src, x


def _vec(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _ref_velocity(x, sigma, grid, x_src, sigma_src, segment_size, shift, mode):
    return reference.dx_velocity(
        x.double(), torch.tensor(sigma, dtype=torch.float64, device=x.device), grid.double(), x_src.double(),
        torch.tensor(sigma_src, dtype=torch.float64, device=x.device), segment_size, shift, mode,
    )  # fmt: skip


# (N, C, spatial, mode, policy shift, segment size, dtype)
VELOCITY_CASES = [
    (1, 5, (7, 9), "grid", 1.0, 1.0, torch.float32),
    (2, 1, (7, 9), "grid", 3.2, 0.5, torch.float32),
    (5, 16, (7, 9), "grid", 3.2, 0.5, torch.float32),
    (5, 5, (3, 4, 5), "grid", 1.0, 0.4, torch.float32),
    (1, 1, (3, 4, 5), "polynomial", 3.2, 1.0, torch.float32),
    (2, 5, (7, 9), "polynomial", 1.0, 1.0, torch.float32),
    (5, 16, (3, 4, 5), "polynomial", 3.2, 0.5, torch.float32),
    (5, 5, (7, 9), "grid", 3.2, 0.5, torch.bfloat16),
    (2, 16, (3, 4, 5), "polynomial", 1.0, 1.0, torch.bfloat16),
]


def _case_id(case):
    n, c, spatial, mode, shift, seg, dtype = case
    return f"N{n}-C{c}-{'x'.join(map(str, spatial))}-{mode}-shift{shift}-seg{seg}-{str(dtype).split('.')[-1]}"


@pytest.mark.parametrize("case", VELOCITY_CASES, ids=[_case_id(c) for c in VELOCITY_CASES])
def test_velocity_forward_backward_vs_reference(case):
    n, c, spatial, mode, shift, seg, dtype = case
    grid, x_src, x = _policy_inputs(n, c, spatial, dtype, seed=n * 100 + c)
    grid.requires_grad_(True)
    x_src.requires_grad_(True)
    x.requires_grad_(True)
    pol = pk.DXPolicy(grid, x_src, _vec(SIGMA_SRC), segment_size=seg, shift=shift, mode=mode, backend="triton")
    u = pol.velocity(x, _vec(SIGMA))
    assert u.dtype == dtype and u.shape == x.shape

    leaves = [t.detach().double().requires_grad_(True) for t in (x, grid, x_src)]
    u_ref = _ref_velocity(leaves[0], SIGMA, leaves[1], leaves[2], SIGMA_SRC, seg, shift, mode)
    assert rel_err(u, u_ref) <= TOL["velocity"][dtype]

    grad_u = torch.randn(u.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    grads = torch.autograd.grad(u, (x, grid, x_src), grad_u.to(dtype))
    grads_ref = torch.autograd.grad(u_ref, leaves, grad_u.double())
    for name, g, g_ref in zip(("x", "grid", "x_src"), grads, grads_ref):
        assert g.dtype == dtype, name
        assert rel_err(g, g_ref) <= TOL["grad"][dtype], name


def test_velocity_grad_only_for_grid():
    """Only the grid requires grad: the backward computes that gradient alone and it is right."""
    grid, x_src, x = _policy_inputs(5, 5, (7, 9), torch.float32, seed=3)
    grid.requires_grad_(True)
    pol = pk.DXPolicy(grid, x_src, _vec(SIGMA_SRC), segment_size=0.5, shift=3.2, backend="triton")
    u = pol.velocity(x, _vec(SIGMA))
    (g,) = torch.autograd.grad(u.square().sum(), grid)
    grid64 = grid.detach().double().requires_grad_(True)
    u_ref = _ref_velocity(x, SIGMA, grid64, x_src, SIGMA_SRC, 0.5, 3.2, "grid")
    (g_ref,) = torch.autograd.grad(u_ref.square().sum(), grid64)
    assert rel_err(g, g_ref) <= TOL["grad"][torch.float32]


def _flat_args(grid, x_src, sigma_src, segment_size, shift):
    r_src = unwarp(sigma_src, shift)
    r_dst = (r_src - segment_size).clamp(min=0.0)
    seg = (r_src - r_dst).clamp(min=1e-4)
    return r_src, r_dst, seg


@pytest.mark.parametrize("polynomial", [False, True], ids=["grid", "polynomial"])
def test_velocity_non_contiguous_and_poisoned(poison, polynomial):
    """Launchers on strided views (channels-last latents, every other grid point) into NaN buffers."""
    n, c, length, shift, segment_size = 5, 5, 63, 3.2, 0.5
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, length, c, generator=gen).to(DEVICE).transpose(1, 2)  # (B, C, L), stride_l = C
    x_src = torch.randn(B, length, c, generator=gen).to(DEVICE).transpose(1, 2)
    grid = torch.randn(B, 2 * n, c, length, generator=gen).to(DEVICE)[:, ::2]  # (B, N, C, L), stride_n doubled
    sigma = _vec(SIGMA).repeat_interleave(2)[::2]  # strided (B,) vector
    sigma_src = _vec(SIGMA_SRC)
    r_src, r_dst, seg = _flat_args(grid, x_src, sigma_src, segment_size, shift)
    assert not x.is_contiguous() and not grid.is_contiguous() and not sigma.is_contiguous()

    out = poison(torch.empty(B, c, length, device=DEVICE))
    dx_triton._dx_velocity_fwd(x, sigma, grid, x_src, sigma_src, r_src, r_dst, seg, shift, polynomial, out)
    mode = "polynomial" if polynomial else "grid"
    u_ref = _ref_velocity(x, SIGMA, grid, x_src, SIGMA_SRC, segment_size, shift, mode)
    assert rel_err(out, u_ref) <= TOL["velocity"][torch.float32]

    grad_u = torch.randn(B, length, c, generator=gen).to(DEVICE).transpose(1, 2)
    gx, gxs, gg = (poison(torch.empty(shape, device=DEVICE)) for shape in ((B, c, length), (B, c, length), (B, n, c, length)))
    dx_triton._dx_velocity_bwd(grad_u, sigma, sigma_src, r_src, r_dst, seg, shift, polynomial, n, gx, gxs, gg)
    leaves = [t.double().requires_grad_(True) for t in (x, grid, x_src)]
    u64 = _ref_velocity(leaves[0], SIGMA, leaves[1], leaves[2], SIGMA_SRC, segment_size, shift, mode)
    refs = torch.autograd.grad(u64, leaves, grad_u.double())
    for name, g, g_ref in zip(("x", "grid", "x_src"), (gx, gg, gxs), refs):
        assert rel_err(g, g_ref) <= TOL["grad"][torch.float32], name


# (N, C, spatial, mode, policy shift, rollout shift, dtype)
ROLLOUT_CASES = [
    (1, 5, (7, 9), "grid", 1.0, 1.0, torch.float32),
    (2, 16, (7, 9), "grid", 3.2, 3.2, torch.float32),
    (5, 1, (3, 4, 5), "grid", 3.2, 1.0, torch.float32),
    (5, 5, (7, 9), "polynomial", 1.0, 3.2, torch.float32),
    (2, 5, (3, 4, 5), "polynomial", 3.2, 3.2, torch.float32),
    (5, 16, (7, 9), "grid", 3.2, 3.2, torch.bfloat16),
]


def _rollout_id(case):
    n, c, spatial, mode, pshift, shift, dtype = case
    return f"N{n}-C{c}-{'x'.join(map(str, spatial))}-{mode}-pshift{pshift}-shift{shift}-{str(dtype).split('.')[-1]}"


@pytest.mark.parametrize("case", ROLLOUT_CASES, ids=[_rollout_id(c) for c in ROLLOUT_CASES])
def test_rollout_vs_reference(case, poison):
    """128 substeps per unit raw time with per-sample sigma_start/sigma_end (different substep counts)."""
    n, c, spatial, mode, pshift, shift, dtype = case
    segment_size, total = 0.6, 128
    grid, x_src, _ = _policy_inputs(n, c, spatial, dtype, seed=n * 10 + c + 1)
    sigma_start = _vec([0.93, 0.5, 1.0])
    sigma_end = _vec([0.35, 0.49, 0.0])  # about 60, 1 and 128 substeps
    pol = pk.DXPolicy(grid, x_src, _vec(SIGMA_SRC), segment_size=segment_size, shift=pshift, mode=mode,
                      backend="triton")  # fmt: skip
    x_end = pol.rollout(x_src, sigma_start, sigma_end, total_substeps=total, shift=shift)
    assert x_end.dtype == dtype and x_end.shape == x_src.shape

    grid64, xs64 = grid.double(), x_src.double()
    vel = lambda x, s: reference.dx_velocity(  # noqa: E731
        x, s, grid64, xs64, _vec(SIGMA_SRC, torch.float64), segment_size, pshift, mode
    )
    x_ref = reference.rollout(vel, xs64, sigma_start.double(), sigma_end.double(), total, shift)
    assert rel_err(x_end, x_ref) <= TOL["rollout"][dtype]

    # the same through the launcher, into a NaN-poisoned buffer
    gf, xsf = grid.reshape(B, n, c, -1), x_src.reshape(B, c, -1)
    ss = _vec(SIGMA_SRC)
    r_src, r_dst, seg = _flat_args(gf, xsf, ss, segment_size, pshift)
    n_sub, h, r0 = substep_schedule(sigma_start, sigma_end, total, shift)
    assert len(set(n_sub.tolist())) == 3
    out = poison(torch.empty(xsf.shape, dtype=dtype, device=DEVICE))
    dx_triton._dx_rollout(xsf, gf, xsf, ss, r_src, r_dst, seg, pshift, mode == "polynomial",
                          sigma_start, n_sub, h, r0, shift, out)  # fmt: skip
    assert rel_err(out, x_ref.reshape(out.shape)) <= TOL["rollout"][dtype]


def test_rollout_non_contiguous():
    gen = torch.Generator().manual_seed(5)
    n, c, length = 4, 5, 63
    x = torch.randn(B, length, c, generator=gen).to(DEVICE).transpose(1, 2)
    grid = torch.randn(B, n, length, c, generator=gen).to(DEVICE).transpose(2, 3)
    ss = _vec(SIGMA_SRC)
    r_src, r_dst, seg = _flat_args(grid, x, ss, 1.0, 3.2)
    s0, s1 = _vec([0.9, 0.8, 0.7]), _vec([0.1, 0.4, 0.69])
    n_sub, h, r0 = substep_schedule(s0, s1, 64, 3.2)
    out = dx_triton.dx_rollout_triton(x, grid, x, ss, r_src, r_dst, seg, 3.2, False, s0, n_sub, h, r0, 3.2)
    vel = lambda xx, s: reference.dx_velocity(xx, s, grid.double(), x.double(), ss.double(), 1.0, 3.2)  # noqa: E731
    x_ref = reference.rollout(vel, x.double(), s0.double(), s1.double(), 64, 3.2)
    assert rel_err(out, x_ref) <= TOL["rollout"][torch.float32]


def test_compile_fullgraph_forward_backward():
    """The op traces as one node: torch.compile(fullgraph=True) of a velocity + loss, forward and backward."""
    grid, x_src, x = _policy_inputs(3, 5, (7, 9), torch.float32, seed=21)
    grid = grid.reshape(B, 3, 5, -1).requires_grad_(True)
    xs, xf = x_src.reshape(B, 5, -1), x.reshape(B, 5, -1)
    ss, sig = _vec(SIGMA_SRC), _vec(SIGMA)
    r_src, r_dst, seg = _flat_args(grid, xs, ss, 0.5, 3.2)

    def loss_fn(g):
        return dx_triton.dx_velocity_triton(xf, sig, g, xs, ss, r_src, r_dst, seg, 3.2, False).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    (g_c,) = torch.autograd.grad(compiled(grid), grid)
    (g_e,) = torch.autograd.grad(dx_velocity_torch(xf, sig, grid, xs, ss, r_src, r_dst, seg, 3.2, False).square().sum(), grid)
    assert rel_err(g_c, g_e) <= TOL["grad"][torch.float32]


def test_opcheck_velocity():
    """Schema, fake (meta) implementation and autograd registration agree with the real kernel."""
    grid, x_src, x = _policy_inputs(2, 3, (4, 5), torch.float32, seed=9)
    grid = grid.reshape(B, 2, 3, -1).requires_grad_(True)
    ss = _vec(SIGMA_SRC)
    r_src, r_dst, seg = _flat_args(grid, x_src, ss, 1.0, 1.0)
    args = (x.reshape(B, 3, -1), _vec(SIGMA), grid, x_src.reshape(B, 3, -1), ss, r_src, r_dst, seg, 1.0, False)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(dx_triton._dx_velocity_op, args, test_utils=checks)


def test_too_many_points_falls_back_with_logged_reason(caplog, monkeypatch):
    monkeypatch.setattr(dx_triton, "_logged_reasons", set())
    n = dx_triton.MAX_POINTS + 1
    grid, x_src, x = _policy_inputs(n, 2, (2, 3), torch.float32, seed=13)
    pol = pk.DXPolicy(grid, x_src, _vec(SIGMA_SRC), segment_size=0.5, mode="grid", backend="triton")
    with caplog.at_level(logging.WARNING, logger="piflow_kernels.ops.dx_triton"):
        u = pol.velocity(x, _vec(SIGMA))
        pol.velocity(x, _vec(SIGMA))
    reasons = [r.getMessage() for r in caplog.records if f"N = {n} grid points" in r.getMessage()]
    assert len(reasons) == 1  # logged once, not per call
    u_ref = _ref_velocity(x, SIGMA, grid, x_src, SIGMA_SRC, 0.5, 1.0, "grid")
    assert rel_err(u, u_ref) <= TOL["velocity"][torch.float32]


# ------------------------------------------------------------------------------------------ CUDA only


def _needs_compiled_kernels():
    if dx_triton._interpreted():
        pytest.skip("kernels were loaded for the interpreter; run the CUDA tests with TRITON_INTERPRET=0")


def _cuda_policy(b, n, c, spatial, dtype=torch.float32, seed=0, shift=3.0, mode="grid"):
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randn(b, n, c, *spatial, generator=gen).to("cuda", dtype)
    x_src = torch.randn(b, c, *spatial, generator=gen).to("cuda", dtype)
    sigma_src = (0.6 + 0.4 * torch.rand(b, generator=gen)).cuda()
    pol = pk.DXPolicy(grid, x_src, sigma_src, segment_size=0.6, shift=shift, mode=mode, backend="triton")
    return pol, gen


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_training_shape_vs_reference(dtype):
    """B=512, N=10, C=4, 32x32: velocity, gradients and a 128-substep rollout against float64 on the GPU."""
    _needs_compiled_kernels()
    b, n, c, sp = 512, 10, 4, (32, 32)
    pol, gen = _cuda_policy(b, n, c, sp, dtype)
    grid = pol.grid.detach().requires_grad_(True)
    pol = pol._replace(grid=grid)
    x = (pol.x_src.float() + 0.3 * torch.randn(pol.x_src.shape, generator=gen).cuda()).to(dtype)
    sigma = (0.05 + 0.9 * torch.rand(b, generator=gen)).cuda()
    u = pol.velocity(x, sigma)
    grad_u = torch.randn(u.shape, generator=gen).cuda()
    (g,) = torch.autograd.grad(u, grid, grad_u.to(dtype))
    g64 = grid.detach().double().requires_grad_(True)
    u64 = reference.dx_velocity(x.double(), sigma.double(), g64, pol.x_src.double(), pol.sigma_src.double(), 0.6, 3.0)
    (g_ref,) = torch.autograd.grad(u64, g64, grad_u.double())
    assert rel_err(u, u64) <= TOL["velocity"][dtype]
    assert rel_err(g, g_ref) <= TOL["grad"][dtype]

    s_end = pol.sigma_src * torch.rand(b, generator=gen).cuda() * 0.8
    x_end = pol.rollout(pol.x_src, pol.sigma_src, s_end, total_substeps=128, shift=3.0)
    xs64 = pol.x_src.double()
    vel = lambda xx, s: reference.dx_velocity(xx, s, g64.detach(), xs64, pol.sigma_src.double(), 0.6, 3.0)  # noqa: E731
    x_ref = reference.rollout(vel, xs64, pol.sigma_src.double(), s_end.double(), 128, 3.0)
    assert rel_err(x_end, x_ref) <= TOL["rollout"][dtype]


@pytest.mark.cuda
def test_cuda_compile_fullgraph_inductor():
    """A sampling step (velocity, then a rollout) under torch.compile(fullgraph=True) with inductor."""
    _needs_compiled_kernels()
    pol, gen = _cuda_policy(4, 6, 16, (64, 64))
    x = torch.randn(pol.x_src.shape, generator=gen).cuda()
    sigma, s_end = torch.full((4,), 0.7, device="cuda"), torch.full((4,), 0.2, device="cuda")
    assert compiled_step_error(pol, x, sigma, s_end) <= TOL["rollout"][torch.float32]


@pytest.mark.cuda
def test_cuda_graph_capture_rollout():
    """The rollout reads substep counts on the device only, so it records into a CUDA graph and replays."""
    _needs_compiled_kernels()
    pol, gen = _cuda_policy(8, 5, 16, (32, 32))
    x_in = torch.randn(pol.x_src.shape, generator=gen).cuda()
    s0 = (0.5 + 0.5 * torch.rand(8, generator=gen)).cuda()
    s1 = s0 * 0.3
    graph, x_out = capture_cuda_graph(lambda: pol.rollout(x_in, s0, s1, total_substeps=64, shift=3.0))
    x_in.copy_(torch.randn(x_in.shape, generator=gen).cuda())
    graph.replay()
    expected = pol.rollout(x_in, s0, s1, total_substeps=64, shift=3.0)
    assert rel_err(x_out, expected) <= 1e-6


@pytest.mark.cuda
def test_cuda_velocity_backward_saves_no_policy_sized_tensor():
    """Forward + backward peak memory stays near the gradient itself (nothing (B, N, C, L) is saved)."""
    _needs_compiled_kernels()
    pol, gen = _cuda_policy(256, 10, 4, (32, 32))
    grid = pol.grid.detach().requires_grad_(True)
    pol = pol._replace(grid=grid)
    x = torch.randn(pol.x_src.shape, generator=gen).cuda()
    sigma = torch.full((256,), 0.5, device="cuda")
    grad_u = torch.randn(x.shape, generator=gen).cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    (g,) = torch.autograd.grad(pol.velocity(x, sigma), grid, grad_u)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= g.numel() * 4 + 2 * x.numel() * 4 + 2**20
