"""A student that records its sampling settings is sampled with them by default, explicit arguments winning.

``PiFlowStudent.sampling`` (PiFlowScheduler config keys) and ``num_inference_steps`` reach
``PiFlowScheduler.from_student``, ``pk.sample`` without a scheduler, and ``to_piflow`` / ``load_piflow_pipeline``;
``PiIDConfig.sampling_settings()`` is the dict the trainer records, equal in effect to ``sample_with``. Tiny random
diffusers students built offline from configs, as in test_students.py and test_pipelines.py.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the stock pipelines of test_pipelines import their text encoders' classes
from test_pipelines import BATCH, HEIGHT, LAT_H, LAT_W, WIDTH, flux_pipe, prompt, sd3_pipe, student_for  # noqa: E402
from test_students import SIZES, pack, tiny_teacher  # noqa: E402

from piflow_kernels import PiFlowScheduler, PiFlowStudent, build_student, load_piflow_pipeline, sample, to_piflow  # noqa: E402
from piflow_kernels.distill.evaluation import sample_with  # noqa: E402
from piflow_kernels.distill.piid_config import PiIDConfig  # noqa: E402
from piflow_kernels.distill.toy import ToyDXStudent, ToyGMStudent  # noqa: E402
from piflow_kernels.pipelines import PiFlowPipelineScheduler  # noqa: E402
from piflow_kernels.sampling import student_settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("eager_cpu")

# what a distilled student records (a DX student also its intrinsic segment)
RECORDED = {
    "GMFlow": {"shift": 3.0, "final_step_size_scale": 0.5, "total_substeps": 64, "temperature": 0.7},
    "DX": {"shift": 3.0, "final_step_size_scale": 0.5, "total_substeps": 64, "dx_segment_size": 0.25, "dx_mode": "grid"},
}
STEPS = 3


def recording(student: PiFlowStudent, sampling: dict | None, steps: int | None = None) -> PiFlowStudent:
    """``student`` (same weights) with ``sampling`` and ``num_inference_steps`` in its config, as a saved student
    that recorded them loads."""
    config = {k: v for k, v in student.config.items() if not k.startswith("_")}
    config.update(sampling=sampling, num_inference_steps=steps)
    rebuilt = PiFlowStudent.from_config(config)
    rebuilt.load_state_dict(student.state_dict())
    return rebuilt.eval()


def unet_student(policy_type: str, sampling: dict | None = None, steps: int | None = STEPS) -> PiFlowStudent:
    """A UNet2DModel student (C = 3, no conditioning) with a perturbed head: DX grid points differ, so the
    DX segment matters."""
    g = torch.Generator().manual_seed(5)
    student = build_student(tiny_teacher("unet"), policy_type, num_components=3, num_points=4, logstd_inner_dim=16,
                            generator=g)  # fmt: skip
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return recording(student, sampling, steps)


def noise_for(seed: int = 2) -> torch.Tensor:
    return torch.randn(2, 3, *SIZES["unet"], generator=torch.Generator().manual_seed(seed))


def run(pipe, kind: str, steps: int | None, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's latents; ``steps=None`` leaves the step count to the pipeline (its default)."""
    extra = {} if steps is None else {"num_inference_steps": steps}
    defaults = {"height": HEIGHT, "width": WIDTH, "guidance_scale": 3.5 if kind == "flux" else 1.0}
    return pipe(**prompt(), **defaults, **extra, latents=latents, output_type="latent").images


def calls_of(student: torch.nn.Module) -> list:
    calls: list = []
    student.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


# ---------------------------------------------------------------------------- PiFlowScheduler.from_student


