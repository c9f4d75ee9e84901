"""The reference against closed-form facts (float64)."""

import math

import pytest
import torch

from piflow_kernels import reference as R


def gaussian_posterior(x_t, s, mu0, sig0):
    """E[x0 | x_t] and Var[x0 | x_t] for x0 ~ N(mu0, sig0^2) per element, x_t = (1 - s) x0 + s eps."""
    a = 1 - s
    var_t = a**2 * sig0**2 + s**2
    mean = mu0 + a * sig0**2 / var_t * (x_t - a * mu0)
    var = sig0**2 * s**2 / var_t
    return mean, var


def k1_policy_of_gaussian(x_src, s_src, mu0, sig0):
    """The exact K=1 GMFlow policy of Gaussian data at (x_src, s_src), in the velocity parameterisation."""
    mean, var = gaussian_posterior(x_src, s_src, mu0, sig0)
    means = ((x_src - mean) / s_src).unsqueeze(1)  # (B, 1, C, H, W)
    logweights = torch.zeros_like(means[:, :, :1])
    logstds = torch.full((x_src.shape[0], 1, 1, 1, 1), 0.5 * math.log(var) - math.log(s_src), dtype=x_src.dtype)
    return means, logweights, logstds


@pytest.mark.parametrize("s_src,s", [(0.9, 0.5), (0.6, 0.1), (1.0, 0.3), (0.4, 0.39)])
def test_k1_gaussian_policy_is_exact_flow_velocity(s_src, s):
    torch.manual_seed(0)
    mu0, sig0 = 0.7, 0.5
    x_src = (1 - s_src) * (mu0 + sig0 * torch.randn(3, 2, 4, 5, dtype=torch.float64)) + s_src * torch.randn(
        3, 2, 4, 5, dtype=torch.float64
    )
    means, lw, ls = k1_policy_of_gaussian(x_src, s_src, mu0, sig0)
    x = torch.randn_like(x_src)
    u = R.gm_velocity(x, s, means, lw, ls, x_src, s_src)
    mean_t, _ = gaussian_posterior(x, s, mu0, sig0)
    u_exact = (x - mean_t) / s
    torch.testing.assert_close(u, u_exact, rtol=1e-9, atol=1e-9)


def test_rollout_converges_to_exact_ode_solution():
    torch.manual_seed(1)
    mu0, sig0, s0, s1 = -0.3, 0.8, 0.95, 0.05
    x_src = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    means, lw, ls = k1_policy_of_gaussian(x_src, s0, mu0, sig0)

    def vel(x, s):
        return R.gm_velocity(x, s, means, lw, ls, x_src, s0)

    def std(s):
        return math.sqrt((1 - s) ** 2 * sig0**2 + s**2)

    # the exact flow keeps the standardised coordinate constant
    exact = (1 - s1) * mu0 + std(s1) * (x_src - (1 - s0) * mu0) / std(s0)
    errors = [float((R.rollout(vel, x_src, s0, s1, n, shift=3.0) - exact).abs().max()) for n in (8, 32, 128, 512)]
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 30, errors
    # Euler is first order: 4x the substeps, about 4x less error
    assert errors[-2] / errors[-1] > 3.0, errors


def test_velocity_at_source_is_weighted_mean_of_components():
    torch.manual_seed(2)
    b, k, c, h, w = 2, 5, 3, 4, 6
    means = torch.randn(b, k, c, h, w, dtype=torch.float64)
    lw = torch.randn(b, k, 1, h, w, dtype=torch.float64).log_softmax(1)
    ls = torch.randn(b, k, 1, 1, 1, dtype=torch.float64) * 0.3
    x_src = torch.randn(b, c, h, w, dtype=torch.float64)
    s_src = torch.tensor([0.8, 0.35], dtype=torch.float64)
    u = R.gm_velocity(x_src, s_src, means, lw, ls, x_src, s_src)
    expected = (lw.softmax(1) * means).sum(1)
    torch.testing.assert_close(u, expected, rtol=1e-10, atol=1e-10)


def test_temperature_semantics():
    torch.manual_seed(3)
    lw = torch.randn(2, 4, 1, 3, 3, dtype=torch.float64).log_softmax(1)
    ls = torch.randn(2, 4, 1, 1, 1, dtype=torch.float64)
    lw_t, ls_t = R.gm_apply_temperature(lw, ls, 0.5)
    torch.testing.assert_close(lw_t, (2 * lw).log_softmax(1))
    torch.testing.assert_close(torch.exp(2 * ls_t), torch.exp(2 * ls) * 0.5)  # var * T
    assert torch.allclose(lw_t.exp().sum(1), torch.ones(1, dtype=torch.float64))
    # sharper: the largest weight grows
    assert bool((lw_t.max(1).values >= lw.max(1).values - 1e-12).all())
    same_lw, same_ls = R.gm_apply_temperature(lw, ls, 1.0)
    assert same_lw is lw and same_ls is ls


