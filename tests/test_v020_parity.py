"""Parity with LakonLab v0.2.0's sampler: the substep-count rule ("ceil" by default, "round" selectable) on every
rollout path against the reference, and the FlowMapSDE options (sqrt dynamic shift, min_raw_t / max_raw_t,
use_fp64, custom sigmas), each against numbers or a loop written out here."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import TOL, rel_err
from ops.op_cases import device_for, dx_flat, implementation, ref_dx_velocity, ref_gm_velocity_flat
from piflow_kernels.reference.rollout import num_substeps as ref_num_substeps
from piflow_kernels.reference.sampler import flowmap_sde_sample

import piflow_kernels as pk
from piflow_kernels import reference as R
from piflow_kernels.distill import PiIDConfig
from piflow_kernels.ops.records import GMTensors, RolloutPlan
from piflow_kernels.sampling import flowmap_schedule, raw_sigma_grid
from piflow_kernels.timesteps import substep_count, unwarp, warp

pytestmark = pytest.mark.usefixtures("eager_cpu")

RULES = ("ceil", "round")


def official_counts(segment_lengths, total_substeps, rule):
    """The official count of each segment, with exact rational arithmetic: ceil (v0.2.0) or round half to even."""
    out = []
    for length in segment_lengths:
        p = length * total_substeps
        out.append(max(1, math.ceil(p) if rule == "ceil" else round(p)))  # round() of a Fraction: half to even
    return out


def plan_counts(sigmas, sigmas_dst, total_substeps, shift, rule):
    s0 = torch.tensor(sigmas[:-1], dtype=torch.float32)
    s1 = torch.tensor(sigmas_dst, dtype=torch.float32)
    return RolloutPlan.build(s0, s1, total_substeps, shift, rule).n_substeps.tolist()


# ------------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize("use_fp64", [True, False], ids=["fp64-schedule", "fp32-schedule"])
def test_default_four_step_schedule_counts(use_fp64):
    """The official pipelines' 4-step schedule (shift 3.2, final step 0.5, 128 substeps): segments of 1/3.5 raw time
    and a last one of 0.5/3.5; 128/3.5 = 36.57 and 64/3.5 = 18.29 substeps: ceil [37, 37, 37, 19], round [.., 18]."""
    lengths = [Fraction(2, 7)] * 3 + [Fraction(1, 7)]
    assert official_counts(lengths, 128, "ceil") == [37, 37, 37, 19]
    assert official_counts(lengths, 128, "round") == [37, 37, 37, 18]
    sched = pk.PiFlowScheduler(shift=3.2, final_step_size_scale=0.5, use_fp64=use_fp64)
    sched.set_timesteps(4)
    schedule = sched._schedule
    for rule in RULES:
        assert plan_counts(schedule.sigmas, schedule.sigmas_dst, 128, 3.2, rule) == official_counts(lengths, 128, rule)


@pytest.mark.parametrize("shift", [1.0, 3.2, 5.0, math.exp(1.15)], ids=lambda s: f"shift{s:.3g}")
@pytest.mark.parametrize("use_fp64", [True, False], ids=["fp64-schedule", "fp32-schedule"])
def test_ceil_of_an_exact_integer_adds_no_substep(shift, use_fp64):
    """Uniform grids whose products are integers up to float rounding (0.25 * 128 = 32): ceil gives that integer,
    never one more; non-integral products (fractional part far above the slack) give the exact ceil."""
    for n in range(1, 17):
        for total in (128, 64, 100, 48):
            lengths = [Fraction(1, n)] * n
            fractional = {float(p - math.floor(p)) for p in (length * total for length in lengths)}
            assert all(f == 0 or f > 1e-2 for f in fractional)  # no case within the slack of an integer
            schedule = flowmap_schedule(raw_sigma_grid(n), shift, use_fp64=use_fp64)
            for rule in RULES:
                if rule == "round" and 0.5 in fractional:
                    continue  # a half-integer rounds either way under float noise: no exact answer to compare
                got = plan_counts(schedule.sigmas, schedule.sigmas_dst, total, shift, rule)
                assert got == official_counts(lengths, total, rule), (n, total, rule)


def test_substep_count_host_and_tensor_agree():
    deltas = [0.25, 0.25 + 2e-7, 0.25 - 2e-7, 0.3, 1 / 7, 1e-9, 0.0, 1.0]
    for rule in RULES:
        host = [substep_count(d, 128, rule) for d in deltas]
        dev = substep_count(torch.tensor(deltas, dtype=torch.float64), 128, rule).tolist()
        assert host == dev
    assert [substep_count(d, 128, "ceil") for d in deltas] == [32, 32, 32, 39, 19, 1, 1, 128]
    assert [substep_count(d, 128, "round") for d in deltas] == [32, 32, 32, 38, 18, 1, 1, 128]
    # the reference follows the same rule
    for rule in RULES:
        assert ref_num_substeps(torch.tensor(deltas, dtype=torch.float64), 128, rule).tolist() == [
            int(substep_count(d, 128, rule)) for d in deltas
        ]


# three samples: raw lengths 0.33 (5.28 substeps at 16: ceil 6, round 5), 0.25 (4 exactly) and 0.14 (2.24: 3 vs 2)
SHIFT, TOTAL = 2.0, 16
R_START = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
R_END = R_START - torch.tensor([0.33, 0.25, 0.14], dtype=torch.float64)


def rollout_sigmas():
    return warp(R_START, SHIFT).float(), warp(R_END, SHIFT).float()


def test_the_rules_differ_on_these_samples():
    s0, s1 = rollout_sigmas()
    assert RolloutPlan.build(s0, s1, TOTAL, SHIFT, "ceil").n_substeps.tolist() == [6, 4, 3]
    assert RolloutPlan.build(s0, s1, TOTAL, SHIFT, "round").n_substeps.tolist() == [5, 4, 2]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", ["torch", "native", "triton", "reference"])
@pytest.mark.parametrize("per_component", [False, True], ids=["std-per-sample", "std-per-comp"])
def test_gm_rollout_backends_follow_the_rule(impl, rule, per_component):
    fn = implementation("gm_rollout", impl)
    g = torch.Generator().manual_seed(3)
    b, k, c, length = 3, 4, 3, 10
    s0, s1 = rollout_sigmas()
    policy = GMTensors(
        torch.randn(b, k, c, length, generator=g),
        torch.randn(b, k, length, generator=g).log_softmax(1),
        torch.randn(b, k if per_component else 1, generator=g) * 0.3 - 0.7,
        torch.randn(b, c, length, generator=g),
        s0.clone(),
    )
    x = policy.x_src + 0.1 * torch.randn(b, c, length, generator=g)
    dev = device_for(impl)  # Triton: CUDA with a GPU, the interpreter on CPU without
    plan = RolloutPlan.build(s0.to(dev), s1.to(dev), TOTAL, SHIFT, rule)
    out = fn(x.to(dev), GMTensors(*(t.to(dev) for t in policy)), plan).cpu()
    ref = R.rollout(lambda y, s: ref_gm_velocity_flat(y, s, policy), x.double(), s0.double(), s1.double(), TOTAL, SHIFT, rule)
    other = R.rollout(
        lambda y, s: ref_gm_velocity_flat(y, s, policy), x.double(), s0.double(), s1.double(), TOTAL, SHIFT,
        "round" if rule == "ceil" else "ceil",
    )  # fmt: skip
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]
    assert rel_err(other, ref) > 10 * TOL["rollout"][torch.float32]  # the rule shows in the result


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
@pytest.mark.parametrize("mode", ["grid", "polynomial"])
def test_dx_rollout_backends_follow_the_rule(impl, rule, mode):
    fn = implementation("dx_rollout", impl)
    g = torch.Generator().manual_seed(4)
    b, n, c, spatial = 3, 4, 2, (3, 4)
    s0, s1 = rollout_sigmas()
    grid = torch.randn(b, n, c, *spatial, generator=g)
    x_src = torch.randn(b, c, *spatial, generator=g)
    x = x_src + 0.1 * torch.randn(x_src.shape, generator=g)
    dev = device_for(impl)
    policy = dx_flat(grid.to(dev), x_src.to(dev), s0.clone().to(dev), 0.4, 1.5, mode)
    plan = RolloutPlan.build(s0.to(dev), s1.to(dev), TOTAL, SHIFT, rule)
    out = fn(x.reshape(b, c, -1).to(dev), policy, plan).reshape(x.shape).cpu()

    def velocity(y, s):
        return ref_dx_velocity(y, s, grid, x_src, s0, 0.4, 1.5, mode)

    ref = R.rollout(velocity, x.double(), s0.double(), s1.double(), TOTAL, SHIFT, rule)
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]


@pytest.mark.parametrize("rule", RULES)
def test_policy_rollout_takes_the_rule(rule):
    g = torch.Generator().manual_seed(5)
    s0, s1 = rollout_sigmas()
    means, x_src = torch.randn(3, 2, 2, 3, 3, generator=g), torch.randn(3, 2, 3, 3, generator=g)
    lw = torch.randn(3, 2, 1, 3, 3, generator=g).log_softmax(1)
    ls = torch.full((3, 1, 1, 1, 1), -0.5)
    pol = pk.GMFlowPolicy(means, lw, ls, x_src, s0)
    out = pol.rollout(x_src, s0, s1, TOTAL, shift=SHIFT, substep_rule=rule)

    def velocity(y, s):
        return R.gm_velocity(y, s, means.double(), lw.double(), ls.double(), x_src.double(), s0.double())

    ref = R.rollout(velocity, x_src.double(), s0.double(), s1.double(), TOTAL, SHIFT, rule)
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]
    # the default is ceil
    if rule == "ceil":
        assert torch.equal(pol.rollout(x_src, s0, s1, TOTAL, shift=SHIFT), out)


def test_bad_substep_rule():
    g = torch.Generator().manual_seed(6)
    x_src = torch.randn(1, 2, 2, 2, generator=g)
    pol = pk.DXPolicy(torch.randn(1, 3, 2, 2, 2, generator=g), x_src, 0.8)
    for bad in ("floor", "ROUND", None, 1):
        with pytest.raises(ValueError, match="substep_rule"):
            pol.rollout(x_src, 0.8, 0.2, substep_rule=bad)
    with pytest.raises(ValueError, match="substep_rule"):
        pk.PiFlowScheduler(substep_rule="floor")
    with pytest.raises(ValueError, match="substep_rule"):
        PiIDConfig(substep_rule="floor")
    with pytest.raises(ValueError, match="substep_rule"):
        R.rollout(lambda y, s: y, x_src.double(), 0.8, 0.2, 8, 1.0, "floor")
    # the oracle backend follows the rule it is given (its rollout is the reference's, with the plan's rule)
    ref_pol = pk.DXPolicy(torch.randn(1, 3, 2, 2, 2, generator=g), x_src, 0.8, backend="reference")
    # (0.8 - 0.2) * 7 = 4.2 substeps: ceil 5, round 4
    by_rule = {rule: ref_pol.rollout(x_src, 0.8, 0.2, total_substeps=7, substep_rule=rule) for rule in RULES}
    torch_pol = pk.DXPolicy(ref_pol.grid, x_src, 0.8, backend="torch")
    for rule, out in by_rule.items():
        assert rel_err(out, torch_pol.rollout(x_src, 0.8, 0.2, total_substeps=7, substep_rule=rule)) < 1e-5, rule
    assert rel_err(by_rule["ceil"], by_rule["round"]) > 1e-3


# ------------------------------------------------------------------------------------ the sampler


class Student:
    """A deterministic GM student: a fixed function of (x, t), so a hand-written loop can call it again."""

    def __init__(self, k=3, c=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(k, c, c, generator=g) * 0.5
        self.b = torch.randn(k, c, generator=g)

    def __call__(self, x, t, **kwargs):
        s = (t.float() / 1000).reshape(-1, 1, 1, *([1] * (x.dim() - 2)))
        means = torch.einsum("kdc,bc...->bkd...", self.w, x.float()) + self.b[None, :, :, None, None] * (1 - s)
        logweights = torch.log_softmax(means.mean(2, keepdim=True), dim=1)
        logstds = torch.full((x.shape[0], 1, 1, 1, 1), -1.0) + 0 * s
        return pk.GMFlowOutput(means=means, logweights=logweights, logstds=logstds)


def hand_loop(student, noise, raw, shift, h=0.0, total=32, rule="ceil", step_noises=None, temperature=1.0):
    """The FlowMapSDE loop written out in float64: x = sigma_0 * noise, then per step the policy of the student's
    output, its rollout to sigma_dst (reference.rollout under ``rule``) and the re-noising."""
    sig = [shift * r / (1 + (shift - 1) * r) for r in raw] + [0.0]
    x = sig[0] * noise.double()
    n = len(raw)
    for i in range(n):
        out = student(x.float(), torch.tensor([sig[i] * 1000] * x.shape[0], dtype=torch.float32)).to_dict()
        out = {name: v.double() for name, v in out.items()}
        lw, ls = R.gm_apply_temperature(out["logweights"], out["logstds"], temperature if i < n - 1 else 1.0)
        x_src, s_src, s_to = x, sig[i], sig[i + 1]

        def velocity(y, s, out=out, lw=lw, ls=ls, x_src=x_src, s_src=s_src):
            return R.gm_velocity(y, s, out["means"], lw, ls, x_src, torch.tensor(s_src, dtype=torch.float64))

        if h == 0.0:
            m, s_dst = 1.0, s_to
        else:
            m = (s_to * (1 - s_src) / max(s_src * (1 - s_to), 1e-6)) ** (h * h)
            s_dst = s_to * m / max(1 - s_to + s_to * m, 1e-6)
        x_dst = R.rollout(velocity, x, s_src, s_dst, total, shift, rule)
        x = (1 - s_to + s_to * m) * x_dst
        if step_noises is not None and s_to * math.sqrt(max(1 - m * m, 0.0)) > 0:
            x = x + s_to * math.sqrt(max(1 - m * m, 0.0)) * step_noises[i].double()
    return x


def _noise(shape=(2, 2, 4, 4), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", RULES)
def test_scheduler_substep_rule_end_to_end(rule):
    student, noise = Student(), _noise()
    sched = pk.PiFlowScheduler(shift=3.2, final_step_size_scale=0.5, total_substeps=32, substep_rule=rule)
    assert sched.config.substep_rule == rule
    out = pk.sample(student, noise, 4, sched, progress=False)
    ref = hand_loop(student, noise, raw_sigma_grid(4, 0.5), 3.2, total=32, rule=rule)
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]
    other = hand_loop(student, noise, raw_sigma_grid(4, 0.5), 3.2, total=32, rule="round" if rule == "ceil" else "ceil")
    assert rel_err(other, ref) > 1e-3
    # the default sampler (no scheduler) is PiFlowScheduler()'s: ceil
    if rule == "ceil":
        plain = pk.sample(student, noise, 3, progress=False)
        assert rel_err(plain, hand_loop(student, noise, raw_sigma_grid(3), 1.0, total=128)) < TOL["rollout"][torch.float32]


def test_sqrt_dynamic_shift():
    cfg = dict(base_seq_len=256, max_seq_len=4096, base_logshift=0.5, max_logshift=1.15)
    for seq_len in (16, 256, 1024, 4096, 9000):
        by_hand = math.exp(0.5) + (math.exp(1.15) - math.exp(0.5)) * (math.sqrt(seq_len) - 16) / (64 - 16)
        sched = pk.PiFlowScheduler(use_dynamic_shifting=True, dynamic_shifting_type="sqrt", **cfg)
        assert sched.get_shift(seq_len=seq_len) == pytest.approx(by_hand, rel=1e-12)
        assert R.dynamic_shift(seq_len, shift_type="sqrt", **cfg) == pytest.approx(by_hand, rel=1e-12)
        sched.set_timesteps(3, seq_len=seq_len)
        expect = [by_hand * r / (1 + (by_hand - 1) * r) for r in (1.0, 2 / 3, 1 / 3)] + [0.0]
        torch.testing.assert_close(sched.sigmas.double(), torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-7)
    # the exp type is unchanged, and mu still means the log-shift
    exp_sched = pk.PiFlowScheduler(use_dynamic_shifting=True)
    assert exp_sched.get_shift(seq_len=1024) == pytest.approx(R.dynamic_shift(1024), rel=1e-12)
    sqrt_sched = pk.PiFlowScheduler(use_dynamic_shifting=True, dynamic_shifting_type="sqrt")
    assert sqrt_sched.get_shift(mu=0.7) == pytest.approx(math.exp(0.7), rel=1e-12)
    # end to end, the shift a sample run gets from the latents' size
    student, noise = Student(), _noise((1, 2, 6, 6))
    sched = pk.PiFlowScheduler(use_dynamic_shifting=True, dynamic_shifting_type="sqrt", total_substeps=16, **cfg)
    out = pk.sample(student, noise, 2, sched, progress=False)
    shift = math.exp(0.5) + (math.exp(1.15) - math.exp(0.5)) * (6 - 16) / 48
    assert rel_err(out, hand_loop(student, noise, [1.0, 0.5], shift, total=16)) < TOL["rollout"][torch.float32]


@pytest.mark.parametrize(
    "lo, hi, f", [(0.0, 0.8, 1.0), (0.1, 1.0, 0.5), (0.2, 0.9, 0.5)], ids=["max0.8", "min0.1-f0.5", "min0.2-max0.9"]
)
def test_raw_t_range(lo, hi, f):
    n, shift = 4, 2.0
    raw = [hi - i * (hi - lo) / (n - 1 + f) for i in range(n)]  # the official linspace, written out
    sched = pk.PiFlowScheduler(shift=shift, final_step_size_scale=f, min_raw_t=lo, max_raw_t=hi, total_substeps=32)
    assert sched.raw_sigmas(n) == pytest.approx(raw, abs=1e-15)
    sched.set_timesteps(n)
    expect = [shift * r / (1 + (shift - 1) * r) for r in raw] + [0.0]
    torch.testing.assert_close(sched.sigmas.double(), torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-7)
    assert sched.init_noise_sigma == pytest.approx(expect[0], rel=1e-12)
    ref_sigmas = R.flowmap_sde_sigmas(n, shift, f, lo, hi)
    torch.testing.assert_close(ref_sigmas, torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-12)
    # the loop starts from sigma_0 * noise, as LakonLab's samplers do
    student, noise = Student(), _noise()
    out = pk.sample(student, noise, n, sched, progress=False)
    ref = hand_loop(student, noise, raw, shift, total=32)
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]
    ref2 = flowmap_sde_sample(
        lambda x, t: {k: v.double() for k, v in student(x.float(), torch.tensor([t] * x.shape[0])).to_dict().items()},
        noise.double(), n, total_substeps=32, shift=shift, final_step_size_scale=f, min_raw_t=lo, max_raw_t=hi,
    )  # fmt: skip
    assert rel_err(ref2, ref) < 1e-9


def official_float32_schedule(raw, shift, h):
    """LakonLab v0.2.0's FlowMapSDE.set_timesteps and calculate_sigmas_dst with use_fp64=False, written out."""
    sigmas = torch.from_numpy(np.array(raw, dtype=np.float32)).clamp(min=0)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    alphas = 1 - sigmas
    if h == "inf":
        m = torch.zeros_like(sigmas[:-1])
    else:
        m = (sigmas[1:] * alphas[:-1] / (sigmas[:-1] * alphas[1:]).clamp(min=1e-6)) ** (h * h)
    dst = sigmas[1:] * m / (alphas[1:] + sigmas[1:] * m).clamp(min=1e-6)
    return sigmas, dst, m


