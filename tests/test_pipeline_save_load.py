"""A converted pipeline saves to a folder that loads back into the same pipeline, and samples with the
student's distilled step count by default. Tiny random FLUX / SD3 pipelines, offline, as in test_pipelines.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import FluxPipeline, StableDiffusion3Pipeline  # noqa: E402
from diffusers.pipelines.pipeline_loading_utils import simple_get_class_obj  # noqa: E402
from test_pipelines import HEIGHT, WIDTH, call, converted, prompt, sd3_pipe, student_for  # noqa: E402

from piflow_kernels import PiFlowScheduler, PiFlowStudent, build_student, load_piflow_pipeline, to_piflow  # noqa: E402
from piflow_kernels.files import DamagedFileError  # noqa: E402
from piflow_kernels.pipelines import DEFAULT_NUM_INFERENCE_STEPS, PiFlowPipelineScheduler, PiFlowTransformer  # noqa: E402

STOCK = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
CASES = [("flux", "GMFlow"), ("sd3", "DX")]
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def latents(pipe, kind: str, steps: int | None = 3, seed: int = 0) -> torch.Tensor:
    extra = {} if steps is None else {"num_inference_steps": steps}
    defaults = {"height": HEIGHT, "width": WIDTH, "guidance_scale": 3.5 if kind == "flux" else 1.0}
    out = pipe(**prompt(), **defaults, **extra, generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.images


def absent(folder) -> dict:
    """The components the folder records as absent ([null, null]): the stock loader needs them passed as None."""
    index = json.loads((folder / "model_index.json").read_text())
    return {name: None for name, entry in index.items() if entry == [None, None]}


def load(folder, kind: str, how: str):
    if how == "library":
        pipe = load_piflow_pipeline(folder)
    else:  # diffusers' own loader: the saved pipeline class's from_pretrained
        pipe = STOCK[kind].from_pretrained(folder, **absent(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_config(obj) -> dict:
    """The public config as JSON would store it (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in dict(obj.config).items() if not k.startswith("_")}))


def student_calls(pipe) -> list:
    calls: list = []
    pipe.transformer.student.trunk.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("how", ["diffusers", "library"])
@pytest.mark.parametrize("kind, policy_type", CASES)
def test_saved_pipeline_loads_back_bit_for_bit(tmp_path, kind, policy_type, how):
    pipe, student = converted(kind, policy_type, shift=3.0, final_step_size_scale=0.5)
    before = latents(pipe, kind)
    pipe.save_pretrained(tmp_path)
    loaded = load(tmp_path, kind, how)
    assert isinstance(loaded, STOCK[kind])
    assert isinstance(loaded.transformer, PiFlowTransformer) and isinstance(loaded.scheduler, PiFlowPipelineScheduler)
    assert isinstance(loaded.scheduler, PiFlowScheduler)
    assert plain_config(loaded.scheduler) == plain_config(pipe.scheduler)
    assert plain_config(loaded.transformer.student) == plain_config(student)
    state, again = student.state_dict(), loaded.transformer.student.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert torch.equal(latents(loaded, kind), before)  # same latents from the same generator, bit for bit
    assert loaded.transformer.config.in_channels == pipe.transformer.config.in_channels


def test_decoded_images_match_after_loading(tmp_path):
    pipe, _ = converted("flux", shift=3.0)
    pipe.save_pretrained(tmp_path)
    loaded = load(tmp_path, "flux", "library")
    images = [call(p, "flux", 2, generator=torch.Generator().manual_seed(1), output_type="np").images for p in (pipe, loaded)]
    assert (images[0] == images[1]).all()


@pytest.mark.parametrize("kind, policy_type", CASES)
def test_model_index_names_loadable_classes(tmp_path, kind, policy_type):
    pipe, _ = converted(kind, policy_type, shift=3.0)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == STOCK[kind].__name__
    assert index["transformer"] == ["piflow_kernels.pipelines", "PiFlowTransformer"]
    assert index["scheduler"] == ["piflow_kernels.pipelines", "PiFlowPipelineScheduler"]
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        if entry == [None, None]:  # only components the pipeline did not have (no text encoders here)
            assert getattr(pipe, name, None) is None, name
            continue
        cls = simple_get_class_obj(*entry)  # diffusers' own resolution of [library, class]
        assert isinstance(getattr(pipe, name), cls), name
    # the transformer folder is a plain saved student
    assert isinstance(PiFlowStudent.from_pretrained(tmp_path / "transformer"), PiFlowStudent)


def test_sharded_student_weights_load_back(tmp_path):
    pipe, _ = converted("sd3", shift=3.0)
    before = latents(pipe, "sd3", 2)
    pipe.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "transformer/diffusion_pytorch_model.safetensors.index.json").is_file()
    assert torch.equal(latents(load(tmp_path, "sd3", "library"), "sd3", 2), before)
    shard = tmp_path / "transformer" / shards[-1]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(DamagedFileError, match=shards[-1]):
        load_piflow_pipeline(tmp_path)