def test_dropout_semantics():
    lw = torch.randn(2, 3, 1, 2, 2, dtype=torch.float64).log_softmax(1)
    keep = torch.tensor([[True, False, True], [False, True, False]])
    out = R.gm_apply_dropout(lw, keep)
    assert torch.isinf(out[0, 1]).all() and torch.isinf(out[1, 0]).all() and torch.isinf(out[1, 2]).all()
    torch.testing.assert_close(out[0, 0], lw[0, 0])
    # the velocity at the source then averages the kept components only
    means = torch.randn(2, 3, 4, 2, 2, dtype=torch.float64)
    x_src = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    ls = torch.zeros(2, 1, 1, 1, 1, dtype=torch.float64) - 1
    u = R.gm_velocity(x_src, 0.5, means, out, ls, x_src, 0.5)
    torch.testing.assert_close(u[1], means[1, 1])


@pytest.mark.parametrize("n_points", [2, 3, 6])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dx_grid_interpolation_hits_grid_points(n_points, shift):
    torch.manual_seed(4)
    b, c, h, w = 2, 3, 4, 5
    grid = torch.randn(b, n_points, c, h, w, dtype=torch.float64)
    x_src = torch.randn(b, c, h, w, dtype=torch.float64)
    s_src, seg_size = 0.9, 0.6
    r_src = R.unwarp(s_src, shift)
    r_dst = max(r_src - seg_size, 0.0)
    x0_points = x_src.unsqueeze(1) - s_src * grid
    x = torch.randn_like(x_src)
    for n in range(n_points):
        r = r_dst + n / (n_points - 1) * (r_src - r_dst)
        s = R.warp(r, shift)
        u = R.dx_velocity(x, s, grid, x_src, s_src, seg_size, shift)
        torch.testing.assert_close(u, (x - x0_points[:, n]) / s, rtol=1e-9, atol=1e-9)
    # the source point itself gives the last grid point's velocity
    u_src = R.dx_velocity(x_src, s_src, grid, x_src, s_src, seg_size, shift)
    torch.testing.assert_close(u_src, grid[:, -1], rtol=1e-9, atol=1e-9)


def test_dx_polynomial_mode_at_source_is_first_coefficient():
    torch.manual_seed(5)
    grid = torch.randn(2, 3, 2, 3, 3, dtype=torch.float64)
    x_src = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    u = R.dx_velocity(x_src, 0.7, grid, x_src, 0.7, 0.5, 1.0, mode="polynomial")
    torch.testing.assert_close(u, grid[:, 0])


def test_rollout_per_sample_substep_counts():
    """Samples with shorter segments take fewer substeps (counted through the velocity calls)."""
    calls = []

    def vel(x, s):
        calls.append(s.clone())
        return torch.ones_like(x)

    x = torch.zeros(2, 1, 1, 1, dtype=torch.float64) + 0.5
    out = R.rollout(vel, x, torch.tensor([1.0, 0.5], dtype=torch.float64), 0.0, total_substeps=4)
    assert len(calls) == 4  # max over samples: 4 substeps for sample 0, 2 for sample 1
    torch.testing.assert_close(out.flatten(), torch.tensor([0.5 - 1.0, 0.5 - 0.5], dtype=torch.float64))


def test_warp_unwarp_dynamic_shift():
    r = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(R.unwarp(R.warp(r, 3.2), 3.2), r)
    assert R.warp(0.5, 3.0) == pytest.approx(0.75)
    assert R.dynamic_shift(256) == pytest.approx(math.exp(0.5))
    assert R.dynamic_shift(4096) == pytest.approx(math.exp(1.15))


def test_flowmap_sde_schedule():
    sig = R.flowmap_sde_sigmas(4, shift=1.0)
    torch.testing.assert_close(sig, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    sig = R.flowmap_sde_sigmas(2, shift=1.0, final_step_size_scale=0.5)
    # raw grid linspace(1, -0.5/1.5, 2, endpoint=False): 1, 1/3; final step half the others
    torch.testing.assert_close(sig, torch.tensor([1.0, 1 / 3, 0.0], dtype=torch.float64))
    s_dst, m = R.flowmap_sde_dst(0.8, 0.4, 0.0)
    assert m == 1.0 and s_dst == pytest.approx(0.4)
    s_dst, m = R.flowmap_sde_dst(0.8, 0.4, "inf")
    assert m == 0.0 and s_dst == 0.0