@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
def test_from_student_config_has_the_recorded_settings(policy_type):
    student = unet_student(policy_type, RECORDED[policy_type])
    assert student.sampling == RECORDED[policy_type] and student.num_inference_steps == STEPS
    cfg = PiFlowScheduler.from_student(student).config
    for key, value in RECORDED[policy_type].items():
        assert cfg[key] == value, key
    assert cfg.policy_type == policy_type
    defaults = PiFlowScheduler().config  # the keys the student does not record keep the defaults
    for key in ("h", "use_dynamic_shifting", "substep_rule", "num_train_timesteps"):
        assert cfg[key] == defaults[key], key
    assert "default_num_inference_steps" not in cfg  # the base class has no such key
    piped = PiFlowPipelineScheduler.from_student(student)
    assert isinstance(piped, PiFlowPipelineScheduler) and piped.config.default_num_inference_steps == STEPS
    assert piped.config.total_substeps == 64 and piped.config.base_shift == piped.config.base_logshift
    # overrides win over the recorded settings
    over = PiFlowScheduler.from_student(student, total_substeps=16, shift=2.0, h=0.5).config
    assert (over.total_substeps, over.shift, over.h, over.final_step_size_scale) == (16, 2.0, 0.5, 0.5)
    assert PiFlowPipelineScheduler.from_student(student, default_num_inference_steps=5).config.default_num_inference_steps == 5


def test_from_student_without_recorded_settings_takes_the_policy_type_only():
    student = unet_student("DX", None, steps=None)
    assert student.sampling == {} and student.num_inference_steps is None
    cfg = PiFlowScheduler.from_student(student).config
    assert cfg.policy_type == "DX" and cfg.dx_segment_size == 1.0 and cfg.shift == 1.0
    assert PiFlowPipelineScheduler.from_student(student).config.default_num_inference_steps is None


class _Duck(torch.nn.Module):
    """A module with the attributes a PiFlowStudent-like object needs."""

    def __init__(self, policy_type="GMFlow", sampling=None, num_inference_steps=None):
        super().__init__()
        self.policy_type, self.sampling, self.num_inference_steps = policy_type, sampling or {}, num_inference_steps


def test_from_student_bad_input_is_named():
    student = unet_student("GMFlow", RECORDED["GMFlow"])
    for bad in (object(), torch.nn.Linear(2, 2), lambda x, t: x):
        with pytest.raises(TypeError, match=r"from_student needs a PiFlowStudent .*policy_type and a sampling dict"):
            PiFlowScheduler.from_student(bad)
    with pytest.raises(TypeError, match=r"unknown config keys \['bogus'\]"):
        PiFlowScheduler.from_student(student, bogus=1)
    with pytest.raises(TypeError, match="unknown config keys"):  # the base class has no default step count
        PiFlowScheduler.from_student(student, default_num_inference_steps=3)
    with pytest.raises(ValueError, match="policy_type='DX' but the student outputs 'GMFlow'"):
        PiFlowScheduler.from_student(student, policy_type="DX")
    with pytest.raises(ValueError, match="total_substeps must be an int >= 1"):
        PiFlowScheduler.from_student(student, total_substeps=0)
    with pytest.raises(ValueError, match=r"recorded sampling has keys \['nonsense'\]"):
        PiFlowScheduler.from_student(_Duck(sampling={"nonsense": 1.0}))
    with pytest.raises(ValueError, match="policy_type must be one of"):
        PiFlowScheduler.from_student(_Duck(policy_type="GM"))
    with pytest.raises(ValueError, match="num_inference_steps must be None or an int >= 1"):
        PiFlowScheduler.from_student(_Duck(num_inference_steps=0))
    with pytest.raises(ValueError, match="dx_segment_size must be a positive"):  # the scheduler's own checks
        PiFlowScheduler.from_student(_Duck("DX", {"dx_segment_size": -1.0}))


# ---------------------------------------------------------------------------- pk.sample


@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
def test_sample_without_a_scheduler_uses_the_recorded_settings(policy_type):
    student = unet_student(policy_type, RECORDED[policy_type])
    noise = noise_for()
    calls = calls_of(student)
    default = sample(student, noise, progress=False)  # no scheduler, no step count: the student's
    assert len(calls) == STEPS and default.shape == noise.shape and torch.isfinite(default).all()
    explicit = PiFlowScheduler(**RECORDED[policy_type], policy_type=policy_type)
    assert torch.equal(default, sample(student, noise, STEPS, explicit, progress=False))
    assert torch.equal(default, sample(student, noise, STEPS, PiFlowScheduler.from_student(student), progress=False))
    # the settings matter: the unrecorded defaults (the same weights, nothing recorded) sample otherwise
    plain = sample(recording(student, None), noise, STEPS, progress=False)
    assert torch.equal(plain, sample(student, noise, STEPS, PiFlowScheduler(policy_type=policy_type), progress=False))
    assert (default - plain).abs().max() > 1e-2
    if policy_type == "DX":  # the intrinsic segment alone changes the samples
        seg1 = sample(student, noise, STEPS, PiFlowScheduler.from_student(student, dx_segment_size=1.0), progress=False)
        assert (default - seg1).abs().max() > 1e-2


