"""The dispatcher (``piflow_kernels.ops.dispatch``): which implementation runs an op, and its fallbacks.

``select(op, backend, x, policy)`` names the implementation it picks (``<op>_<implementation>``, the functions
the op tests join to the reference); a backend that cannot run the inputs falls back to the torch path with
its reason logged once per (op, reason), and nothing here writes to ``os.environ``. A backend passed explicitly
to a policy that cannot run it raises instead (tests/test_policy_domain.py).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from conftest import TOL, rel_err

import piflow_kernels as pk
from piflow_kernels import ops
from piflow_kernels.ops import dispatch
from piflow_kernels.ops.dx import triton_common as dx_common
from piflow_kernels.ops.gm import native, torch_twin
from piflow_kernels.ops.gm import triton_common as gm_common
from piflow_kernels.ops.records import RolloutPlan

from . import op_cases as cases
from .op_cases import DEVICE, DX_SIGMA, DX_SIGMA_SRC, dx_flat, dx_inputs, gm_inputs, implementation, vec

LOGGER = dispatch.logger.name


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    """Every test sees each fallback reason for the first time."""
    monkeypatch.setattr(dispatch, "_logged", set())


def _fallbacks(caplog, op):
    """The dispatcher's fallback messages for ``op``."""
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    return [m for m in messages if f" {op} falls back to the torch path" in m]


def _inputs(op, device):
    """(x, sigma, flat policy) of a small GM or DX policy on ``device``."""
    if op.startswith("gm"):
        return gm_inputs(2, 3, 2, 5, per_component=False, neg_inf=False, dtype=torch.float32, seed=5, device=device)
    grid, x_src, x = dx_inputs(3, 2, (2, 3), torch.float32, seed=13, device=device)
    policy = dx_flat(grid, x_src, vec(DX_SIGMA_SRC, device=device), 0.5, 1.0)
    return x.reshape(policy.x_src.shape), vec(DX_SIGMA, device=device), policy


def _run(op, backend, x, sigma, policy):
    if op.endswith("velocity"):
        return getattr(ops, op)(backend, x, sigma, policy)
    return getattr(ops, op)(backend, x, policy, RolloutPlan.build(sigma, sigma * 0.5, 6, 1.0))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("op", dispatch.OPS)
def test_select_names_the_implementation(op, backend):
    """The choice is named <op>_<implementation> and is that function of ops/<gm,dx>/."""
    x, _, policy = _inputs(op, cases.device_for(backend))
    choice = dispatch.select(op, backend, x, policy)
    expected = backend
    if op == "gm_rollout" and backend == "torch" and native.available():
        expected = "native"  # CPU tensors: the fused native loop
    assert choice.name == f"{op}_{expected}"
    assert choice.fn is implementation(op, expected)


OUT_OF_RANGE = [(gm_common.MAX_COMPONENTS + 1, 2), (3, gm_common.MAX_CHANNELS + 1)]


@pytest.mark.parametrize("k, c", OUT_OF_RANGE, ids=["K-too-large", "C-too-large"])
def test_gm_triton_outside_range_falls_back_once_per_op_and_is_correct(k, c, caplog):
    x, sigma, policy = gm_inputs(1, k, c, 5, per_component=False, neg_inf=False, dtype=torch.float32, device=DEVICE)
    means = policy.means.requires_grad_()
    assert dispatch.select("gm_velocity", "triton", x, policy).name == "gm_velocity_torch"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        u = ops.gm_velocity("triton", x, sigma, policy)
        u2 = ops.gm_velocity("triton", x, sigma, policy)
        s1 = sigma * 0.5
        x_end = ops.gm_rollout("triton", x, policy._replace(means=means.detach()), RolloutPlan.build(sigma, s1, 6, 1.0))
    for op in ("gm_velocity", "gm_rollout"):
        reasons = _fallbacks(caplog, op)
        assert len(reasons) == 1 and f"K={k}, C={c}" in reasons[0], reasons
    detached = policy._replace(means=means.detach())
    assert rel_err(u.detach(), cases.ref_gm_velocity_flat(x, sigma, detached)) <= TOL["velocity"][torch.float32]
    assert torch.equal(u, u2)
    (g,) = torch.autograd.grad(u.sum(), [means])  # the fallback stays differentiable
    assert torch.isfinite(g).all()
    ref = cases.ref_gm_rollout_flat(x, detached, sigma, s1, 6, 1.0)
    assert rel_err(x_end, ref) <= TOL["rollout"][torch.float32]


def test_dx_triton_too_many_points_falls_back_with_logged_reason(caplog, monkeypatch):
    """The automatic choice (here PIFLOW_BACKEND=triton) falls back; backend="triton" passed to the policy refuses."""
    n = dx_common.MAX_POINTS + 1
    grid, x_src, x = dx_inputs(n, 2, (2, 3), torch.float32, seed=13)
    with pytest.raises(ValueError, match=f"backend='triton' cannot run dx_velocity .*N = {n} grid points"):
        pk.DXPolicy(grid, x_src, vec(DX_SIGMA_SRC), segment_size=0.5, mode="grid", backend="triton")
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    pol = pk.DXPolicy(grid, x_src, vec(DX_SIGMA_SRC), segment_size=0.5, mode="grid")
    assert pol.backend == "triton"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        u = pol.velocity(x, vec(DX_SIGMA))
        pol.velocity(x, vec(DX_SIGMA))
    reasons = [m for m in _fallbacks(caplog, "dx_velocity") if f"N = {n} grid points" in m]
    assert len(reasons) == 1  # logged once, not per call
    u_ref = cases.ref_dx_velocity(x, DX_SIGMA, grid, x_src, DX_SIGMA_SRC, 0.5, 1.0, "grid")
    assert rel_err(u, u_ref) <= TOL["velocity"][torch.float32]


