"""The public policy API (GMFlowPolicy, DXPolicy): temperature, dropout, detach, backend choice, sigma forms,
autocast, torch.compile through a policy. The ops behind it are tested one file per op in tests/ops/."""

import pytest
import torch
from conftest import compiled_step_error, rel_err
from ops.op_cases import make_gm, ref_gm_velocity

import piflow_kernels as pk
from piflow_kernels import reference as R


def test_temperature_and_dropout_policies():
    means, lw, ls, x_src, s_src = make_gm(4, 6, 3, (4, 4), seed=7)
    pol = pk.GMFlowPolicy(means, lw, ls, x_src, s_src)
    x = torch.randn_like(x_src)
    hot = pol.temperature(0.6)
    lw_t, ls_t = R.gm_apply_temperature(lw.double(), ls.double(), 0.6)
    assert rel_err(hot.velocity(x, 0.3), ref_gm_velocity(x, 0.3, means, lw_t, ls_t, x_src, s_src)) <= 2e-5
    assert pol.temperature(1.0).logweights is pol.logweights
    with pytest.raises(ValueError, match="temperature"):
        pol.temperature(0.0)

    g = torch.Generator().manual_seed(0)
    dropped = pol.dropout(0.5, generator=g)
    dead = torch.isinf(dropped.logweights).flatten(2).all(2)  # (B, K)
    assert dead.any() and not dead.all(1).any()  # something dropped, never a whole sample
    assert not torch.isinf(pol.logweights).any()  # the original policy is untouched
    always = pol.dropout(0.999, generator=g)
    assert (torch.isfinite(always.logweights).flatten(2).all(2).sum(1) >= 1).all()
    # the fraction dropped is about p
    big = pk.GMFlowPolicy(*make_gm(64, 32, 1, (1, 1), seed=8))
    frac = torch.isinf(big.dropout(0.25, generator=g).logweights).float().mean()
    assert 0.2 < float(frac) < 0.3


def test_detach():
    means, lw, ls, x_src, s_src = make_gm(2, 3, 2, (3, 3), seed=9)
    m = means.clone().requires_grad_(True)
    pol = pk.GMFlowPolicy(m, lw, ls, x_src, s_src)
    assert pol.velocity(x_src, 0.5).requires_grad
    assert not pol.detach().velocity(x_src, 0.5).requires_grad
    grid = torch.randn(2, 3, 2, 3, 3, requires_grad=True)
    assert not pk.DXPolicy(grid, x_src, 0.5).detach().velocity(x_src, 0.4).requires_grad


def test_env_override_and_auto_backend(monkeypatch):
    means, lw, ls, x_src, s_src = make_gm(1, 2, 2, (2, 2))
    assert pk.GMFlowPolicy(means, lw, ls, x_src, s_src).backend == "torch"
    monkeypatch.setenv("PIFLOW_BACKEND", "reference")
    assert pk.GMFlowPolicy(means, lw, ls, x_src, s_src).backend == "reference"
    assert pk.GMFlowPolicy(means, lw, ls, x_src, s_src, backend="torch").backend == "torch"
    monkeypatch.setenv("PIFLOW_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend"):
        pk.GMFlowPolicy(means, lw, ls, x_src, s_src)


def test_sigma_forms():
    means, lw, ls, x_src, _ = make_gm(3, 2, 2, (2, 2))
    pols = [
        pk.GMFlowPolicy(means, lw, ls, x_src, 0.7),
        pk.GMFlowPolicy(means, lw, ls, x_src, torch.tensor(0.7)),
        pk.GMFlowPolicy(means, lw, ls, x_src, torch.full((3,), 0.7)),
    ]
    outs = [p.rollout(x_src, 0.7, torch.tensor(0.2), total_substeps=8) for p in pols]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])


def test_policy_math_stays_float32_under_autocast():
    """docs/design.md#layouts-and-dtypes: policy math runs in float32 whatever the caller's autocast region says."""
    g = torch.Generator().manual_seed(11)
    grid = torch.randn(2, 4, 3, 5, 5, generator=g)
    x_src = torch.randn(2, 3, 5, 5, generator=g)
    pol = pk.DXPolicy(grid, x_src, 0.8, segment_size=0.5)
    means, lw, ls, _, s_src = make_gm(2, 4, 3, (5, 5), seed=12)
    gm_pol = pk.GMFlowPolicy(means, lw, ls, x_src, s_src)
    plain = (pol.velocity(x_src, 0.5), pol.rollout(x_src, 0.8, 0.2), gm_pol.velocity(x_src, 0.4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = (pol.velocity(x_src, 0.5), pol.rollout(x_src, 0.8, 0.2), gm_pol.velocity(x_src, 0.4))
    for a, b in zip(plain, under):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["gm", "dx"])
def test_sampling_step_compiles_fullgraph_through_the_policy(policy):
    """velocity + rollout of a public policy under torch.compile(fullgraph=True) on CPU tensors (Triton ops
    in the interpreter): the CPU-only input checks step aside while tracing, so no data-dependent guard
    breaks the graph."""
    g = torch.Generator().manual_seed(3)
    x_src = torch.randn(2, 4, 4, 4, generator=g)
    if policy == "gm":
        means, lw = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 1, 4, 4, generator=g).log_softmax(1)
        pol = pk.GMFlowPolicy(means, lw, torch.full((2, 1, 1, 1, 1), -1.0), x_src, 0.9, backend="triton")
    else:
        pol = pk.DXPolicy(torch.randn(2, 5, 4, 4, 4, generator=g), x_src, 0.9, segment_size=0.5, backend="triton")
    x = torch.randn(2, 4, 4, 4, generator=g)
    assert compiled_step_error(pol, x, torch.full((2,), 0.7), torch.full((2,), 0.2)) <= 1e-6
