"""Teachers: the exact Gaussian-mixture velocity (closed forms, Monte Carlo), its sampler, CFG and diffusers adapters."""

import math
from types import SimpleNamespace

import pytest
import torch

from piflow_kernels.distill import CFGTeacher, DiffusersTeacher, ExactGMTeacher, GaussianMixtureData, as_velocity

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def mixture_2d():
    means = torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.3, -1.2]], dtype=torch.float64)
    return GaussianMixtureData(means, torch.tensor([0.2, 0.5, 0.3]), weights=torch.tensor([2.0, 5.0, 3.0]))


@pytest.mark.parametrize("sigma", [0.0, 1e-3, 0.3, 0.7, 0.999, 1.0])
def test_single_component_closed_form(sigma):
    """One Gaussian N(mu, sd^2 I): E[x0 | x_t] = mu + a sd^2 / (a^2 sd^2 + s^2) (x_t - a mu), u = (x_t - E[x0|x_t]) / s."""
    mu = torch.randn(5, dtype=torch.float64, generator=gen(0))
    sd = 0.4
    data = GaussianMixtureData(mu[None], sd)
    x = torch.randn(7, 5, dtype=torch.float64, generator=gen(1)) * 1.3
    u = data.velocity(x, sigma)
    if sigma == 0.0:
        expected = -x  # x_t = x0 and eps is independent of it: E[eps - x0 | x0] = -x0
    else:
        a = 1 - sigma
        x0 = mu + a * sd**2 / (a**2 * sd**2 + sigma**2) * (x - a * mu)
        expected = (x - x0) / sigma
    torch.testing.assert_close(u, expected, rtol=1e-9, atol=1e-12)


def test_mixture_limits_at_sigma_one_and_zero():
    data = mixture_2d()
    x = torch.randn(9, 2, dtype=torch.float64, generator=gen(2))
    # sigma = 1: x_t is pure noise, the posterior is the prior: u = x_t - E[x0]
    torch.testing.assert_close(data.velocity(x, 1.0), x - data.mean())
    # sigma = 0: u = -x0 for components with std > 0
    torch.testing.assert_close(data.velocity(x, 0.0), -x, rtol=0, atol=1e-12)
    torch.testing.assert_close(data.posterior_mean(x, 1.0), data.mean().expand(9, 2))


