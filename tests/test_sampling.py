"""piflow_kernels.sample: the few-step loop for any student callable, against the literal reference loop."""

import pytest
import torch
from conftest import TOL, rel_err
from piflow_kernels.reference.sampler import flowmap_sde_sample

from piflow_kernels import DXOutput, GMFlowOutput
from piflow_kernels import reference as R

diffusers = pytest.importorskip("diffusers")  # the scheduler is a diffusers scheduler
from piflow_kernels.sampling import sample  # noqa: E402
from piflow_kernels.scheduler import PiFlowScheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("eager_cpu")  # as in test_scheduler: eager CPU path, one intra-op thread


class TinyStudent:
    """A network-free student whose policy depends on x_t and the timestep (so the loop's inputs matter).

    GMFlow: means_k = a_k * x + b_k * sigma + c_k, logweights = log_softmax(w_k . x), logstds = -1 + sigma / 2.
    DX: grid_n = a_n * x + b_n * sigma. Parameters are cast to the dtype of x (float64 for the reference).
    """

    def __init__(self, policy_type="GMFlow", k=3, c=4, ndim=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        ones = [1] * ndim
        self.policy_type = policy_type
        self.a = 0.3 * torch.randn(1, k, c, *ones, generator=g)
        self.b = torch.randn(1, k, c, *ones, generator=g)
        self.c = 0.5 * torch.randn(1, k, c, *ones, generator=g)
        self.w = torch.randn(1, k, c, *ones, generator=g)
        self.calls = []

    def __call__(self, x, timestep, scale=1.0):
        self.calls.append(timestep)
        p = {name: getattr(self, name).to(x.dtype) for name in "abcw"}
        t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1)
        sigma = (t / 1000).reshape(-1, *([1] * (x.dim())))  # (B or 1, 1, 1, *1)
        xk = x.unsqueeze(1)
        if self.policy_type == "DX":
            return DXOutput(grid=scale * (p["a"] * xk + p["b"] * sigma))
        logstds = (-1.0 + 0.5 * sigma).expand(x.shape[0], *sigma.shape[1:])
        return GMFlowOutput(
            means=scale * (p["a"] * xk + p["b"] * sigma + p["c"]),
            logweights=torch.log_softmax((p["w"] * xk).sum(2, keepdim=True), dim=1),
            logstds=logstds.clone(),
        )


def _noise(shape, seed=1, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("nfe", range(1, 9), ids=lambda n: f"nfe{n}")
def test_sample_matches_reference_loop_deterministic(nfe):
    student = TinyStudent("GMFlow", k=3, c=4)
    noise = _noise((2, 4, 6, 5))
    sched = PiFlowScheduler(shift=3.0, temperature=0.7, total_substeps=32)
    out = sample(student, noise, nfe, scheduler=sched, progress=False)
    assert len(student.calls) == nfe
    for t, t_sched in zip(student.calls, sched.timesteps):
        assert t.shape == (2,) and t.dtype == torch.float32 and bool((t == t_sched).all())
    ref = flowmap_sde_sample(student, noise.double(), nfe, h=0.0, temperature=0.7, total_substeps=32, shift=3.0)
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]


STOCHASTIC = {
    "GM-h0.5-f0.5": dict(policy_type="GMFlow", h=0.5, final_step_size_scale=0.5, dynamic=False),
    "GM-hinf-dynamic_shift": dict(policy_type="GMFlow", h="inf", final_step_size_scale=1.0, dynamic=True),
    "DX-h0.5-dynamic_shift": dict(policy_type="DX", h=0.5, final_step_size_scale=0.5, dynamic=True),
    "DX-h0-f0.5": dict(policy_type="DX", h=0.0, final_step_size_scale=0.5, dynamic=False),
}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_sample_matches_reference_loop_stochastic(name):
    cfg = STOCHASTIC[name]
    nfe, shape = 3, (2, 3, 7, 6)
    student = TinyStudent(cfg["policy_type"], k=4, c=3, seed=2)
    noise = _noise(shape)
    segment = 1 / (nfe - 1 + cfg["final_step_size_scale"])
    sched = PiFlowScheduler(
        shift=2.0,
        use_dynamic_shifting=cfg["dynamic"],
        h=cfg["h"],
        final_step_size_scale=cfg["final_step_size_scale"],
        total_substeps=32,
        policy_type=cfg["policy_type"],
        temperature=0.8,
        dx_segment_size=segment,
        dx_shift=2.0,
    )
    out = sample(student, noise, nfe, scheduler=sched, generator=torch.Generator().manual_seed(9), progress=False)
    # the scheduler draws one noise per step that re-noises (every step but the last when h != 0)
    g = torch.Generator().manual_seed(9)
    draws = nfe - 1 if cfg["h"] != 0.0 else 0
    step_noises = [torch.randn(shape, generator=g).double() for _ in range(draws)]
    step_noises += [torch.zeros(shape, dtype=torch.float64)] * (nfe - draws)
    shift = R.dynamic_shift(7 * 6) if cfg["dynamic"] else 2.0
    assert sched.shift == pytest.approx(shift, rel=1e-12)
    ref = flowmap_sde_sample(
        student,
        noise.double(),
        nfe,
        h=cfg["h"],
        step_noises=step_noises,
        policy_type=cfg["policy_type"],
        temperature=0.8,
        total_substeps=32,
        shift=shift,
        final_step_size_scale=cfg["final_step_size_scale"],
        segment_size=segment,
        dx_shift=2.0,
    )
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]