@pytest.mark.parametrize("h", [0.5, 1.0, "inf"])
@pytest.mark.parametrize("shift", [1.0, 3.2, 1.7])
def test_use_fp64_false_is_the_official_float32_schedule(h, shift):
    sched = pk.PiFlowScheduler(shift=shift, final_step_size_scale=0.5, h=h, use_fp64=False)
    sched.set_timesteps(4)
    sigmas, dst, m = official_float32_schedule(np.linspace(1.0, 0.5 / 3.5, 4), shift, h)
    assert torch.equal(sched.sigmas, sigmas)
    assert torch.equal(sched.sigmas_dst, dst)
    assert torch.equal(sched.timesteps, sigmas[:-1] * 1000)
    assert sched._schedule.scales == (1 - sigmas[1:] + sigmas[1:] * m).tolist()
    # the float64 schedule (the default) agrees to float32 rounding, except where the float32 warp(1) lands below 1
    fp64 = pk.PiFlowScheduler(shift=shift, final_step_size_scale=0.5, h=h)
    fp64.set_timesteps(4)
    assert fp64.config.use_fp64 is True
    torch.testing.assert_close(fp64.sigmas, sched.sigmas, rtol=0, atol=1e-6)
    # h = 0: the destinations are the next sigmas and nothing is re-noised, in both precisions
    det = pk.PiFlowScheduler(shift=shift, use_fp64=False)
    det.set_timesteps(3)
    assert torch.equal(det.sigmas_dst, det.sigmas[1:]) and det._schedule.noise_scales == [0.0] * 3