def test_explicit_arguments_win(caplog):
    student = unet_student("DX", RECORDED["DX"])
    noise = noise_for(4)
    calls = calls_of(student)
    sample(student, noise, 2, progress=False)  # an explicit step count wins over the recorded 3
    assert len(calls) == 2
    # an explicit scheduler is used as is, with a warning naming what it sets otherwise
    other = PiFlowScheduler(policy_type="DX", shift=3.0, final_step_size_scale=0.5, total_substeps=64, dx_segment_size=0.5)
    with caplog.at_level(logging.WARNING, logger="piflow_kernels.sampling"):
        got = sample(student, noise, STEPS, other, progress=False)
    assert "dx_segment_size=0.5 (student: 0.25)" in caplog.text and "used as is" in caplog.text
    want = sample(student, noise, STEPS, PiFlowScheduler.from_student(student, dx_segment_size=0.5), progress=False)
    assert torch.equal(got, want)
    assert (got - sample(student, noise, progress=False)).abs().max() > 1e-2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="piflow_kernels.sampling"):
        sample(student, noise, STEPS, PiFlowScheduler.from_student(student, h=0.0), progress=False)
    assert caplog.text == ""  # a scheduler with the recorded settings: nothing to warn about
    # custom sigmas set the count, the student's steps do not apply
    calls.clear()
    sample(student, noise, sigmas=[1.0, 0.6, 0.3, 0.2, 0.1], progress=False)
    assert len(calls) == 5


def test_sample_needs_a_step_count_when_none_is_recorded():
    noise = noise_for()
    student = unet_student("GMFlow", RECORDED["GMFlow"], steps=None)
    with pytest.raises(ValueError, match="sample needs num_inference_steps .*the student records no num_inference_steps"):
        sample(student, noise, progress=False)
    with pytest.raises(ValueError, match=r"sample needs num_inference_steps \(the number of student calls\) or sigmas"):
        sample(lambda x, t: None, noise, progress=False)
    assert torch.isfinite(sample(student, noise, 2, progress=False)).all()
    # a pipeline scheduler's own default count serves too
    sched = PiFlowPipelineScheduler.from_student(student, default_num_inference_steps=2)
    calls = calls_of(student)
    sample(student, noise, None, sched, progress=False)
    assert len(calls) == 2


def test_ddp_wrapped_student_samples_with_its_settings(tmp_path):
    import torch.distributed as dist

    student = unet_student("DX", RECORDED["DX"])
    noise = noise_for(6)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(student)
        settings = student_settings(wrapped)
        assert settings.sampling == RECORDED["DX"] and settings.policy_type == "DX" and settings.num_inference_steps == STEPS
        assert PiFlowScheduler.from_student(wrapped).config.dx_segment_size == 0.25
        assert torch.equal(sample(wrapped, noise, progress=False), sample(student, noise, progress=False))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- PiIDConfig.sampling_settings


CONFIGS = {
    "gm": PiIDConfig(nfe=3, shift=3.0, final_step_size_scale=0.5, total_substeps=32),
    "gm-dynamic-round": PiIDConfig(nfe=2, use_dynamic_shifting=True, base_seq_len=4, max_seq_len=64, base_logshift=0.2,
                                   max_logshift=1.3, total_substeps=24, substep_rule="round"),  # fmt: skip
    "dx-nfe-segment": PiIDConfig(nfe=3, policy_type="DX", shift=2.0, final_step_size_scale=0.5, total_substeps=32),
    "dx-own": PiIDConfig(nfe=2, policy_type="DX", shift=3.0, dx_segment_size=0.25, dx_shift=1.5, dx_mode="polynomial"),
}


