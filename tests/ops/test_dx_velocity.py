"""DX velocity: ``reference/dx.py::dx_velocity`` against its twins ``ops/dx/*::dx_velocity_<impl>``.

Implementations by name (``op_cases.implementation``): the torch twin, the Triton kernels (in the interpreter
on CPU) and the literal reference in float32. Fresh random inputs and batch-varying sigmas against the float64
reference, forward and backward, grid and polynomial modes; Triton outputs and gradients NaN-poisoned
(``poisoned``). CUDA cases at the end (``cuda`` marker; run with TRITON_INTERPRET=0).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, rel_err

import piflow_kernels as pk
from piflow_kernels.ops.dx import triton_velocity
from piflow_kernels.ops.dx.torch_twin import dx_velocity_torch
from piflow_kernels.ops.dx.triton_velocity import dx_velocity_triton
from piflow_kernels.ops.records import DXTensors

from . import op_cases as cases
from .op_cases import DEVICE, DX_SIGMA, DX_SIGMA_SRC, device_for, dx_flat, dx_segment, implementation, ref_dx_velocity, vec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IMPLS = cases.IMPLEMENTATIONS["dx_velocity"]
BACKENDS = ("torch", "triton", "reference")
B = cases.DX_B

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


def _flat_inputs(n, c, spatial, dtype, seed, device):
    """cases.dx_inputs flattened to (B, N, C, L) and (B, C, L)."""
    return [t.reshape(*t.shape[: t.dim() - len(spatial)], -1) for t in cases.dx_inputs(n, c, spatial, dtype, seed, device)]


# ------------------------------------------------------------------------------------------ accuracy, every implementation


@pytest.mark.parametrize("case", VELOCITY_CASES, ids=lambda c: cases.dx_case_id(c, "shift", "seg"))
@pytest.mark.parametrize("impl", IMPLS)
def test_dx_velocity_matches_reference(impl, case, poisoned):
    n, c, spatial, mode, shift, seg, dtype = case
    dev = device_for(impl)
    grid, x_src, x = (t.requires_grad_(True) for t in _flat_inputs(n, c, spatial, dtype, n * 100 + c, dev))
    policy = dx_flat(grid, x_src, vec(DX_SIGMA_SRC, device=dev), seg, shift, mode)
    u = implementation("dx_velocity", impl)(x, vec(DX_SIGMA, device=dev), policy)
    assert u.dtype == dtype and u.shape == x.shape

    leaves = [t.detach().double().requires_grad_(True) for t in (x, grid, x_src)]
    u_ref = ref_dx_velocity(leaves[0], DX_SIGMA, leaves[1], leaves[2], DX_SIGMA_SRC, seg, shift, mode)
    assert rel_err(u, u_ref) <= TOL["velocity"][dtype]

    grad_u = torch.randn(u.shape, generator=torch.Generator().manual_seed(7)).to(dev)
    grads = torch.autograd.grad(u, (x, grid, x_src), grad_u.to(dtype))
    grads_ref = torch.autograd.grad(u_ref, leaves, grad_u.double())
    for name, g, g_ref in zip(("x", "grid", "x_src"), grads, grads_ref):
        assert g.dtype == dtype, name
        assert rel_err(g, g_ref) <= TOL["grad"][dtype], name


EDGE_SIGMA_SRCS = (0.0, 1e-6, 1e-4, 1e-2, 1.0)
EDGE_RATIOS = (1.0, 0.5, 1e-3, 0.0)  # sigma / sigma_src


@pytest.mark.parametrize("ratio", EDGE_RATIOS, ids=lambda r: f"ratio{r:g}")
@pytest.mark.parametrize("sigma_src", EDGE_SIGMA_SRCS, ids=lambda s: f"ssrc{s:g}")
@pytest.mark.parametrize("mode", ["grid", "polynomial"])
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
def test_dx_velocity_exact_at_tiny_sigma_src(impl, mode, sigma_src, ratio, poisoned):
    """sigma_src in [0, 1], sigma in [0, sigma_src], x within sigma_src of x_src (where the policy is read): the
    fast paths hold the float64 answer to the plain tolerance, forward and gradients. They form
    (x - x_src) - (sum_n w_n - 1) x_src + s_src sum_n w_n grid_n; x0 = (sum_n w_n) x_src - ... first, as the
    literal float32 reference does, loses its rounding divided by sigma (the reference is off by 2e-2 to 5e-2
    at sigma_src = 1e-6, the earlier twin by up to 6e-2 in polynomial mode)."""
    dev = device_for(impl)
    gen = torch.Generator().manual_seed(int(1e3 * EDGE_SIGMA_SRCS.index(sigma_src) + 10 * EDGE_RATIOS.index(ratio)))
    b, n, c, length = 3, 5, 6, 7
    grid, x_src = torch.randn(b, n, c, length, generator=gen), torch.randn(b, c, length, generator=gen)
    x = x_src + max(sigma_src, 1e-3) * torch.randn(b, c, length, generator=gen)
    s_src = torch.full((b,), sigma_src)
    sigma = s_src * ratio
    leaves = [t.to(dev).requires_grad_(True) for t in (x, grid, x_src)]
    u = implementation("dx_velocity", impl)(leaves[0], sigma.to(dev), dx_flat(*leaves[1:], s_src.to(dev), 0.5, 3.0, mode))
    leaves64 = [t.double().requires_grad_(True) for t in (x, grid, x_src)]
    u64 = ref_dx_velocity(leaves64[0], sigma, leaves64[1], leaves64[2], s_src, 0.5, 3.0, mode)
    assert rel_err(u, u64) <= TOL["velocity"][torch.float32]
    grad_u = torch.randn(u.shape, generator=gen)
    grads = torch.autograd.grad(u, leaves, grad_u.to(dev))
    grads64 = torch.autograd.grad(u64, leaves64, grad_u.double())
    for name, g, g64 in zip(("x", "grid", "x_src"), grads, grads64):
        if float(g64.abs().max()) > 0:
            assert rel_err(g, g64) <= TOL["grad"][torch.float32], name
        else:  # sigma_src = 0: the grid does not move x0
            assert float(g.abs().max()) == 0.0, name


@pytest.mark.parametrize("impl", IMPLS)
def test_dx_velocity_grad_only_for_grid(impl, poisoned):
    """Only the grid requires grad: the backward computes that gradient alone and it is right."""
    dev = device_for(impl)
    grid, x_src, x = _flat_inputs(5, 5, (7, 9), torch.float32, 3, dev)
    grid.requires_grad_(True)
    policy = dx_flat(grid, x_src, vec(DX_SIGMA_SRC, device=dev), 0.5, 3.2)
    u = implementation("dx_velocity", impl)(x, vec(DX_SIGMA, device=dev), policy)
    (g,) = torch.autograd.grad(u.square().sum(), grid)
    grid64 = grid.detach().double().requires_grad_(True)
    u_ref = ref_dx_velocity(x, DX_SIGMA, grid64, x_src, DX_SIGMA_SRC, 0.5, 3.2, "grid")
    (g_ref,) = torch.autograd.grad(u_ref.square().sum(), grid64)
    assert rel_err(g, g_ref) <= TOL["grad"][torch.float32]


# ------------------------------------------------------------------------------------------ through the public policy


@cases.parametrize_dx_policies
def test_dx_velocity_policy_matches_reference(backend, case, mode, shift):
    """The public policy's velocity and its gradient w.r.t. the grid, per-sample sigmas."""
    grid, x_src, s_src, g = cases.dx_nd_inputs(*case, seed=5, device=device_for(backend))
    seg_size = 0.4
    pol = pk.DXPolicy(grid, x_src, s_src, segment_size=seg_size, shift=shift, mode=mode, backend=backend)
    x = torch.randn_like(x_src)
    # inside the policy's domain: sigma in (0, sigma_src]
    sigma = (torch.as_tensor(s_src).cpu().float() * (torch.rand(case[0], generator=g) * 0.9 + 0.05)).to(x.device)
    u_ref = ref_dx_velocity(x, sigma, grid, x_src, s_src, seg_size, shift, mode)
    assert rel_err(pol.velocity(x, sigma), u_ref) <= TOL["velocity"][torch.float32]
    # gradients w.r.t. the grid
    grid_l = grid.clone().requires_grad_(True)
    u = pk.DXPolicy(grid_l, x_src, s_src, seg_size, shift, mode, backend=backend).velocity(x, sigma)
    (gg,) = torch.autograd.grad(u.square().sum(), grid_l)
    grid64 = grid.double().requires_grad_(True)
    u64 = ref_dx_velocity(x, sigma, grid64, x_src, s_src, seg_size, shift, mode)
    (gr,) = torch.autograd.grad(u64.square().sum(), grid64)
    assert rel_err(gg, gr) <= TOL["grad"][torch.float32]