def test_use_fp64_sampling_end_to_end():
    student, noise = Student(), _noise()
    for use_fp64 in (True, False):
        sched = pk.PiFlowScheduler(shift=2.0, total_substeps=32, use_fp64=use_fp64, h=0.0)
        out = pk.sample(student, noise, 3, sched, progress=False)
        assert rel_err(out, hand_loop(student, noise, [1.0, 2 / 3, 1 / 3], 2.0, total=32)) < TOL["rollout"][torch.float32]


@pytest.mark.parametrize("raw", [[1.0, 0.7, 0.3], [0.85, 0.5, 0.2, 0.05]], ids=["from1", "from0.85"])
def test_custom_sigmas(raw):
    shift, student, noise = 2.5, Student(), _noise()
    expect = [shift * r / (1 + (shift - 1) * r) for r in raw] + [0.0]
    sched = pk.PiFlowScheduler(shift=shift, total_substeps=32)
    sched.set_timesteps(sigmas=raw)
    assert sched.num_inference_steps == len(raw)
    torch.testing.assert_close(sched.sigmas.double(), torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-7)
    assert sched.init_noise_sigma == pytest.approx(expect[0], rel=1e-12)
    ref = hand_loop(student, noise, raw, shift, total=32)
    out = pk.sample(student, noise, None, sched, sigmas=raw, progress=False)
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]
    # diffusers-free, with the default shift 1
    plain = pk.sample(student, noise, len(raw), sigmas=torch.tensor(raw), progress=False)
    assert rel_err(plain, hand_loop(student, noise, raw, 1.0, total=128)) < TOL["rollout"][torch.float32]
    # the reference's loop with the same raw levels
    ref2 = flowmap_sde_sample(
        lambda x, t: {k: v.double() for k, v in student(x.float(), torch.tensor([t] * x.shape[0])).to_dict().items()},
        noise.double(), None, total_substeps=32, shift=shift, raw_sigmas=raw,
    )  # fmt: skip
    assert rel_err(ref2, ref) < 1e-9