def test_loaded_sd3_pipeline_still_refuses_classifier_free_guidance(tmp_path):
    pipe, _ = converted("sd3", shift=3.0)
    pipe.save_pretrained(tmp_path)
    loaded = load(tmp_path, "sd3", "diffusers")
    negative = prompt(4)
    with pytest.raises(ValueError, match="guidance_scale=1.0"):
        call(loaded, "sd3", 2, guidance_scale=5.0, negative_prompt_embeds=negative["prompt_embeds"],
             negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"], output_type="latent")  # fmt: skip


# ---------------------------------------------------------------------------- default steps


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_default_steps_are_the_students(tmp_path, kind):
    pipe, _ = converted(kind, shift=3.0)
    student = build_student(pipe.transformer.student.trunk.__class__.from_config(pipe.transformer.config),
                            logstd_inner_dim=16, num_inference_steps=np.int64(3))  # fmt: skip
    assert student.num_inference_steps == 3 and type(student.config.num_inference_steps) is int  # JSON-safe
    to_piflow(pipe, student, PiFlowScheduler(shift=3.0, final_step_size_scale=0.5))
    assert pipe.scheduler.config.default_num_inference_steps == 3
    calls = student_calls(pipe)
    default = latents(pipe, kind, steps=None)
    assert len(calls) == 3 and len(pipe.scheduler.timesteps) == 3
    assert torch.equal(default, latents(pipe, kind, steps=3))
    calls.clear()
    latents(pipe, kind, steps=5)  # an explicit count wins
    assert len(calls) == 5
    pipe.save_pretrained(tmp_path)
    for how in ("library", "class"):
        loaded = load_piflow_pipeline(tmp_path) if how == "library" else type(pipe).from_pretrained(tmp_path, **absent(tmp_path))
        loaded.set_progress_bar_config(disable=True)
        calls = student_calls(loaded)
        assert torch.equal(latents(loaded, kind, steps=None), default), how
        assert len(calls) == 3 and loaded.scheduler.config.default_num_inference_steps == 3
        assert loaded.transformer.student.num_inference_steps == 3


def test_default_steps_without_a_recorded_count_and_overrides():
    pipe, student = converted("flux", shift=3.0)
    assert student.num_inference_steps is None
    assert pipe.scheduler.config.default_num_inference_steps == DEFAULT_NUM_INFERENCE_STEPS == 4
    calls = student_calls(pipe)
    latents(pipe, "flux", steps=None)
    assert len(calls) == 4
    to_piflow(pipe, student, PiFlowScheduler(shift=3.0), num_inference_steps=2)  # at conversion
    calls.clear()
    latents(pipe, "flux", steps=None)
    assert len(calls) == 2
    calls.clear()
    sigmas = [1.0, 0.7, 0.4, 0.2, 0.1]  # explicit sigmas set the count as well
    pipe(**prompt(), height=HEIGHT, width=WIDTH, sigmas=sigmas, output_type="latent")
    assert len(calls) == 5
    # a given PiFlowPipelineScheduler's own count is used when the student records none
    to_piflow(pipe, student, PiFlowPipelineScheduler(shift=3.0, default_num_inference_steps=6))
    assert pipe.scheduler.config.default_num_inference_steps == 6
    # set_timesteps() without a count uses it too
    pipe.scheduler.set_timesteps()
    assert len(pipe.scheduler.timesteps) == 6
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        to_piflow(pipe, student, num_inference_steps=0)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        build_student(pipe.transformer.student.trunk.__class__.from_config(pipe.transformer.config), num_inference_steps=0)


def test_conversion_keeps_the_pipeline_class_name_and_is_idempotent():
    pipe = sd3_pipe()
    to_piflow(pipe, student_for(pipe))
    cls = type(pipe)
    assert cls.__name__ == "StableDiffusion3Pipeline" and isinstance(pipe, StableDiffusion3Pipeline)
    to_piflow(pipe, build_student(pipe.transformer.student.trunk.__class__.from_config(pipe.transformer.config), "DX"),
              PiFlowScheduler(policy_type="DX"))  # fmt: skip
    assert type(pipe) is cls  # re-conversion does not stack subclasses


# ---------------------------------------------------------------------------- damaged folders


@pytest.mark.parametrize("how", ["diffusers", "library"])
def test_damaged_or_missing_student_files_are_named(tmp_path, how):
    pipe, _ = converted("flux", shift=3.0)
    pipe.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DamagedFileError, match=r"diffusion_pytorch_model\.safetensors: pi-Flow student weights"):
        load(tmp_path, "flux", how)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors does not exist"):
        load(tmp_path, "flux", how)
    weights.write_bytes(data)
    config = tmp_path / "transformer/config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])  # not JSON any more
    with pytest.raises(DamagedFileError, match=r"config\.json: pi-Flow student config: invalid JSON"):
        load(tmp_path, "flux", how)
    config.write_text(text.replace('"PiFlowStudent"', '"FluxTransformer2DModel"'))
    with pytest.raises(DamagedFileError, match="_class_name is 'FluxTransformer2DModel'"):
        load(tmp_path, "flux", how)
    config.write_text(text)
    assert torch.equal(latents(load(tmp_path, "flux", how), "flux"), latents(pipe, "flux"))


def test_library_loader_checks_the_folder(tmp_path):
    pipe, _ = converted("sd3", shift=3.0)
    pipe.save_pretrained(tmp_path / "saved")
    scheduler_config = tmp_path / "saved/scheduler/scheduler_config.json"
    scheduler_config.write_text("")
    with pytest.raises(DamagedFileError, match=r"scheduler_config\.json: pi-Flow scheduler config: empty file"):
        load_piflow_pipeline(tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_piflow_pipeline(tmp_path / "nowhere")
    stock = sd3_pipe()
    stock.save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match="not a folder saved from a pipeline converted with to_piflow"):
        load_piflow_pipeline(tmp_path / "stock")