# ------------------------------------------------------------------------------------------ the Triton kernels


@pytest.mark.parametrize("polynomial", [False, True], ids=["grid", "polynomial"])
def test_dx_velocity_triton_launchers_non_contiguous_and_poisoned(poison, polynomial):
    """Launchers on strided views (channels-last latents, every other grid point) into NaN buffers."""
    n, c, length, shift, segment_size = 5, 5, 63, 3.2, 0.5
    mode = "polynomial" if polynomial else "grid"
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, length, c, generator=gen).to(DEVICE).transpose(1, 2)  # (B, C, L), stride_l = C
    x_src = torch.randn(B, length, c, generator=gen).to(DEVICE).transpose(1, 2)
    grid = torch.randn(B, 2 * n, c, length, generator=gen).to(DEVICE)[:, ::2]  # (B, N, C, L), stride_n doubled
    sigma = vec(DX_SIGMA).repeat_interleave(2)[::2]  # strided (B,) vector
    sigma_src = vec(DX_SIGMA_SRC)
    segment = dx_segment(sigma_src, segment_size, shift, mode)
    assert not x.is_contiguous() and not grid.is_contiguous() and not sigma.is_contiguous()

    out = poison(torch.empty(B, c, length, device=DEVICE))
    triton_velocity._dx_velocity_fwd(x, sigma, DXTensors(grid, x_src, sigma_src, segment), out)
    u_ref = ref_dx_velocity(x, DX_SIGMA, grid, x_src, DX_SIGMA_SRC, segment_size, shift, mode)
    assert rel_err(out, u_ref) <= TOL["velocity"][torch.float32]

    grad_u = torch.randn(B, length, c, generator=gen).to(DEVICE).transpose(1, 2)
    gx, gxs, gg = (poison(torch.empty(shape, device=DEVICE)) for shape in ((B, c, length), (B, c, length), (B, n, c, length)))
    triton_velocity._dx_velocity_bwd(grad_u, sigma, sigma_src, segment, n, gx, gxs, gg)
    leaves = [t.double().requires_grad_(True) for t in (x, grid, x_src)]
    u64 = ref_dx_velocity(leaves[0], DX_SIGMA, leaves[1], leaves[2], DX_SIGMA_SRC, segment_size, shift, mode)
    refs = torch.autograd.grad(u64, leaves, grad_u.double())
    for name, g, g_ref in zip(("x", "grid", "x_src"), (gx, gg, gxs), refs):
        assert rel_err(g, g_ref) <= TOL["grad"][torch.float32], name