def test_stochastic_with_new_options_matches_hand_loop():
    """h > 0 with max_raw_t < 1 and round: the scheduler's draws replayed into the hand-written loop."""
    student, noise = Student(), _noise()
    sched = pk.PiFlowScheduler(shift=2.0, h=0.7, total_substeps=24, max_raw_t=0.9, substep_rule="round")
    out = pk.sample(student, noise, 3, sched, generator=torch.Generator().manual_seed(9), progress=False)
    g = torch.Generator().manual_seed(9)
    step_noises = [torch.randn(noise.shape, generator=g) for _ in range(2)] + [None]
    raw = [0.9 - i * 0.9 / 3 for i in range(3)]
    ref = hand_loop(student, noise, raw, 2.0, h=0.7, total=24, rule="round", step_noises=step_noises)
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_raw_t=0.5, max_raw_t=0.5), "min_raw_t must be < max_raw_t"),
        (dict(min_raw_t=0.6, max_raw_t=0.4), "min_raw_t must be < max_raw_t"),
        (dict(max_raw_t=1.5), "max_raw_t must lie in"),
        (dict(min_raw_t=-0.1), "min_raw_t must lie in"),
        (dict(max_raw_t=float("nan")), "max_raw_t must be a finite number"),
        (dict(min_raw_t="0"), "min_raw_t must be a finite number"),
        (dict(dynamic_shifting_type="linear"), "dynamic_shifting_type"),
        (dict(use_fp64="yes"), "use_fp64"),
        (dict(substep_rule="nearest"), "substep_rule"),
    ],
)
def test_bad_scheduler_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pk.PiFlowScheduler(**kwargs)