def test_generator_reproducibility():
    student, noise = TinyStudent(), _noise((1, 4, 5, 5))
    run = lambda seed: sample(  # noqa: E731
        student, noise, 3, PiFlowScheduler(h=1.0, total_substeps=16), torch.Generator().manual_seed(seed), progress=False
    )
    first, again, other = run(0), run(0), run(1)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other).abs().max() > 1e-2


def test_model_kwargs_reach_the_student():
    noise = _noise((1, 4, 5, 5))
    plain = sample(TinyStudent(), noise, 2, PiFlowScheduler(total_substeps=16), progress=False)
    scaled = sample(TinyStudent(), noise, 2, PiFlowScheduler(total_substeps=16), progress=False, scale=0.5)
    ref = flowmap_sde_sample(lambda x, t: TinyStudent()(x, t, scale=0.5), noise.double(), 2, total_substeps=16)
    assert rel_err(scaled, ref) < TOL["rollout"][torch.float32]
    assert (plain - scaled).abs().max() > 1e-2


def test_default_scheduler_is_plain_piflow_scheduler():
    noise = _noise((1, 4, 4, 4))
    torch.testing.assert_close(
        sample(TinyStudent(), noise, 2, progress=False),
        sample(TinyStudent(), noise, 2, scheduler=PiFlowScheduler(), progress=False),
        rtol=0,
        atol=0,
    )


def test_progress_bar_counts_student_calls(capsys):
    sample(TinyStudent(), _noise((1, 4, 4, 4)), 3, PiFlowScheduler(total_substeps=8), progress=True)
    err = capsys.readouterr().err
    assert "pi-Flow sampling" in err and "3/3" in err
    sample(TinyStudent(), _noise((1, 4, 4, 4)), 3, PiFlowScheduler(total_substeps=8), progress=False)
    assert capsys.readouterr().err == ""


def test_video_latents_and_bf16():
    student = TinyStudent(k=2, c=3, ndim=3)
    noise = _noise((1, 3, 2, 4, 5))
    out = sample(student, noise, 2, PiFlowScheduler(total_substeps=16), progress=False)
    assert out.shape == noise.shape
    ref = flowmap_sde_sample(student, noise.double(), 2, total_substeps=16)
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]
    out_bf16 = sample(student, noise.bfloat16(), 2, PiFlowScheduler(total_substeps=16), progress=False)
    assert out_bf16.dtype == torch.bfloat16
    assert rel_err(out_bf16, ref) < 5e-2


def test_bad_input():
    noise = _noise((1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"noise must have shape \(B, C, H, W\) or \(B, C, T, H, W\), got \(4, 4, 4\)"):
        sample(TinyStudent(), noise[0], 2, progress=False)
    with pytest.raises(TypeError, match="noise must be a floating-point tensor"):
        sample(TinyStudent(), [noise], 2, progress=False)
    with pytest.raises(TypeError, match=r"student must be callable as student\(x_t, timestep"):
        sample("not a model", noise, 2, progress=False)
    with pytest.raises(TypeError, match=r"scheduler must be a PiFlowScheduler, got FlowMatchEulerDiscreteScheduler"):
        sample(TinyStudent(), noise, 2, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), progress=False)
    with pytest.raises(TypeError, match="got a tensor as model_output.*not a policy"):
        sample(lambda x, t: torch.randn_like(x), noise, 2, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        sample(TinyStudent(), noise, 0, progress=False)
