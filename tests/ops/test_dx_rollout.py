"""DX rollout: ``reference/rollout.py::rollout`` of ``reference/dx.py::dx_velocity`` against its twins
``ops/dx/*::dx_rollout_<impl>``.

Implementations by name (``op_cases.implementation``): the torch twin (closed form), the one-launch Triton
kernel (in the interpreter on CPU) and the literal reference in float32. 128 substeps per unit raw time with
per-sample sigma_start / sigma_end (different substep counts, one sample run to sigma 0); Triton outputs
NaN-poisoned (``poisoned``). CUDA cases at the end (``cuda`` marker; run with TRITON_INTERPRET=0).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, rel_err

import piflow_kernels as pk
from piflow_kernels.ops.records import DXTensors, RolloutPlan

from . import op_cases as cases
from .op_cases import DX_SIGMA_SRC, device_for, dx_flat, dx_segment, implementation, ref_dx_rollout, vec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IMPLS = cases.IMPLEMENTATIONS["dx_rollout"]
BACKENDS = ("torch", "triton", "reference")

# (N, C, spatial, mode, policy shift, rollout shift, dtype)
ROLLOUT_CASES = [
    (1, 5, (7, 9), "grid", 1.0, 1.0, torch.float32),
    (2, 16, (7, 9), "grid", 3.2, 3.2, torch.float32),
    (5, 1, (3, 4, 5), "grid", 3.2, 1.0, torch.float32),
    (5, 5, (7, 9), "polynomial", 1.0, 3.2, torch.float32),
    (2, 5, (3, 4, 5), "polynomial", 3.2, 3.2, torch.float32),
    (5, 16, (7, 9), "grid", 3.2, 3.2, torch.bfloat16),
]


# ------------------------------------------------------------------------------------------ accuracy, every implementation


@pytest.mark.parametrize("case", ROLLOUT_CASES, ids=lambda c: cases.dx_case_id(c, "pshift", "shift"))
@pytest.mark.parametrize("impl", IMPLS)
def test_dx_rollout_matches_reference(impl, case, poisoned):
    n, c, spatial, mode, pshift, shift, dtype = case
    segment_size, total, dev = 0.6, 128, device_for(impl)
    grid, x_src, _ = cases.dx_inputs(n, c, spatial, dtype, seed=n * 10 + c + 1, device=dev)
    policy = dx_flat(grid, x_src, vec(DX_SIGMA_SRC, device=dev), segment_size, pshift, mode)
    sigma_start = vec([0.93, 0.5, 1.0], device=dev)
    sigma_end = vec([0.35, 0.49, 0.0], device=dev)  # about 60, 1 and 128 substeps
    plan = RolloutPlan.build(sigma_start, sigma_end, total, shift)
    assert len(set(plan.n_substeps.tolist())) == 3
    x_end = implementation("dx_rollout", impl)(policy.x_src, policy, plan)
    assert x_end.dtype == dtype and x_end.shape == policy.x_src.shape
    x_ref = ref_dx_rollout(x_src, sigma_start, sigma_end, total, shift, grid, x_src, DX_SIGMA_SRC, segment_size, pshift, mode)
    assert rel_err(x_end, x_ref.reshape(x_end.shape)) <= TOL["rollout"][dtype]


@pytest.mark.parametrize("impl", IMPLS)
def test_dx_rollout_non_contiguous(impl, poisoned):
    dev = device_for(impl)
    gen = torch.Generator().manual_seed(5)
    n, c, length = 4, 5, 63
    x = torch.randn(cases.DX_B, length, c, generator=gen).to(dev).transpose(1, 2)
    grid = torch.randn(cases.DX_B, n, length, c, generator=gen).to(dev).transpose(2, 3)
    ss = vec(DX_SIGMA_SRC, device=dev)
    s0, s1 = vec([0.9, 0.8, 0.7], device=dev), vec([0.1, 0.4, 0.69], device=dev)
    policy = DXTensors(grid, x, ss, dx_segment(ss, 1.0, 3.2))
    out = implementation("dx_rollout", impl)(x, policy, RolloutPlan.build(s0, s1, 64, 3.2))
    x_ref = ref_dx_rollout(x, s0, s1, 64, 3.2, grid, x, ss, 1.0, 3.2)
    assert rel_err(out, x_ref) <= TOL["rollout"][torch.float32]


# ------------------------------------------------------------------------------------------ through the public policy


@cases.parametrize_dx_policies
def test_dx_rollout_policy_matches_reference(backend, case, mode, shift):
    grid, x_src, s_src, g = cases.dx_nd_inputs(*case, seed=5, device=device_for(backend))
    s_end = s_src * torch.rand(case[0], generator=g).to(s_src.device)
    pol = pk.DXPolicy(grid, x_src, s_src, segment_size=0.4, shift=shift, mode=mode, backend=backend)
    out = pol.rollout(x_src, s_src, s_end, total_substeps=128, shift=2.0)
    ref = ref_dx_rollout(x_src, s_src, s_end, 128, 2.0, grid, x_src, s_src, 0.4, shift, mode)
    assert rel_err(out, ref) <= TOL["rollout"][torch.float32]


@pytest.mark.parametrize("mode", ["grid", "polynomial"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dx_rollout_to_data_with_varying_substeps(backend, mode):
    """Samples with different substep counts, one integrated all the way to sigma 0, x_start away from x_src
    (the torch twin's closed-form coefficient rollout in particular)."""
    grid, x_src, _, g = cases.dx_nd_inputs(3, 6, 4, (5, 7), seed=17)
    x_start = x_src + 0.3 * torch.randn(x_src.shape, generator=g)
    s_src = torch.tensor([0.95, 0.7, 0.5])
    s_start, s_end = s_src * 0.9, torch.tensor([0.0, 0.3, 0.2])
    dev = device_for(backend)
    grid, x_src, x_start, s_src, s_start, s_end = (t.to(dev) for t in (grid, x_src, x_start, s_src, s_start, s_end))
    pol = pk.DXPolicy(grid, x_src, s_src, segment_size=0.6, shift=3.0, mode=mode, backend=backend)
    out = pol.rollout(x_start, s_start, s_end, total_substeps=64, shift=3.2)
    ref = ref_dx_rollout(x_start, s_start, s_end, 64, 3.2, grid, x_src, s_src, 0.6, 3.0, mode)
    assert rel_err(out, ref) <= TOL["rollout"][torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dx_rollout_policy_bf16(backend):
    dev = device_for(backend)
    grid = torch.randn(2, 3, 4, 5, 6).bfloat16().to(dev)
    x_src = torch.randn(2, 4, 5, 6).bfloat16().to(dev)
    pol = pk.DXPolicy(grid, x_src, 0.8, segment_size=0.5, backend=backend)
    out = pol.rollout(x_src, 0.8, 0.3)
    ref = ref_dx_rollout(x_src, 0.8, 0.3, 128, 1.0, grid, x_src, 0.8, 0.5, 1.0)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= TOL["rollout"][torch.bfloat16]


# ------------------------------------------------------------------------------------------ CUDA only


@pytest.mark.cuda
def test_dx_rollout_cuda_compile_fullgraph_inductor():
    """A sampling step (velocity, then a rollout) under torch.compile(fullgraph=True) with inductor."""
    assert cases.cuda_compiled_step_error(*cases.dx_cuda_policy(4, 6, 16, (64, 64))) <= TOL["rollout"][torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dx_rollout_cuda_training_shape_vs_reference(dtype):
    """B=512, N=10, C=4, 32x32: a 128-substep rollout against float64 on the GPU."""
    b = 512
    pol, gen = cases.dx_cuda_policy(b, 10, 4, (32, 32), dtype)
    s_end = pol.sigma_src * torch.rand(b, generator=gen).cuda() * 0.8
    x_end = pol.rollout(pol.x_src, pol.sigma_src, s_end, total_substeps=128, shift=3.0)
    x_ref = ref_dx_rollout(pol.x_src, pol.sigma_src, s_end, 128, 3.0, pol.grid, pol.x_src, pol.sigma_src, 0.6, 3.0)
    assert rel_err(x_end, x_ref) <= TOL["rollout"][dtype]


@pytest.mark.cuda
def test_dx_rollout_cuda_graph_capture():
    """The rollout reads substep counts on the device only, so it records into a CUDA graph and replays."""
    assert cases.cuda_graph_replay_error(*cases.dx_cuda_policy(8, 5, 16, (32, 32)), 64, new_target=False) <= 1e-6