@pytest.mark.parametrize(
    "sigmas, message",
    [
        ([1.0, 0.5, 0.5], "strictly decreasing"),
        ([0.3, 0.6], "strictly decreasing"),
        ([1.2, 0.5], r"\(0, 1\]"),
        ([1.0, 0.0], r"\(0, 1\]"),
        ([], "must not be empty"),
        ([[1.0, 0.5]], "1-D"),
    ],
)
def test_bad_sigmas(sigmas, message):
    sched = pk.PiFlowScheduler()
    with pytest.raises(ValueError, match=message):
        sched.set_timesteps(sigmas=sigmas)
    with pytest.raises(ValueError, match=message):
        pk.sample(Student(), _noise(), None, sigmas=sigmas, progress=False)
    with pytest.raises(ValueError, match="3 sigmas"):
        sched.set_timesteps(2, sigmas=[1.0, 0.6, 0.2])
    with pytest.raises(ValueError, match=r"needs num_inference_steps \(the number of student calls\) or sigmas"):
        pk.sample(Student(), _noise(), None, progress=False)


def test_options_survive_save_and_load(tmp_path):
    sched = pk.PiFlowScheduler(
        substep_rule="round", dynamic_shifting_type="sqrt", use_dynamic_shifting=True, min_raw_t=0.1, max_raw_t=0.9,
        use_fp64=False,
    )  # fmt: skip
    sched.save_config(tmp_path)
    loaded = pk.PiFlowScheduler.from_pretrained(tmp_path)
    for key in ("substep_rule", "dynamic_shifting_type", "min_raw_t", "max_raw_t", "use_fp64"):
        assert loaded.config[key] == sched.config[key]
    sched.set_timesteps(3, seq_len=1024)
    loaded.set_timesteps(3, seq_len=1024)
    assert torch.equal(loaded.sigmas, sched.sigmas)