def test_sampling_settings_keys_and_values():
    gm = CONFIGS["gm"].sampling_settings()
    assert gm == {
        "policy_type": "GMFlow", "shift": 3.0, "use_dynamic_shifting": False, "dynamic_shifting_type": "exp",
        "base_seq_len": 256, "max_seq_len": 4096, "base_logshift": 0.5, "max_logshift": 1.15,
        "final_step_size_scale": 0.5, "total_substeps": 32, "substep_rule": "ceil", "num_train_timesteps": 1000,
    }  # fmt: skip
    assert type(gm["num_train_timesteps"]) is int and json.loads(json.dumps(gm)) == gm
    dx = CONFIGS["dx-nfe-segment"].sampling_settings()  # unset DX settings resolve: the NFE segment, the shift
    assert (dx["dx_segment_size"], dx["dx_shift"], dx["dx_mode"]) == (pytest.approx(1 / 2.5), 2.0, "grid")
    own = CONFIGS["dx-own"].sampling_settings()
    assert (own["dx_segment_size"], own["dx_shift"], own["dx_mode"]) == (0.25, 1.5, "polynomial")
    assert "backend" not in own and not any(k.startswith("dx_") for k in gm)
    with pytest.raises(ValueError, match="integer num_train_timesteps"):
        PiIDConfig(num_train_timesteps=999.5).sampling_settings()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sampling_settings_sample_as_sample_with(name):
    cfg = CONFIGS[name]
    torch.manual_seed(3)
    toy = (ToyGMStudent(3, 4, 4, num_components=3, hidden=32) if cfg.policy_type == "GMFlow"
           else ToyDXStudent(3, 4, 4, num_points=4, hidden=32)).eval()  # fmt: skip
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    scheduler = PiFlowScheduler(**cfg.sampling_settings())
    got = sample(toy, noise, cfg.nfe, scheduler=scheduler, progress=False)
    want = sample_with(toy, noise, cfg)
    assert torch.isfinite(want).all() and want.abs().max() > 0.1
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["gm", "dx-nfe-segment"])
def test_a_student_recording_the_settings_samples_as_sample_with(name):
    cfg = CONFIGS[name]
    student = unet_student(cfg.policy_type, cfg.sampling_settings(), steps=cfg.nfe)
    noise = noise_for(9)
    want = sample_with(student, noise, cfg)
    assert torch.equal(sample(student, noise, progress=False), want)
    unrecorded = recording(student, None)  # what sampling it gave without the record
    assert (sample(unrecorded, noise, cfg.nfe, progress=False) - want).abs().max() > 1e-2


# ---------------------------------------------------------------------------- to_piflow, save and load


def test_to_piflow_takes_the_students_settings_over_the_pipelines():
    pipe = flux_pipe()  # its scheduler: FlowMatchEuler, shift 3.0, dynamic shifting on
    base = student_for(pipe)
    student = recording(base, {"final_step_size_scale": 0.5, "total_substeps": 64, "temperature": 0.7})
    to_piflow(pipe, student)
    cfg = pipe.scheduler.config
    assert (cfg.final_step_size_scale, cfg.total_substeps, cfg.temperature) == (0.5, 64, 0.7)
    assert cfg.use_dynamic_shifting is True and cfg.shift == 3.0  # the pipeline's own, where the student records none
    fixed = recording(base, {"use_dynamic_shifting": False, "shift": 2.5})
    to_piflow(pipe, fixed)
    assert pipe.scheduler.config.use_dynamic_shifting is False and pipe.scheduler.config.shift == 2.5
    run(pipe, "flux", 2, pack(torch.randn(BATCH, 3, LAT_H, LAT_W, generator=torch.Generator().manual_seed(3))))
    assert pipe.scheduler.shift == 2.5
    to_piflow(pipe, fixed, shift=2.0, temperature="auto")  # explicit keywords win over the student
    assert (pipe.scheduler.config.shift, pipe.scheduler.config.temperature) == (2.0, "auto")
    assert pipe.scheduler.config.use_dynamic_shifting is False


