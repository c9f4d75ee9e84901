"""PiFlowScheduler against the reference (float64): schedule, one step per policy type and h, noise
statistics of the re-noising, diffusers plumbing (save/load, from_config), bad input."""

import json
import logging
import math

import pytest
import torch
from conftest import TOL, rel_err
from piflow_kernels.reference.sampler import flowmap_sde_policy_step

from piflow_kernels import DXOutput, GMFlowOutput
from piflow_kernels import reference as R

diffusers = pytest.importorskip("diffusers")  # the scheduler is a diffusers scheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput  # noqa: E402

from piflow_kernels.scheduler import PiFlowScheduler, PiFlowSchedulerOutput  # noqa: E402

# the scheduler's semantics do not depend on torch.compile: eager (no 30 s first compilation), one intra-op thread
pytestmark = pytest.mark.usefixtures("eager_cpu")


def gm_output(batch, k, c, spatial, per_component=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ones = [1] * len(spatial)
    return GMFlowOutput(
        means=torch.randn(batch, k, c, *spatial, generator=g),
        logweights=torch.log_softmax(1.5 * torch.randn(batch, k, 1, *spatial, generator=g), dim=1),
        logstds=0.3 * torch.randn(batch, k if per_component else 1, 1, *ones, generator=g) - 1.0,
    )


def dx_output(batch, n, c, spatial, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DXOutput(grid=torch.randn(batch, n, c, *spatial, generator=g))


def as_double(output):
    return {k: v.double() for k, v in output.to_dict().items()}


# ---------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("final_scale", [1.0, 0.5], ids=["f1", "f0.5"])
@pytest.mark.parametrize("shift", [1.0, 3.0], ids=["shift1", "shift3"])
@pytest.mark.parametrize("nfe", range(1, 9), ids=lambda n: f"nfe{n}")
def test_sigmas_timesteps_match_reference(nfe, shift, final_scale):
    sched = PiFlowScheduler(shift=shift, final_step_size_scale=final_scale)
    sched.set_timesteps(nfe)
    ref = R.flowmap_sde_sigmas(nfe, shift, final_scale)
    assert sched.num_inference_steps == nfe
    assert sched.sigmas.shape == (nfe + 1,) and sched.timesteps.shape == (nfe,)
    assert sched.sigmas.dtype == torch.float32 and float(sched.sigmas[-1]) == 0.0
    torch.testing.assert_close(sched.sigmas.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(sched.timesteps.double(), ref[:-1] * 1000, rtol=0, atol=1e-3)
    assert sched.raw_sigmas(nfe)[0] == 1.0
    for h in (0.0, 0.5, "inf"):
        sched_h = PiFlowScheduler(shift=shift, final_step_size_scale=final_scale, h=h)
        sched_h.set_timesteps(nfe)
        ref_dst = [float(R.flowmap_sde_dst(ref[i], ref[i + 1], h)[0]) for i in range(nfe)]
        torch.testing.assert_close(sched_h.sigmas_dst.double(), torch.tensor(ref_dst, dtype=torch.float64), rtol=0, atol=1e-6)
        torch.testing.assert_close(sched_h.timesteps_dst, sched_h.sigmas_dst * 1000)


def test_final_step_size_scale_halves_the_last_raw_step():
    sched = PiFlowScheduler(final_step_size_scale=0.5)
    raw = sched.raw_sigmas(4)
    steps = [a - b for a, b in zip(raw + [0.0], raw[1:] + [0.0])]
    assert steps[-1] == pytest.approx(0.5 * steps[0], rel=1e-12)
    assert steps[0] == pytest.approx(steps[1], rel=1e-12)


@pytest.mark.parametrize("seq_len", [64, 1024, 4096, 9000], ids=lambda s: f"seq{s}")
def test_dynamic_shift_from_seq_len_and_mu(seq_len):
    cfg = dict(use_dynamic_shifting=True, base_seq_len=128, max_seq_len=2048, base_logshift=0.4, max_logshift=1.3)
    sched = PiFlowScheduler(shift=7.0, **cfg)  # the fixed shift must be ignored
    sched.set_timesteps(5, seq_len=seq_len)
    shift = R.dynamic_shift(seq_len, 128, 2048, 0.4, 1.3)
    assert sched.shift == pytest.approx(shift, rel=1e-12)
    torch.testing.assert_close(sched.sigmas.double(), R.flowmap_sde_sigmas(5, shift), rtol=0, atol=1e-6)
    by_mu = PiFlowScheduler(shift=7.0, **cfg)
    by_mu.set_timesteps(5, mu=math.log(shift))
    torch.testing.assert_close(by_mu.sigmas, sched.sigmas)


def test_mu_follows_flow_match_euler_convention():
    """Same raw sigmas and mu give the same shifted schedule as diffusers' own flow-matching scheduler."""
    raw = [1.0, 0.75, 0.5, 0.25]
    ours = PiFlowScheduler(use_dynamic_shifting=True)
    ours.set_timesteps(sigmas=raw, mu=0.9)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    theirs.set_timesteps(sigmas=raw, mu=0.9)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=1e-3)
    fixed = PiFlowScheduler(shift=3.0)
    fixed.set_timesteps(sigmas=raw, mu=0.9)  # mu is ignored without dynamic shifting, as in diffusers
    theirs_fixed = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs_fixed.set_timesteps(sigmas=raw)
    torch.testing.assert_close(fixed.sigmas, theirs_fixed.sigmas, rtol=0, atol=1e-6)


def test_stock_pipeline_sigmas_equal_default_grid():
    """A stock FLUX pipeline passes linspace(1, 1/n, n): our default grid when final_step_size_scale = 1."""
    sched = PiFlowScheduler(shift=3.0)
    sched.set_timesteps(4)
    default = sched.sigmas.clone()
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(sched.sigmas, default)


# ---------------------------------------------------------------------------------------- step vs reference

POLICIES = {
    "GM-K3-std_per_sample": ("GMFlow", lambda b, c, sp, seed: gm_output(b, 3, c, sp, False, seed), "grid"),
    "GM-K4-std_per_component": ("GMFlow", lambda b, c, sp, seed: gm_output(b, 4, c, sp, True, seed), "grid"),
    "DX-N4-grid": ("DX", lambda b, c, sp, seed: dx_output(b, 4, c, sp, seed), "grid"),
    "DX-N3-polynomial": ("DX", lambda b, c, sp, seed: dx_output(b, 3, c, sp, seed), "polynomial"),
}
NFE, SHIFT, FINAL, TEMP, SUBSTEPS = 4, 2.0, 0.5, 0.6, 24
SEGMENT = 1 / (NFE - 1 + FINAL)  # the DX segment a 4-step student with final scale 0.5 is trained with


def _check_steps(policy_name, h, shape, dtype=torch.float32, tol=None):
    policy_type, make_output, mode = POLICIES[policy_name]
    sched = PiFlowScheduler(
        shift=SHIFT,
        final_step_size_scale=FINAL,
        h=h,
        total_substeps=SUBSTEPS,
        policy_type=policy_type,
        temperature=TEMP,
        dx_segment_size=SEGMENT,
        dx_shift=SHIFT,
        dx_mode=mode,
    )
    sched.set_timesteps(NFE)
    sigmas = [float(s) for s in R.flowmap_sde_sigmas(NFE, SHIFT, FINAL)]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    for i, t in enumerate(sched.timesteps):
        out = make_output(shape[0], shape[1], shape[2:], seed=10 + i)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
        got = sched.step(out, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        assert got.dtype == dtype and got.shape == x.shape
        ref = flowmap_sde_policy_step(
            as_double(out),
            x.double(),
            sigmas[i],
            sigmas[i + 1],
            h,
            noise.double(),
            policy_type,
            TEMP if i < NFE - 1 else 1.0,
            SUBSTEPS,
            SHIFT,
            SEGMENT,
            SHIFT,
            mode,
        )
        err = rel_err(got, ref)
        assert err < (tol or TOL["rollout"][dtype]), f"step {i}: rel err {err:.2e}"
        x = got
    assert sched.step_index == NFE


@pytest.mark.parametrize("h", [0.0, 0.5, "inf"], ids=["h0", "h0.5", "hinf"])
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_step_matches_reference(policy_name, h):
    _check_steps(policy_name, h, (2, 3, 5, 7))


def test_step_matches_reference_5d_video_latents():
    _check_steps("GM-K3-std_per_sample", 0.5, (1, 2, 3, 4, 5))


def test_step_bf16_sample_keeps_dtype():
    _check_steps("GM-K4-std_per_component", 0.5, (2, 3, 6, 5), dtype=torch.bfloat16, tol=2e-2)


def test_step_noise_argument_equals_generator_draw():
    out = gm_output(2, 3, 4, (6, 6), seed=1)
    x = torch.randn(2, 4, 6, 6)
    results = []
    for kwargs in (
        dict(generator=torch.Generator().manual_seed(5)),
        dict(noise=torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))),
    ):
        sched = PiFlowScheduler(h=0.7, total_substeps=16)
        sched.set_timesteps(3)
        sched.set_begin_index(1)
        results.append(sched.step(out, sched.timesteps[1], x, **kwargs).prev_sample)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    sched = PiFlowScheduler(h=0.7, total_substeps=16)
    sched.set_timesteps(3)
    sched.set_begin_index(1)
    other = sched.step(out, sched.timesteps[1], x, generator=torch.Generator().manual_seed(6)).prev_sample
    assert (other - results[0]).abs().max() > 1e-2  # the noise really enters


def test_generator_attribute_serves_a_step_without_generator():
    out, x = gm_output(2, 3, 4, (6, 6), seed=1), torch.randn(2, 4, 6, 6)
    results = []
    for on_scheduler in (False, True):
        sched = PiFlowScheduler(h=0.7, total_substeps=16)
        sched.set_timesteps(3)
        sched.set_begin_index(0)
        generator = torch.Generator().manual_seed(5)
        if on_scheduler:
            sched.generator = generator
        results.append(sched.step(out, sched.timesteps[0], x, generator=None if on_scheduler else generator).prev_sample)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_auto_temperature_is_official_rule():
    sched = PiFlowScheduler(temperature="auto")
    sched.set_timesteps(4)
    assert [sched.step_temperature(i) for i in range(4)] == [pytest.approx(0.3)] * 3 + [1.0]
    sched.set_timesteps(20)
    assert sched.step_temperature(0) == 1.0


# ---------------------------------------------------------------------------------------- noise statistics


@pytest.mark.parametrize("h", [0.0, 0.3, 1.0, "inf"], ids=["h0", "h0.3", "h1", "hinf"])
def test_renoising_keeps_the_marginal_and_correlates_by_m(h):
    """A one-point DX policy pointing at a fixed x0 is integrated exactly, so after a step from
    x_src = (1 - s_src) x0 + s_src eps the sample must be (1 - s_to) x0 + s_to eps' with eps' ~ N(0, 1)
    and corr(eps', eps) = m of the FlowMapSDE formula."""
    g = torch.Generator().manual_seed(3)
    shape = (2, 2, 128, 128)
    sched = PiFlowScheduler(h=h, shift=2.0, policy_type="DX", total_substeps=16)
    sched.set_timesteps(3)
    s_src, s_to = float(sched.sigmas[1]), float(sched.sigmas[2])
    x0 = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    x_src = (1 - s_src) * x0 + s_src * eps
    grid = ((x_src - x0) / s_src).unsqueeze(1)  # (B, 1, C, H, W): the velocity towards x0
    sched.set_begin_index(1)
    out = sched.step(DXOutput(grid=grid), sched.timesteps[1], x_src, generator=g).prev_sample
    residual = ((out - (1 - s_to) * x0) / s_to).double().flatten()
    _, m = R.flowmap_sde_dst(torch.tensor(s_src, dtype=torch.float64), torch.tensor(s_to, dtype=torch.float64), h)
    m = float(m)
    eps = eps.double().flatten()
    corr = float(((residual - residual.mean()) * (eps - eps.mean())).mean() / (residual.std() * eps.std()))
    if h == 0.0:
        torch.testing.assert_close(residual, eps, rtol=0, atol=2e-4)
    assert abs(float(residual.mean())) < 0.02
    assert abs(float(residual.std()) - 1.0) < 0.02
    assert abs(corr - m) < 0.02, f"corr {corr:.4f} vs m {m:.4f}"


# ---------------------------------------------------------------------------------------- diffusers plumbing


def test_scheduler_interface():
    sched = PiFlowScheduler()
    assert sched.init_noise_sigma == 1.0 and sched.order == 1 and len(sched) == 1000
    x = torch.randn(1, 2, 3, 3)
    assert sched.scale_model_input(x, 500.0) is x
    assert sched.step_index is None and sched.begin_index is None
    sched.set_timesteps(4)
    assert sched.index_for_timestep(sched.timesteps[2]) == 2
    assert sched.index_for_timestep(float(sched.timesteps[1])) == 1
    out = gm_output(1, 2, 2, (3, 3))
    res = sched.step(out, sched.timesteps[2], x, return_dict=False)  # begins at the looked-up index
    assert isinstance(res, tuple) and len(res) == 1 and sched.step_index == 3
    sched.set_timesteps(4)
    assert sched.step_index is None
    sched.set_begin_index(0)
    res = sched.step(out, sched.timesteps[0], x)
    assert isinstance(res, PiFlowSchedulerOutput) and sched.step_index == 1
    noise = torch.randn_like(x)
    t = torch.tensor([250.0])
    torch.testing.assert_close(sched.scale_noise(x, t, noise), 0.75 * x + 0.25 * noise)


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("h", [0.5, "inf", float("inf")], ids=["h0.5", "hinf_str", "hinf_float"])
def test_save_load_round_trip(tmp_path, h):
    sched = PiFlowScheduler(
        shift=3.2,
        use_dynamic_shifting=True,
        base_seq_len=100,
        max_seq_len=900,
        base_logshift=0.3,
        max_logshift=1.4,
        final_step_size_scale=0.5,
        h=h,
        total_substeps=64,
        policy_type="DX",
        temperature="auto",
        dx_segment_size=1 / 3.5,
        dx_shift=3.2,
        dx_mode="polynomial",
        backend="torch",
    )
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "PiFlowScheduler" and saved["dx_mode"] == "polynomial"
    loaded = PiFlowScheduler.from_pretrained(tmp_path)
    assert _public(loaded.config) == _public(sched.config)
    for s in (sched, loaded):
        s.set_timesteps(3, seq_len=500)
    torch.testing.assert_close(loaded.sigmas, sched.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(loaded.sigmas_dst, sched.sigmas_dst, rtol=0, atol=0)


FLUX_SCHEDULER_CONFIG = {  # scheduler_config.json of FLUX.1-dev
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def test_from_config_of_flow_match_euler_keeps_shared_keys():
    fm = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=2.5,
        use_dynamic_shifting=True,
        base_shift=0.4,
        max_shift=1.2,
        base_image_seq_len=128,
        max_image_seq_len=2048,
    )
    sched = PiFlowScheduler.from_config(fm.config, h=0.5)
    c = sched.config
    assert (c.shift, c.use_dynamic_shifting, c.num_train_timesteps, c.h) == (2.5, True, 1000, 0.5)
    assert (c.base_logshift, c.max_logshift, c.base_seq_len, c.max_seq_len) == (0.4, 1.2, 128, 2048)
    sched.set_timesteps(4, seq_len=700)
    assert sched.shift == pytest.approx(R.dynamic_shift(700, 128, 2048, 0.4, 1.2), rel=1e-12)

    flux = PiFlowScheduler.from_config(FLUX_SCHEDULER_CONFIG, shift=3.2, use_dynamic_shifting=False, final_step_size_scale=0.5)
    assert (flux.config.shift, flux.config.use_dynamic_shifting, flux.config.final_step_size_scale) == (3.2, False, 0.5)
    again = PiFlowScheduler.from_config(sched.config)  # our own config passes through unchanged
    assert _public(again.config) == _public(sched.config)


def test_from_config_warns_about_unsupported_flow_match_features(caplog):
    fm = diffusers.FlowMatchEulerDiscreteScheduler(shift_terminal=0.1)
    with caplog.at_level(logging.WARNING, logger="piflow_kernels.scheduler"):
        PiFlowScheduler.from_config(fm.config)
    assert "shift_terminal" in caplog.text


# ---------------------------------------------------------------------------------------- bad input


def _ready(policy_type="GMFlow", nfe=3):
    sched = PiFlowScheduler(policy_type=policy_type, total_substeps=16)
    sched.set_timesteps(nfe)
    return sched


def test_step_before_set_timesteps():
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        PiFlowScheduler().step(gm_output(1, 2, 2, (3, 3)), 1000.0, torch.randn(1, 2, 3, 3))


BAD_OUTPUTS = {
    "velocity_tensor_to_GM": ("GMFlow", lambda: torch.randn(2, 4, 5, 5), TypeError, r"'means' \(B, K, C, \*S\).*not a policy"),
    "tuple_to_GM": (
        "GMFlow",
        lambda: (torch.randn(2, 3, 4, 5, 5),),
        TypeError,
        "got a tuple.*'means' .*'logweights' .*'logstds'",
    ),
    "dict_missing_logstds": (
        "GMFlow",
        lambda: {"means": torch.randn(2, 3, 4, 5, 5), "logweights": torch.randn(2, 3, 1, 5, 5)},
        TypeError,
        "keys 'means', 'logweights', 'logstds'.*got \\['means', 'logweights'\\]",
    ),
    "DX_output_to_GM": (
        "GMFlow",
        lambda: DXOutput(grid=torch.randn(2, 3, 4, 5, 5)),
        TypeError,
        "expected a GMFlow policy output",
    ),
    "GM_output_to_DX": ("DX", lambda: gm_output(2, 3, 4, (5, 5)), TypeError, "expected a DX policy output"),
    "stock_model_output": (
        "GMFlow",
        lambda: Transformer2DModelOutput(sample=torch.randn(2, 4, 5, 5)),
        TypeError,
        "got a Transformer2DModelOutput with a 'sample' field.*'means' .*not a policy",
    ),
    "means_wrong_spatial": (
        "GMFlow",
        lambda: gm_output(2, 3, 4, (5, 6)),
        ValueError,
        r"means must have shape \(B, K, C, \*S\) = \(2, K, 4, 5, 5\)",
    ),
    "means_wrong_channels": (
        "GMFlow",
        lambda: gm_output(2, 3, 3, (5, 5)),
        ValueError,
        r"= \(2, K, 4, 5, 5\), got \(2, 3, 3, 5, 5\)",
    ),
    "grid_wrong_batch": (
        "DX",
        lambda: dx_output(3, 2, 4, (5, 5)),
        ValueError,
        r"grid must have shape \(B, N, C, \*S\) = \(2, N, 4, 5, 5\)",
    ),
}


@pytest.mark.parametrize("name", list(BAD_OUTPUTS))
def test_bad_model_output(name):
    policy_type, make, error, pattern = BAD_OUTPUTS[name]
    sched = _ready(policy_type)
    with pytest.raises(error, match=pattern) as info:
        sched.step(make(), sched.timesteps[0], torch.randn(2, 4, 5, 5))
    assert "PiFlowScheduler.step" in str(info.value)


def test_timestep_not_from_schedule():
    sched = _ready()
    out, x = gm_output(2, 3, 4, (5, 5)), torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"timestep 500.0 is not in the schedule.*timesteps: \[1000, 666.7, 333.3\]"):
        sched.step(out, 500.0, x)
    with pytest.raises(ValueError, match="timestep 0.0 is not in the schedule"):
        sched.step(out, 0, x)  # an index from enumerate() is not a timestep
    sched.step(out, sched.timesteps[0], x)
    with pytest.raises(ValueError, match=r"does not match step 1 of the schedule \(expected 666.667"):
        sched.step(out, sched.timesteps[2], x)
    with pytest.raises(ValueError, match="does not match step 1"):
        sched.step(out, torch.tensor([666.6667, 333.3333]), x)  # per-sample timesteps are not supported
    with pytest.raises(TypeError, match="timestep must be a float or a tensor"):
        sched.step(out, "666.67", x)


def test_too_many_steps():
    sched = _ready(nfe=1)
    out, x = gm_output(2, 3, 4, (5, 5)), torch.randn(2, 4, 5, 5)
    sched.step(out, sched.timesteps[0], x)
    with pytest.raises(RuntimeError, match="more than num_inference_steps=1 times; call set_timesteps again"):
        sched.step(out, sched.timesteps[0], x)


def test_bad_sample_and_noise_shapes():
    sched = _ready()
    out = gm_output(2, 3, 4, (5, 5))
    with pytest.raises(ValueError, match=r"sample must have shape \(B, C, H, W\) or \(B, C, T, H, W\), got \(4, 5, 5\)"):
        sched.step(out, sched.timesteps[0], torch.randn(4, 5, 5))
    with pytest.raises(TypeError, match="sample must be a floating-point tensor"):
        sched.step(out, sched.timesteps[0], torch.ones(2, 4, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"noise must have the shape of sample \(2, 4, 5, 5\), got \(2, 4, 5\)"):
        sched.step(out, sched.timesteps[0], torch.randn(2, 4, 5, 5), noise=torch.randn(2, 4, 5))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(h=-1.0), "h must be a float >= 0 or 'inf'"),
        (dict(h="infinity"), "h must be a float >= 0 or 'inf'"),
        (dict(policy_type="gmflow"), r"policy_type must be one of \('GMFlow', 'DX'\)"),
        (dict(temperature=0.0), "temperature must be a float > 0 or 'auto'"),
        (dict(total_substeps=0), "total_substeps must be an int >= 1"),
        (dict(shift=0.0), "shift must be a positive finite number"),
        (dict(final_step_size_scale=-0.5), "final_step_size_scale must be a positive finite number"),
        (dict(dx_mode="linear"), "dx_mode must be 'grid' or 'polynomial'"),
        (dict(backend="cuda"), "backend must be None, 'torch', 'triton' or 'reference'"),
    ],
    ids=["h_negative", "h_string", "policy_type", "temperature", "substeps", "shift", "final_scale", "dx_mode", "backend"],
)
def test_bad_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        PiFlowScheduler(**kwargs)