def test_pi_id_and_demo_rules():
    """pi-ID rolls out under its config's rule (default ceil, as v0.2.0); the demo keeps round, its training rule,
    and samples with it."""
    assert PiIDConfig().substep_rule == "ceil"
    from piflow_kernels.demo.settings import FULL
    from piflow_kernels.demo.training import piid_config
    from piflow_kernels.distill.evaluation import scheduler_for

    for policy_type in ("GMFlow", "DX"):
        cfg = piid_config(policy_type, 2, FULL.student(policy_type))
        assert cfg.substep_rule == "round"
        assert scheduler_for(cfg).config.substep_rule == "round"
    assert scheduler_for(PiIDConfig()).config.substep_rule == "ceil"


def test_schedule_sigmas_feed_the_plan_unwarped():
    """A sanity check of the float path the counts take: unwarp of the float32 sigmas is within the ceil slack."""
    for shift in (1.0, 3.2, 7.0):
        for n in range(1, 17):
            for use_fp64 in (True, False):
                schedule = flowmap_schedule(raw_sigma_grid(n), shift, use_fp64=use_fp64)
                r = unwarp(torch.tensor(schedule.sigmas, dtype=torch.float32), shift).double()
                exact = torch.tensor([1 - i / n for i in range(n)] + [0.0], dtype=torch.float64)
                assert float((r - exact).abs().max()) < 1e-5 / 10