def test_dx_velocity_triton_compile_fullgraph_forward_backward():
    """The op traces as one node: torch.compile(fullgraph=True) of a velocity + loss, forward and backward."""
    grid, xs, xf = _flat_inputs(3, 5, (7, 9), torch.float32, 21, DEVICE)
    grid.requires_grad_(True)
    ss, sig = vec(DX_SIGMA_SRC), vec(DX_SIGMA)
    segment = dx_segment(ss, 0.5, 3.2)

    def loss_fn(g):
        return dx_velocity_triton(xf, sig, DXTensors(g, xs, ss, segment)).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    (g_c,) = torch.autograd.grad(compiled(grid), grid)
    (g_e,) = torch.autograd.grad(dx_velocity_torch(xf, sig, DXTensors(grid, xs, ss, segment)).square().sum(), grid)
    assert rel_err(g_c, g_e) <= TOL["grad"][torch.float32]


def test_dx_velocity_triton_opcheck():
    """Schema, fake (meta) implementation and autograd registration agree with the real kernel."""
    grid, x_src, x = _flat_inputs(2, 3, (4, 5), torch.float32, 9, DEVICE)
    grid.requires_grad_(True)
    ss = vec(DX_SIGMA_SRC)
    r_src, r_dst, seg, shift, polynomial = dx_segment(ss, 1.0, 1.0).kernel_args
    args = (x, vec(DX_SIGMA), grid, x_src, ss, r_src, r_dst, seg, shift, polynomial)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(triton_velocity._dx_velocity_op, args, test_utils=checks)


# ------------------------------------------------------------------------------------------ CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dx_velocity_cuda_training_shape_vs_reference(dtype):
    """B=512, N=10, C=4, 32x32: velocity and grid gradients against float64 on the GPU."""
    b, n, c, sp = 512, 10, 4, (32, 32)
    pol, gen = cases.dx_cuda_policy(b, n, c, sp, dtype)
    grid = pol.grid.detach().requires_grad_(True)
    pol = pol._replace(grid=grid)
    x = (pol.x_src.float() + 0.3 * torch.randn(pol.x_src.shape, generator=gen).cuda()).to(dtype)
    sigma = pol.sigma_src * (0.05 + 0.9 * torch.rand(b, generator=gen)).cuda()  # in the domain: sigma <= sigma_src
    u = pol.velocity(x, sigma)
    grad_u = torch.randn(u.shape, generator=gen).cuda()
    (g,) = torch.autograd.grad(u, grid, grad_u.to(dtype))
    g64 = grid.detach().double().requires_grad_(True)
    u64 = ref_dx_velocity(x, sigma, g64, pol.x_src, pol.sigma_src, 0.6, 3.0)
    (g_ref,) = torch.autograd.grad(u64, g64, grad_u.double())
    assert rel_err(u, u64) <= TOL["velocity"][dtype]
    assert rel_err(g, g_ref) <= TOL["grad"][dtype]


@pytest.mark.cuda
def test_dx_velocity_cuda_backward_saves_no_policy_sized_tensor():
    """Forward + backward peak memory stays near the gradient itself (nothing (B, N, C, L) is saved)."""
    pol, gen = cases.dx_cuda_policy(256, 10, 4, (32, 32))
    grid = pol.grid.detach().requires_grad_(True)
    pol = pol._replace(grid=grid)
    x = torch.randn(pol.x_src.shape, generator=gen).cuda()
    sigma = torch.full((256,), 0.5, device="cuda")
    grad_u = torch.randn(x.shape, generator=gen).cuda()
    peak = cases.peak_bytes(lambda: torch.autograd.grad(pol.velocity(x, sigma), grid, grad_u))
    assert peak <= grid.numel() * 4 + 2 * x.numel() * 4 + 2**20