def test_bad_set_timesteps():
    sched = PiFlowScheduler()
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got 0"):
        sched.set_timesteps(0)
    with pytest.raises(TypeError, match="num_inference_steps must be an int, got float"):
        sched.set_timesteps(4.0)
    with pytest.raises(ValueError, match="needs num_inference_steps or sigmas"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="strictly decreasing"):
        sched.set_timesteps(sigmas=[1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match=r"sigmas must lie in \(0, 1\]"):
        sched.set_timesteps(sigmas=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="num_inference_steps=3 but 2 sigmas"):
        sched.set_timesteps(3, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="needs mu .* or seq_len"):
        PiFlowScheduler(use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        PiFlowScheduler(use_dynamic_shifting=True).set_timesteps(4, seq_len=0)


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_step_does_not_synchronise_the_host(monkeypatch):
    """With the schedule indexed on the host, step makes no device->host copy (policy rollout stubbed
    by a sync-free Euler step so that only the scheduler's own code is checked)."""
    from piflow_kernels.policies import GMFlowPolicy

    def one_euler_step(self, x_start, sigma_start, sigma_end, total_substeps=128, shift=1.0):
        return x_start + self.velocity(x_start, sigma_start) * (sigma_end - sigma_start)

    monkeypatch.setattr(GMFlowPolicy, "rollout", one_euler_step)
    out = gm_output(2, 3, 4, (8, 8))
    out = GMFlowOutput(**{k: v.cuda() for k, v in out.to_dict().items()})
    x = torch.randn(2, 4, 8, 8, device="cuda")
    sched = PiFlowScheduler(h=0.5, backend="torch")
    sched.set_timesteps(3, device="cuda")
    sched.set_begin_index(0)
    gen = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in sched.timesteps:
            x = sched.step(out, t, x, generator=gen).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()