# ------------------------------------------------------------------------------------ the velocity's floor of sigma


def _gm_case(seed, b=3, k=4, c=2, hw=4):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(b, k, c, hw, hw, generator=g)
    logweights = torch.randn(b, k, 1, hw, hw, generator=g).log_softmax(1)
    logstds = torch.randn(b, 1, 1, 1, 1, generator=g) * 0.3
    x_src = torch.randn(b, c, hw, hw, generator=g)
    sigma_src = torch.rand(b, generator=g) * 0.5 + 0.05
    return means, logweights, logstds, x_src, sigma_src, torch.randn(b, c, hw, hw, generator=g)


def _ref_gm(x, sigma, means, logweights, logstds, x_src, sigma_src, eps):
    d = lambda t: torch.as_tensor(t).double()  # noqa: E731
    return R.gm_velocity(d(x), d(sigma), d(means), d(logweights), d(logstds), d(x_src), d(sigma_src), eps=eps)


LOW_SIGMAS = (3e-5, 1e-6, 0.0)  # below the official test-time eps 1e-4


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("seed", [0, 1])
def test_gm_velocity_eps_matches_the_reference_at_that_eps(backend, seed):
    """velocity_eps=1e-4 gives the reference's u at eps 1e-4 below it (where the default 1e-6 differs by percents), and
    the built-in u bit for bit at or above it."""
    means, logweights, logstds, x_src, sigma_src, x = _gm_case(seed)
    plain = pk.GMFlowPolicy(means, logweights, logstds, x_src, sigma_src, backend=backend)
    for pol in (plain.with_velocity_eps(1e-4), pk.GMFlowPolicy(means, logweights, logstds, x_src, sigma_src,
                                                                backend=backend, velocity_eps=1e-4)):  # fmt: skip
        assert pol.velocity_eps == 1e-4
        for s in LOW_SIGMAS:
            sigma = torch.full((3,), s)
            ref = _ref_gm(x, sigma, means, logweights, logstds, x_src, sigma_src, 1e-4)
            assert rel_err(pol.velocity(x, sigma), ref) < TOL["velocity"][torch.float32], s
            assert rel_err(plain.velocity(x, sigma), ref) > 1e-3, s  # the floor matters there
        for s in (1e-4, 2e-3, 0.04):
            assert torch.equal(pol.velocity(x, torch.full((3,), s)), plain.velocity(x, torch.full((3,), s))), s
    # temperature and dropout keep the floor; None gives the built-in one back
    assert plain.with_velocity_eps(1e-4).temperature(0.5).velocity_eps == 1e-4
    assert plain.with_velocity_eps(1e-4).with_velocity_eps(None).velocity_eps is None


def test_gm_velocity_eps_fallbacks_and_the_reference_backend():
    """A source below eps, or an eps below the built-in 1e-6, cannot be put around the fast ops: the reference formula
    at that eps (float64) is used; the "reference" backend computes the reference at eps in float32 as its oracle."""
    means, logweights, logstds, x_src, sigma_src, x = _gm_case(3)
    low_src = sigma_src.clone()
    low_src[2] = 5e-5
    sigma = torch.tensor([3e-5, 1e-6, 2e-5])
    for eps, src in ((1e-4, low_src), (1e-8, sigma_src)):
        pol = pk.GMFlowPolicy(means, logweights, logstds, x_src, src, backend="torch", velocity_eps=eps)
        ref = _ref_gm(x, sigma, means, logweights, logstds, x_src, src, eps)
        assert rel_err(pol.velocity(x, sigma), ref) < TOL["velocity"][torch.float32], eps
    pol = pk.GMFlowPolicy(means, logweights, logstds, x_src, sigma_src, backend="reference", velocity_eps=1e-4)
    ref32 = R.gm_velocity(x, sigma, means, logweights, logstds, x_src, sigma_src, eps=1e-4)
    assert rel_err(pol.velocity(x, sigma), ref32) < 1e-6