def test_to_piflow_sd3_dx_samples_with_the_recorded_settings(caplog):
    pipe = sd3_pipe()
    student = recording(student_for(pipe, "DX"), RECORDED["DX"], steps=STEPS)
    to_piflow(pipe, student)
    cfg = pipe.scheduler.config
    for key, value in RECORDED["DX"].items():
        assert cfg[key] == value, key
    assert cfg.default_num_inference_steps == STEPS  # the step count as before: the student's
    x0 = torch.randn(BATCH, student.latent_channels, LAT_H, LAT_W, generator=torch.Generator().manual_seed(0))
    got = run(pipe, "sd3", None, x0)
    assert torch.isfinite(got).all()
    other = sd3_pipe()
    to_piflow(other, student, PiFlowScheduler.from_student(student))
    assert torch.equal(got, run(other, "sd3", STEPS, x0))
    # an explicit scheduler is used as is (a warning names what it sets otherwise), and samples otherwise
    with caplog.at_level(logging.WARNING, logger="piflow_kernels.sampling"):
        to_piflow(other, student, PiFlowScheduler(policy_type="DX", shift=3.0))
    assert "to_piflow" in caplog.text and "dx_segment_size=1.0 (student: 0.25)" in caplog.text
    assert other.scheduler.config.dx_segment_size == 1.0 and other.scheduler.config.total_substeps == 128
    assert (run(other, "sd3", STEPS, x0) - got).abs().max() > 1e-3
    to_piflow(other, student, PiFlowScheduler(policy_type="DX"), dx_segment_size=0.3)  # keywords over a scheduler too
    assert other.scheduler.config.dx_segment_size == 0.3 and other.scheduler.config.shift == 1.0


def test_to_piflow_bad_scheduler_keywords():
    pipe = flux_pipe()
    student = recording(student_for(pipe), RECORDED["GMFlow"])
    with pytest.raises(TypeError, match=r"unknown scheduler config keys \['shfit'\]"):
        to_piflow(pipe, student, shfit=3.0)
    with pytest.raises(TypeError, match="default step count as num_inference_steps"):
        to_piflow(pipe, student, default_num_inference_steps=3)
    with pytest.raises(ValueError, match="policy_type='DX' but the student outputs 'GMFlow'"):
        to_piflow(pipe, student, policy_type="DX")
    with pytest.raises(ValueError, match="total_substeps must be an int >= 1"):
        to_piflow(pipe, student, total_substeps=0)
    assert not hasattr(pipe.transformer, "student")  # nothing was changed by the failed calls


def test_saved_student_and_pipeline_keep_the_settings(tmp_path):
    pipe = flux_pipe()
    student = recording(student_for(pipe), RECORDED["GMFlow"], steps=STEPS)
    student.save_pretrained(tmp_path / "student")
    loaded = PiFlowStudent.from_pretrained(tmp_path / "student").eval()
    assert loaded.sampling == RECORDED["GMFlow"] and loaded.num_inference_steps == STEPS
    assert dict(PiFlowScheduler.from_student(loaded).config) == dict(PiFlowScheduler.from_student(student).config)

    to_piflow(pipe, loaded)
    x0 = torch.randn(BATCH, loaded.latent_channels, LAT_H, LAT_W, generator=torch.Generator().manual_seed(1))
    before = run(pipe, "flux", None, pack(x0))
    pipe.save_pretrained(tmp_path / "pipe")
    again = load_piflow_pipeline(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    for key, value in RECORDED["GMFlow"].items():
        assert again.scheduler.config[key] == value, key
    assert again.scheduler.config.default_num_inference_steps == STEPS
    assert again.transformer.student.sampling == RECORDED["GMFlow"]
    assert torch.equal(run(again, "flux", None, pack(x0)), before)
    cond = {"encoder_hidden_states": prompt()["prompt_embeds"], "pooled_projections": prompt()["pooled_prompt_embeds"],
            "guidance": torch.full((BATCH,), 3.5)}  # fmt: skip
    # pk.sample of the reloaded student, image layout, without a scheduler or a step count: its record's
    got = sample(again.transformer.student, x0, progress=False, **cond)
    assert torch.equal(got, sample(student, x0, STEPS, PiFlowScheduler(**RECORDED["GMFlow"]), progress=False, **cond))