@pytest.mark.parametrize("op", dispatch.OPS)
def test_cpu_tensors_without_the_interpreter_fall_back(op, monkeypatch, caplog):
    """Kernels compiled for a GPU cannot take CPU tensors: the torch path answers, with the reason logged once."""
    monkeypatch.setattr(gm_common, "INTERPRET", False)
    monkeypatch.setattr(dx_common, "interpreted", lambda: False)
    x, sigma, policy = _inputs(op, "cpu")
    assert dispatch.select(op, "triton", x, policy).name == dispatch.select(op, "torch", x, policy).name
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = _run(op, "triton", x, sigma, policy)
        again = _run(op, "triton", x, sigma, policy)
    reasons = _fallbacks(caplog, op)
    assert len(reasons) == 1 and "TRITON_INTERPRET=1" in reasons[0], reasons
    assert torch.equal(out, again) and torch.equal(out, _run(op, "torch", x, sigma, policy))


def test_torch_backend_runs_the_native_rollout_on_cpu(monkeypatch):
    """On CPU tensors the torch backend's GM rollout is the native loop; with PIFLOW_NATIVE=0 it is the
    compiled-substep twin, and the two agree."""
    if not native.available():
        pytest.skip("no C compiler for the native CPU rollout")
    x, sigma, policy = gm_inputs(2, 8, 4, 50, per_component=False, neg_inf=True, dtype=torch.float32, seed=3)
    plan = RolloutPlan.build(sigma, sigma * torch.tensor([0.3, 0.0]), 16, 3.2)
    x = x.to(torch.bfloat16)
    assert dispatch.select("gm_rollout", "torch", x, policy).name == "gm_rollout_native"
    out = ops.gm_rollout("torch", x, policy, plan)
    assert out.dtype == torch.bfloat16
    monkeypatch.setenv("PIFLOW_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert dispatch.select("gm_rollout", "torch", x, policy).name == "gm_rollout_torch"  # asked, and declined
    twin = ops.gm_rollout("torch", x, policy, plan)
    assert rel_err(out.float(), twin.float()) <= TOL["rollout"][torch.bfloat16]


def test_native_unavailable_falls_back_with_one_logged_reason(monkeypatch, caplog, tmp_path):
    x, sigma, policy = gm_inputs(1, 3, 2, 16, per_component=False, neg_inf=False, dtype=torch.float32, seed=1)
    plan = RolloutPlan.build(sigma, sigma * 0.5, 4, 1.0)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger=native.logger.name):
        assert not native.available()
        assert not native.available()
    records = [r for r in caplog.records if "native CPU rollout unavailable" in r.getMessage()]
    assert len(records) == 1 and "build failed" in records[0].getMessage()
    # and the torch backend still answers, from the compiled substeps
    assert dispatch.select("gm_rollout", "torch", x, policy).name == "gm_rollout_torch"
    out = ops.gm_rollout("torch", x, policy, plan)
    assert torch.isfinite(out).all() and not torch.equal(out, x)
    assert rel_err(out, cases.ref_gm_rollout_flat(x, policy, sigma, sigma * 0.5, 4, 1.0)) <= TOL["rollout"][torch.float32]


def test_failed_compile_of_the_gm_substep_leaves_the_environment_alone(monkeypatch, caplog):
    """A torch.compile that fails (no C++ toolchain, say) turns the torch twin eager for this process, says
    why once, and records it in torch_twin, not in os.environ."""

    def broken_compile(fn, *args, **kwargs):
        def raises(*a, **kw):
            raise RuntimeError("no C++ compiler here")

        return raises

    monkeypatch.setattr(torch_twin, "_compiled", {"fn": None, "seconds": None, "failure": None})  # restored afterwards
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.delenv("PIFLOW_COMPILE", raising=False)
    x, sigma, policy = gm_inputs(2, 3, 4, 10, per_component=True, neg_inf=True, dtype=torch.float32, seed=7)
    s1 = sigma * torch.tensor([0.4, 0.0])
    plan = RolloutPlan.build(sigma, s1, 8, 3.2)
    assert dispatch.select("gm_rollout", "torch", x, policy).name == "gm_rollout_torch"
    with caplog.at_level(logging.WARNING, logger=torch_twin.logger.name):
        out = ops.gm_rollout("torch", x, policy, plan)
        again = ops.gm_rollout("torch", x, policy, plan)
    assert os.environ.get("PIFLOW_COMPILE") is None
    assert "no C++ compiler here" in torch_twin.compile_failure() and not torch_twin.compile_enabled()
    assert len([r for r in caplog.records if "torch.compile of the GM substep failed" in r.getMessage()]) == 1
    assert torch.equal(out, again)
    assert rel_err(out, cases.ref_gm_rollout_flat(x, policy, sigma, s1, 8, 3.2)) <= TOL["rollout"][torch.float32]