def test_gm_rollout_eps():
    """A rollout whose substeps start below eps runs them at eps (the reference rollout over the eps velocity); one
    that never goes below it is the built-in fused rollout, bit for bit."""
    means, logweights, logstds, x_src, sigma_src, _ = _gm_case(4)
    plain = pk.GMFlowPolicy(means, logweights, logstds, x_src, sigma_src, backend="torch")
    pol = plain.with_velocity_eps(1e-4)
    assert torch.equal(pol.rollout(x_src, sigma_src, 0.0, 128, 3.2), plain.rollout(x_src, sigma_src, 0.0, 128, 3.2))
    total = 12000  # the last substep starts near 4e-5
    out = pol.rollout(x_src, sigma_src, 0.0, total)

    def velocity(y, s):
        return _ref_gm(y, s, means, logweights, logstds, x_src, sigma_src, 1e-4)

    ref = R.rollout(velocity, x_src.double(), sigma_src.double(), torch.zeros(3, dtype=torch.float64), total)
    assert rel_err(out, ref) < TOL["rollout"][torch.float32]


@pytest.mark.parametrize("mode", ["grid", "polynomial"])
@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_dx_velocity_eps(mode, eps):
    """DX: the floor of sigma in u and of the segment length (the official DX policy's one eps) at ``eps``."""
    g = torch.Generator().manual_seed(5)
    grid = torch.randn(3, 4, 2, 4, 4, generator=g)
    x_src, x = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma_src = torch.tensor([0.7, 0.3, 2e-4])  # the last one's segment is floored
    pol = pk.DXPolicy(grid, x_src, sigma_src, segment_size=0.5, shift=2.0, mode=mode, backend="torch", velocity_eps=eps)
    for s in (5e-6, 5e-5, 1e-4, 0.01):
        sigma = torch.minimum(torch.full((3,), s), sigma_src)
        d = [t.double() for t in (x, sigma, grid, x_src, sigma_src)]
        ref = R.dx_velocity(*d, 0.5, 2.0, mode, eps=eps)
        assert rel_err(pol.velocity(x, sigma), ref) < TOL["velocity"][torch.float32], s
    default = pk.DXPolicy(grid, x_src, sigma_src, segment_size=0.5, shift=2.0, mode=mode, backend="torch")
    assert torch.equal(default.with_velocity_eps(1e-4).velocity(x, sigma), default.velocity(x, sigma))
    if eps == 1e-3:  # a rollout below the floor, against the reference's at eps
        out = pol.rollout(x_src, sigma_src, 0.0, total_substeps=4000, shift=2.0)

        def velocity(y, s):
            return R.dx_velocity(y, s, grid.double(), x_src.double(), sigma_src.double(), 0.5, 2.0, mode, eps=eps)

        ref = R.rollout(velocity, x_src.double(), sigma_src.double(), torch.zeros(3, dtype=torch.float64), 4000, 2.0)
        assert rel_err(out, ref) < TOL["rollout"][torch.float32]


def eps_hand_loop(student, noise, sigmas, total, eps):
    """The deterministic loop (shift 1) written out in float64 with the reference's velocity at ``eps``."""
    x = sigmas[0] * noise.double()
    for i in range(len(sigmas) - 1):
        out = {k: v.double() for k, v in student(x.float(), torch.tensor([sigmas[i] * 1000] * x.shape[0])).to_dict().items()}

        def velocity(y, s, out=out, x_src=x, s_src=sigmas[i]):
            return R.gm_velocity(y, s, out["means"], out["logweights"], out["logstds"], x_src,
                                 torch.tensor(s_src, dtype=torch.float64), eps=eps)  # fmt: skip

        x = R.rollout(velocity, x, sigmas[i], sigmas[i + 1], total, 1.0)
    return x


def test_scheduler_velocity_eps_end_to_end(tmp_path):
    """PiFlowScheduler(velocity_eps=1e-4) samples as the loop at eps 1e-4 (a last step from sigma 5e-5, below it), far
    closer than the built-in floor's result; the key survives save/load and a student's recorded sampling."""
    student, noise = Student(), _noise()
    sigmas = [1.0, 0.5, 5e-5]
    sched = pk.PiFlowScheduler(total_substeps=128, velocity_eps=1e-4)
    assert pk.PiFlowScheduler().config.velocity_eps is None  # the default: the built-in floors (GM 1e-6, DX 1e-4)
    out = pk.sample(student, noise, None, sched, sigmas=sigmas, progress=False)
    ref = eps_hand_loop(student, noise, sigmas + [0.0], 128, 1e-4)
    ref_default = eps_hand_loop(student, noise, sigmas + [0.0], 128, 1e-6)
    err = rel_err(out, ref)
    assert err < TOL["rollout"][torch.float32]
    assert err < rel_err(ref_default, ref) / 10  # the eps, not the tolerance, decides
    sched.save_config(tmp_path)
    assert pk.PiFlowScheduler.from_pretrained(tmp_path).config.velocity_eps == 1e-4
    for bad in (0.0, -1e-4, float("inf"), "1e-4x"):
        with pytest.raises(ValueError, match="velocity_eps"):
            pk.PiFlowScheduler(velocity_eps=bad)