@pytest.mark.parametrize("sigma", [0.3, 0.6, 0.9])
def test_velocity_agrees_with_monte_carlo(sigma):
    """Self-normalised importance estimate of E[x0 | x_t] from exact samples (prior as proposal)."""
    data = mixture_2d()
    x0 = data.sample(200_000, generator=gen(3), dtype=torch.float64)
    probe = data.sample(6, generator=gen(4), dtype=torch.float64)
    x_t = (1 - sigma) * probe + sigma * torch.randn(probe.shape, dtype=torch.float64, generator=gen(5))
    u = data.velocity(x_t, sigma)
    a = 1 - sigma
    for i in range(x_t.shape[0]):
        logw = -((x_t[i] - a * x0) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        mean = (w[:, None] * x0).sum(0)
        var = (w[:, None] * (x0 - mean) ** 2).sum()
        ess = 1 / (w**2).sum()
        assert ess > 1000
        u_mc = (x_t[i] - mean) / sigma
        tol = 5 * math.sqrt(float(var / ess)) / sigma
        assert float((u[i] - u_mc).abs().max()) < tol, (u[i], u_mc, tol)


def test_image_shaped_equals_flattened():
    shape = (3, 4, 5)
    data = GaussianMixtureData.random(shape, num_components=4, std=0.2, generator=gen(6))
    flat = GaussianMixtureData(data.means.reshape(4, -1), data.stds, data.weights)
    x = torch.randn(5, *shape, generator=gen(7))
    sigma = torch.tensor([0.05, 0.2, 0.5, 0.8, 1.0])
    u = data.velocity(x, sigma)
    assert u.shape == x.shape and u.dtype == torch.float32
    torch.testing.assert_close(u.reshape(5, -1), flat.velocity(x.reshape(5, -1), sigma))
    # 5-D latents (C, T, H, W) work the same way
    data5 = GaussianMixtureData(data.means.reshape(4, 3, 2, 2, 5), data.stds)
    torch.testing.assert_close(data5.velocity(x.reshape(5, 3, 2, 2, 5), sigma).reshape(5, -1), u.reshape(5, -1))


def test_labels_condition_on_a_class():
    means = torch.randn(3, 2, 3, 3, generator=gen(8), dtype=torch.float64)
    stds = torch.tensor([0.1, 0.3, 0.2])
    data = GaussianMixtureData(means, stds, torch.tensor([1.0, 3.0, 2.0]), labels=torch.tensor([0, 0, 1]))
    x = torch.randn(4, 2, 3, 3, generator=gen(9), dtype=torch.float64)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.9])
    only2 = GaussianMixtureData(means[2:], stds[2:])
    first2 = GaussianMixtureData(means[:2], stds[:2], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(data.velocity(x, sigma, labels=torch.ones(4, dtype=torch.long)), only2.velocity(x, sigma))
    torch.testing.assert_close(data.velocity(x, sigma, labels=torch.zeros(4, dtype=torch.long)), first2.velocity(x, sigma))
    with pytest.raises(ValueError, match="no component"):
        data.velocity(x, sigma, labels=torch.full((4,), 5))


def test_sampler_matches_the_mixture():
    data = mixture_2d()
    x0, comp = data.sample(100_000, generator=gen(10), return_components=True)
    assert x0.shape == (100_000, 2) and x0.dtype == torch.float32
    freq = torch.bincount(comp, minlength=3).double() / comp.numel()
    torch.testing.assert_close(freq, data.weights, atol=0.01, rtol=0)
    for m in range(3):
        sel = x0[comp == m].double()
        torch.testing.assert_close(sel.mean(0), data.means[m], atol=0.02, rtol=0)
        torch.testing.assert_close(sel.std(0), data.stds[m].expand(2), atol=0.02, rtol=0)
    assert torch.equal(data.sample(8, generator=gen(11)), data.sample(8, generator=gen(11)))
    _, comp = data.sample(50, generator=gen(12), labels=torch.full((50,), 1), return_components=True)
    assert (comp == 1).all()


def test_exact_teacher_is_the_data_velocity():
    data = GaussianMixtureData.random((2, 3, 3), num_components=3, std=0.25, generator=gen(13))
    x = torch.randn(4, 2, 3, 3, generator=gen(14))
    t = torch.tensor([999.0, 600.0, 250.0, 3.0])
    teacher = ExactGMTeacher(data)
    u = teacher(x, t)
    assert u.dtype == torch.float32 and not list(teacher.parameters())
    torch.testing.assert_close(u, data.velocity(x, t / 1000))
    torch.testing.assert_close(ExactGMTeacher(data, num_train_timesteps=1)(x, t / 1000), u)
    torch.testing.assert_close(teacher(x.double(), 600.0), data.velocity(x.double(), 0.6))


def test_extreme_inputs_stay_finite():
    means = torch.randn(3, 6, generator=gen(15), dtype=torch.float64)
    data = GaussianMixtureData(means, torch.tensor([0.0, 0.05, 1e-4]))  # a point mass among them
    x = torch.randn(5, 6, generator=gen(16)) * 50
    for sigma in (0.0, 1e-7, 1e-3, 0.5, 1.0):
        assert torch.isfinite(data.velocity(x, sigma)).all()
    assert torch.isfinite(data.velocity(x.half(), 0.3)).all()


def test_bad_mixtures_are_rejected():
    means = torch.randn(3, 4)
    with pytest.raises(ValueError, match="stds must be finite and >= 0"):
        GaussianMixtureData(means, torch.tensor([0.1, -0.1, 0.2]))
    with pytest.raises(ValueError, match=r"stds must be a float or a \(3,\) tensor"):
        GaussianMixtureData(means, torch.ones(2))
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        GaussianMixtureData(means, 0.1, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"means must have shape \(M, \*shape\)"):
        GaussianMixtureData(torch.randn(4), 0.1)
    with pytest.raises(ValueError, match=r"x_t must have shape \(n, 4\)"):
        GaussianMixtureData(means, 0.1).velocity(torch.randn(2, 5), 0.5)


class CountingModel:
    """A teacher that records its calls; the velocity depends on the label so the branches differ."""

    def __init__(self, data):
        self.teacher = ExactGMTeacher(data)
        self.calls = []

    def __call__(self, x_t, timestep, labels=None):
        self.calls.append(labels)
        return SimpleNamespace(sample=self.teacher(x_t, timestep, labels=labels))


@pytest.mark.parametrize("unit", ["sigma", "timestep"])
def test_cfg_inside_and_outside_the_interval(unit):
    data = GaussianMixtureData.random((2, 3, 3), num_components=4, std=0.2, generator=gen(17))
    model = CountingModel(data)
    interval = (0.0, 0.6) if unit == "sigma" else (0.0, 600.0)
    cfg_teacher = CFGTeacher(model, 3.0, interval, interval_unit=unit, uncond_kwargs={"labels": None})
    x = torch.randn(4, 2, 3, 3, generator=gen(18))
    t = torch.tensor([900.0, 600.0, 300.0, 700.0])
    labels = torch.tensor([0, 1, 2, 3])
    v = cfg_teacher(x, t, labels=labels)
    v_cond = data.velocity(x, t / 1000, labels)
    v_uncond = data.velocity(x, t / 1000)
    inside = torch.tensor([False, True, True, False]).reshape(4, 1, 1, 1)
    torch.testing.assert_close(v, torch.where(inside, v_uncond + 3.0 * (v_cond - v_uncond), v_cond))
    assert not torch.allclose(v_cond, v_uncond)
    assert len(model.calls) == 2 and model.calls[1] is None


def test_cfg_skips_the_unconditional_branch_when_unused():
    data = GaussianMixtureData.random((2, 3, 3), num_components=2, std=0.2, generator=gen(19))
    x = torch.randn(2, 2, 3, 3, generator=gen(20))
    labels = torch.tensor([0, 1])
    model = CountingModel(data)
    torch.testing.assert_close(
        CFGTeacher(model, 1.0, uncond_kwargs={"labels": None})(x, 500.0, labels=labels), data.velocity(x, 0.5, labels)
    )
    assert len(model.calls) == 1
    model = CountingModel(data)
    out = CFGTeacher(model, 4.0, (0.0, 0.3), uncond_kwargs={"labels": None})(x, torch.tensor([800.0, 900.0]), labels=labels)
    torch.testing.assert_close(out, data.velocity(x, torch.tensor([0.8, 0.9]), labels))
    assert len(model.calls) == 1
    with pytest.raises(ValueError, match="lo <= hi"):
        CFGTeacher(model, 2.0, (0.8, 0.2))
    with pytest.raises(ValueError, match="interval_unit"):
        CFGTeacher(model, 2.0, (0.0, 0.5), interval_unit="steps")


@pytest.mark.parametrize("parameterization", ["velocity", "neg_velocity", "x0", "eps"])
def test_diffusers_adapter_parameterizations(parameterization):
    data = GaussianMixtureData.random((2, 3, 5), num_components=3, std=0.3, generator=gen(21))
    seen = []

    def model(x, timestep, scale=1.0):
        seen.append(timestep.clone())
        sigma = (1000 - timestep / 1e-3) / 1000  # undo flip and scale below
        u = data.velocity(x.double(), sigma).float()
        pred = {
            "velocity": u,
            "neg_velocity": -u,
            "x0": x - sigma.reshape(-1, 1, 1, 1) * u,
            "eps": x + (1 - sigma.reshape(-1, 1, 1, 1)) * u,
        }[parameterization]
        return (pred * scale,)

    teacher = DiffusersTeacher(model, parameterization, timestep_scale=1e-3, flip_timesteps=True, model_kwargs={"scale": 1.0})
    x = torch.randn(3, 2, 3, 5, generator=gen(22))
    t = torch.tensor([900.0, 450.0, 120.0])
    torch.testing.assert_close(teacher(x, t), data.velocity(x, t / 1000), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen[0], (1000 - t) * 1e-3)


def test_as_velocity_reads_model_outputs():
    u = torch.randn(2, 3)
    assert as_velocity(u) is u
    assert as_velocity(SimpleNamespace(sample=u)) is u
    assert as_velocity((u, None)) is u
    assert as_velocity({"sample": u}) is u
    with pytest.raises(TypeError, match="velocity tensor"):
        as_velocity(None)
    with pytest.raises(ValueError, match="parameterization"):
        DiffusersTeacher(lambda x, t: x, "v")
