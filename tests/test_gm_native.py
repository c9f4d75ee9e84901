"""The fused native CPU rollout (piflow_kernels.ops.gm_native) against the float64 reference.

Fresh random inputs, odd pixel counts (blocks of 16 with a partial last one), batch-varying substep counts,
-inf logweights, one std per sample and per component, shift 1 and 3.2. Also: it is what the torch backend
runs on the CPU, it gives the same bits on any thread count, and it falls back cleanly (None, one logged
reason) when it cannot be built.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TOL, rel_err

from piflow_kernels import reference
from piflow_kernels.ops import gm_native, gm_torch
from piflow_kernels.timesteps import sigma_table, substep_schedule

pytestmark = pytest.mark.skipif(not gm_native.available(), reason="no C compiler for the native CPU rollout")


def _inputs(b, k, c, length, *, per_component, neg_inf, seed):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(b, k, c, length, generator=gen)
    lw = torch.randn(b, k, length, generator=gen) * 2.0
    if neg_inf and k > 1:
        lw[:, 0] = float("-inf")  # a component dropped everywhere
        lw[0, -1, :3] = float("-inf")  # and another at a few pixels
    lw = lw.log_softmax(1)
    ls = torch.randn(b, k if per_component else 1, generator=gen) * 0.3 - 0.7
    x_src = torch.randn(b, c, length, generator=gen)
    sigma_src = torch.rand(b, generator=gen) * 0.5 + 0.45
    x = x_src + 0.5 * torch.randn(b, c, length, generator=gen)
    s0 = sigma_src * (torch.rand(b, generator=gen) * 0.3 + 0.7)
    s1 = s0 * torch.rand(b, generator=gen) * 0.8
    s1[-1] = 0.0  # one sample integrates to the data
    return x, means, lw, ls, x_src, sigma_src, s0, s1


def _native_args(x, means, lw, ls, x_src, sigma_src, n, h, r0, s0, shift):
    var = gm_torch._variances(ls, sigma_src, means.shape)
    table = torch.stack(sigma_table(s0, n, h, r0, shift), 1)
    return x, means, lw, x_src, var, sigma_src, *gm_torch._source_terms(sigma_src), table, ls.shape[1] > 1


# (B, K, C, L, std per component, -inf logweights, shift, total substeps)
CASES = [
    (2, 1, 1, 20, False, False, 1.0, 16),
    (3, 3, 5, 63, True, True, 3.2, 12),
    (2, 8, 16, 30, False, False, 3.2, 8),
    (2, 40, 5, 9, True, True, 1.0, 8),
    (3, 32, 4, 37, False, True, 3.2, 16),
    (3, 64, 3, 17, False, True, 1.0, 12),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-K{c[1]}-C{c[2]}-L{c[3]}-{'k' if c[4] else 's'}std-shift{c[6]}")
def test_native_rollout_matches_reference(case):
    b, k, c, length, per, neg, shift, total = case
    x, means, lw, ls, x_src, sigma_src, s0, s1 = _inputs(b, k, c, length, per_component=per, neg_inf=neg, seed=k * c + length)
    n, h, r0 = substep_schedule(s0, s1, total, shift)
    assert len(set(n.tolist())) > 1  # the samples take different numbers of substeps
    out = gm_native.gm_rollout_native(*_native_args(x, means, lw, ls, x_src, sigma_src, n, h, r0, s0, shift))
    assert out is not None and out.shape == x.shape and out.dtype == torch.float32
    d = lambda t: t.double()  # noqa: E731

    def vel(xx, ss):
        return reference.gm_velocity(xx, ss, d(means), d(lw)[:, :, None], d(ls)[:, :, None, None], d(x_src), d(sigma_src))

    ref = reference.rollout(vel, d(x), d(s0), d(s1), total, shift)
    assert rel_err(out, ref) <= TOL["rollout"][torch.float32]
    moved = (out - x).abs().amax(dim=(1, 2))
    assert bool((moved > 0).all())  # every sample's every block was integrated (s_end < s_start for all)


def test_torch_backend_runs_it_on_cpu(monkeypatch):
    """gm_rollout_torch takes the native path on CPU tensors, and the compiled-substep path agrees with it."""
    x, means, lw, ls, x_src, sigma_src, s0, s1 = _inputs(2, 8, 4, 50, per_component=False, neg_inf=True, seed=3)
    n, h, r0 = substep_schedule(s0, s1, 16, 3.2)
    calls = []
    real = gm_native.gm_rollout_native
    monkeypatch.setattr(gm_native, "gm_rollout_native", lambda *a: calls.append(1) or real(*a))
    out = gm_torch.gm_rollout_torch(x.to(torch.bfloat16), means, lw, ls, x_src, sigma_src, s0, n, h, r0, 3.2)
    assert calls and out.dtype == torch.bfloat16
    monkeypatch.setenv("PIFLOW_NATIVE", "0")
    monkeypatch.setattr(gm_native, "_state", {})
    twin = gm_torch.gm_rollout_torch(x.to(torch.bfloat16), means, lw, ls, x_src, sigma_src, s0, n, h, r0, 3.2)
    assert len(calls) == 2  # asked, and declined
    assert rel_err(out.float(), twin.float()) <= TOL["rollout"][torch.bfloat16]


def test_same_bits_on_any_thread_count():
    args = _native_args(*_inputs(3, 16, 4, 700, per_component=True, neg_inf=False, seed=9)[:6],
                        *substep_schedule(torch.full((3,), 0.9), torch.tensor([0.3, 0.1, 0.0]), 32, 3.2),
                        torch.full((3,), 0.9), 3.2)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gm_native.gm_rollout_native(*args)
        torch.set_num_threads(max(2, threads))
        many = gm_native.gm_rollout_native(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_unavailable_is_none_with_one_logged_reason(monkeypatch, caplog, tmp_path):
    x, means, lw, ls, x_src, sigma_src, s0, s1 = _inputs(1, 3, 2, 16, per_component=False, neg_inf=False, seed=1)
    n, h, r0 = substep_schedule(s0, s1, 4, 1.0)
    args = _native_args(x, means, lw, ls, x_src, sigma_src, n, h, r0, s0, 1.0)
    monkeypatch.setattr(gm_native, "_state", {})
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="piflow_kernels.ops.gm_native"):
        assert gm_native.gm_rollout_native(*args) is None
        assert gm_native.gm_rollout_native(*args) is None
    records = [r for r in caplog.records if "native CPU rollout unavailable" in r.getMessage()]
    assert len(records) == 1 and "build failed" in records[0].getMessage()
    # and the torch backend still answers, from the compiled substeps
    out = gm_torch.gm_rollout_torch(x, means, lw, ls, x_src, sigma_src, s0, n, h, r0, 1.0)
    assert torch.isfinite(out).all() and not torch.equal(out, x)


def test_built_library_is_cached(monkeypatch, tmp_path):
    """The second process (here: a reset state) loads the cached build without running the compiler."""
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gm_native, "_state", {})
    assert gm_native.available()
    assert len(list(tmp_path.glob("gm_native_*.so"))) == 1

    def no_compiler(*a, **kw):
        raise AssertionError("the compiler ran again")

    monkeypatch.setattr(gm_native.subprocess, "run", no_compiler)
    monkeypatch.setattr(gm_native, "_state", {})
    assert gm_native.available()
