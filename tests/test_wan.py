"""Video: students of a Wan teacher (``WanTransformer3DModel``) on 5-D latents (B, C, T, H, W), ``to_piflow`` of a
``WanPipeline``, and the data-free trainer on video latents. Everything is tiny and random, built from configs."""

from __future__ import annotations

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # students wrap diffusers models
from piflow_kernels import DXOutput, GMFlowOutput, layouts  # noqa: E402
from piflow_kernels.students import PiFlowStudent, build_student  # noqa: E402

C, T, H, W, TEXT_LEN, TEXT_DIM = 3, 3, 6, 10, 7, 12


def tiny_wan(seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny ``WanTransformer3DModel`` (patches (1, 2, 2)), in eval mode."""
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=C,
        text_dim=TEXT_DIM, freq_dim=8, ffn_dim=16, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip


def wan_inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fresh random (x_t (B, C, T, H, W), timestep = sigma * 1000 (B,), {"encoder_hidden_states": ...})."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, T, H, W, generator=g)
    t = torch.rand(batch, generator=g) * 980 + 10
    return x, t, {"encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)}


# ---------------------------------------------------------------------------- the student


def test_geometry_and_arch_of_wan():
    teacher = tiny_wan()
    assert layouts.teacher_class_name(teacher) == "WanTransformer3DModel"
    arch = layouts.arch_for("WanTransformer3DModel")
    assert arch.video and arch.layout == "image" and arch.row_order == "pc" and not arch.sets_out_channels
    assert layouts.geometry("WanTransformer3DModel", teacher.config) == (C, C, 2)
    assert layouts.geometry("WanTransformer3DModel", dict(teacher.config)) == (C, C, 2)
    assert layouts.TEXT_ARGS["WanTransformer3DModel"] == {"prompt_embeds": "encoder_hidden_states"}
    with pytest.raises(ValueError, match=r"patches \(1, p, p\)"):
        layouts.geometry("WanTransformer3DModel", {"in_channels": 3, "out_channels": 3, "patch_size": (2, 2, 2)})


@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"K{k}")
def test_gm_student_starts_at_the_teacher(k):
    teacher = tiny_wan()
    student = build_student(teacher, "GMFlow", num_components=k, init_noise=0.0, logstd_inner_dim=16).eval()
    x, t, kwargs = wan_inputs()
    with torch.no_grad():
        ref = teacher(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
        out = student(x, t, **kwargs)
    assert ref.shape == x.shape
    b = x.shape[0]
    assert isinstance(out, GMFlowOutput)
    assert out.means.shape == (b, k, C, T, H, W)
    assert out.logweights.shape == (b, k, 1, T, H, W)
    assert out.logstds.shape == (b, 1, 1, 1, 1, 1)
    torch.testing.assert_close(out.logstds, torch.full_like(out.logstds, math.log(0.05)), atol=1e-6, rtol=0)
    for i in range(k):
        torch.testing.assert_close(out.means[:, i], ref, atol=1e-6, rtol=0)
    velocity = (out.logweights.exp() * out.means).sum(1)  # the mixture's mean velocity at the source point
    torch.testing.assert_close(velocity, ref, atol=1e-5, rtol=1e-5)


def test_dx_student_starts_at_the_teacher():
    teacher = tiny_wan()
    student = build_student(teacher, "DX", num_points=4).eval()
    x, t, kwargs = wan_inputs(batch=3)
    with torch.no_grad():
        ref = teacher(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
        out = student(x, t, **kwargs)
    assert isinstance(out, DXOutput) and out.grid.shape == (3, 4, C, T, H, W)
    for n in range(4):
        torch.testing.assert_close(out.grid[:, n], ref, atol=1e-6, rtol=0)


def test_init_noise_is_per_component_and_channel():
    teacher = tiny_wan()
    student = build_student(teacher, num_components=4, logstd_inner_dim=16, generator=torch.Generator().manual_seed(5))
    x, t, kwargs = wan_inputs()
    with torch.no_grad():
        ref = teacher(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
        offset = student.eval()(x, t, **kwargs).means - ref[:, None]  # (B, K, C, T, H, W)
    per_kc = offset[0, :, :, 0, 0, 0]
    torch.testing.assert_close(offset, per_kc[None, :, :, None, None, None].expand_as(offset), atol=1e-5, rtol=0)
    assert per_kc.abs().min() > 0


def test_forward_matches_a_hand_trunk_call():
    student = build_student(tiny_wan(), num_components=3, logstd_inner_dim=16).eval()
    x, t, kwargs = wan_inputs()
    with torch.no_grad():
        out = student(x, t, **kwargs)
        raw = student.trunk(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]  # Wan takes t = sigma * 1000
        native = student.forward_native(hidden_states=x, timestep=t, **kwargs)
        temb = student.trunk.condition_embedder.time_embedder(
            student.trunk.condition_embedder.timesteps_proj(t).float()
        )
        logstds = student.proj_out_logstds(temb)
    assert raw.shape == (2, 3 * C + 3, T, H, W)  # the trunk's own unpatchify: (B, K*C + K, T, H, W)
    torch.testing.assert_close(out.means, raw[:, : 3 * C].unflatten(1, (3, C)), atol=0, rtol=0)
    torch.testing.assert_close(out.logweights, torch.log_softmax(raw[:, 3 * C :], dim=1).unsqueeze(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logstds, logstds.reshape(2, 1, 1, 1, 1, 1), atol=1e-6, rtol=0)
    for key in out.keys():
        assert torch.equal(getattr(out, key), getattr(native, key)), key


@pytest.mark.parametrize("policy", ["GMFlow", "DX"])
def test_save_and_load_round_trip_exactly(tmp_path, policy):
    student = build_student(tiny_wan(), policy, num_components=3, num_points=3, logstd_inner_dim=16).eval()
    student.save_pretrained(tmp_path)
    loaded = PiFlowStudent.from_pretrained(tmp_path).eval()
    a, b = student.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, kwargs = wan_inputs()
    with torch.no_grad():
        out_a, out_b = student(x, t, **kwargs), loaded(x, t, **kwargs)
    for key in out_a.keys():
        assert torch.equal(getattr(out_a, key), getattr(out_b, key)), key


def test_tied_teacher_is_the_teacher():
    teacher = tiny_wan()
    student = build_student(teacher, num_components=2, logstd_inner_dim=16).eval()
    student.attach_teacher_head(teacher.proj_out)
    x, t, kwargs = wan_inputs()
    with torch.no_grad():
        ref = teacher(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
        torch.testing.assert_close(student(x, t, as_teacher=True, **kwargs), ref, atol=0, rtol=0)


def test_image_latents_are_refused_with_the_video_shape():
    student = build_student(tiny_wan(), num_components=2, logstd_inner_dim=16).eval()
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\) with C = 3"):
        student(torch.randn(1, C, H, W), 500.0, encoder_hidden_states=torch.randn(1, TEXT_LEN, TEXT_DIM))
    with pytest.raises(ValueError, match="multiples of 2"):
        student(torch.randn(1, C, T, 5, W), 500.0, encoder_hidden_states=torch.randn(1, TEXT_LEN, TEXT_DIM))


# ---------------------------------------------------------------------------- to_piflow(WanPipeline)

FRAMES, SIZE = 5, 16  # pixels; the tiny VAE downsamples by 2 in time and space: latents (C, 3, 8, 8)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """The tiny random WanPipeline (UMT5 text encoder, AutoencoderKLWan, T5 tokenizer), saved as a real one is."""
    from piflow_kernels.tiny import save_tiny_pipeline

    return save_tiny_pipeline("wan", tmp_path_factory.mktemp("wan") / "pipe", seed=0)


def wan_pipe(folder):
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_student(pipe, policy_type="GMFlow"):
    g = torch.Generator().manual_seed(7)
    return build_student(pipe.transformer, policy_type, num_components=3, num_points=4, logstd_inner_dim=16, generator=g).eval()


@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
def test_wan_pipeline_matches_a_hand_loop(wan_folder, policy_type):
    from piflow_kernels import to_piflow
    from piflow_kernels.pipelines import PiFlowPipelineScheduler

    steps, shift, f = 3, 3.0, 0.5
    seg = 1.0 / (steps - 1 + f)
    options = {"temperature": 0.7} if policy_type == "GMFlow" else {"dx_segment_size": seg, "dx_shift": shift}
    pipe = wan_pipe(wan_folder)
    student = wan_student(pipe, policy_type)
    to_piflow(pipe, student, final_step_size_scale=f, **options)
    assert isinstance(pipe.scheduler, PiFlowPipelineScheduler)
    assert pipe.scheduler.config.shift == 3.0  # the UniPC scheduler's flow_shift
    x0 = torch.randn(2, C, 3, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "a blue car on the sky"]
    kw = {"num_frames": FRAMES, "height": SIZE, "width": SIZE, "max_sequence_length": 16}
    got = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, latents=x0, output_type="latent", **kw).frames
    assert got.shape == x0.shape and torch.isfinite(got).all()
    embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16)
    dx = None if policy_type == "GMFlow" else seg
    from test_pipelines import manual_loop

    ref = manual_loop(student, x0, steps, shift, f, {"encoder_hidden_states": embeds}, 0.7, dx)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the pipeline's own noise (its generator) gives the same video as those latents drawn by hand
    g = torch.Generator().manual_seed(4)
    drawn = torch.randn(1, C, 3, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(4))
    a = pipe("a cat", num_inference_steps=steps, guidance_scale=1.0, generator=g, output_type="latent", **kw).frames
    b = pipe("a cat", num_inference_steps=steps, guidance_scale=1.0, latents=drawn, output_type="latent", **kw).frames
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_wan_pipeline_decodes_a_video_and_saves(wan_folder, tmp_path):
    from piflow_kernels import load_piflow_pipeline, to_piflow

    pipe = to_piflow(wan_pipe(wan_folder), wan_student(wan_pipe(wan_folder)), num_inference_steps=2)
    kw = {"num_frames": FRAMES, "height": SIZE, "width": SIZE, "max_sequence_length": 16, "guidance_scale": 1.0}
    video = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames
    assert video.shape == (1, FRAMES, SIZE, SIZE, 3)
    pipe.save_pretrained(tmp_path / "pi")
    loaded = load_piflow_pipeline(tmp_path / "pi")
    loaded.set_progress_bar_config(disable=True)
    again = loaded("a cat", generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames
    assert again.shape == video.shape
    assert abs(again - video).max() < 1e-5  # the default step count (2) came back too


def test_wan_pipeline_refuses_guidance_and_two_stage_denoising(wan_folder):
    from piflow_kernels import to_piflow

    pipe = wan_pipe(wan_folder)
    to_piflow(pipe, wan_student(pipe))
    kw = {"num_frames": FRAMES, "height": SIZE, "width": SIZE, "max_sequence_length": 16, "output_type": "latent"}
    with pytest.raises(ValueError, match="guidance_scale=1.0"):
        pipe("a cat", num_inference_steps=2, **kw)  # WanPipeline's default guidance_scale is 5.0
    two_stage = wan_pipe(wan_folder)
    two_stage.register_modules(transformer_2=tiny_wan())
    with pytest.raises(ValueError, match="transformer_2"):
        to_piflow(two_stage, wan_student(two_stage))
    ti2v = wan_pipe(wan_folder)
    ti2v.register_to_config(expand_timesteps=True)
    with pytest.raises(ValueError, match="expand_timesteps"):
        to_piflow(ti2v, wan_student(ti2v))


# ---------------------------------------------------------------------------- the trainer on video latents

MSL = 8  # UMT5 tokens


@pytest.fixture(scope="module")
def wan_cache(wan_folder, tmp_path_factory):
    from piflow_kernels.distill.prompt_cache import encode_prompts
    from piflow_kernels.tiny import tiny_prompts

    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("wan_cache") / "cache"
    return encode_prompts(wan_folder, tiny_prompts(8), out, batch_size=4, dtype="float32", progress=False,
                          max_sequence_length=MSL)  # fmt: skip


def video_config(out_dir, pipeline, cache, **changes) -> dict:
    """A tiny data-free LoRA run on the Wan teacher: latents (3, 3 frames, 4, 4), K = 2."""
    cfg = {
        "seed": 3, "max_iters": 3, "out_dir": str(out_dir), "log_every": 0, "progress": False, "tensorboard": False,
        "teacher": {"kind": "diffusers", "pretrained": str(pipeline)},
        "student": {"kind": "diffusers", "num_components": 2, "lora_rank": 4, "lora_dropout": 0.0,
                    "kwargs": {"logstd_inner_dim": 8}},
        "data": {"mode": "data_free", "batch_size": 2, "channels": C, "frames": 3, "height": 4, "width": 4,
                 "prompt_cache": str(cache)},
        "optim": {"lr": 1e-3},
        "ema": {"decay": 0.5},
        "piid": {"nfe": 2, "total_substeps": 8, "num_intermediate_states": 1},
    }  # fmt: skip
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def test_data_frames_defaults_to_images_and_is_checked():
    from piflow_kernels.distill.config import ConfigError, TrainConfig

    assert TrainConfig.from_dict({"data": {"mode": "data_free"}}).data.frames == 0
    with pytest.raises(ConfigError, match="data.frames"):
        TrainConfig.from_dict({"data": {"mode": "data_free", "frames": -1}})
    with pytest.raises(ConfigError, match="data.frames.*data_free"):
        TrainConfig.from_dict({"data": {"mode": "data_dependent", "frames": 3}})


@pytest.mark.usefixtures("one_thread")
def test_the_prompt_cache_holds_what_wan_encode_prompt_returns(wan_folder, wan_cache):
    from piflow_kernels.distill.prompt_cache import PromptCache
    from piflow_kernels.tiny import tiny_prompts

    cache = PromptCache(wan_cache)
    pipe = wan_pipe(wan_folder)
    # the cache's first batch of 4 prompts, encoded again as one batch
    embeds, _ = pipe.encode_prompt(tiny_prompts(8)[:4], do_classifier_free_guidance=False, max_sequence_length=MSL)
    for i in range(4):
        assert set(cache[i]) == {"prompt_embeds"}
        torch.testing.assert_close(cache[i]["prompt_embeds"], embeds[i], atol=1e-6, rtol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_a_wan_teacher_distills_data_free_on_video_latents(tmp_path, wan_folder, wan_cache):
    from piflow_kernels.distill.builders import build_teacher
    from piflow_kernels.distill.config import TrainConfig
    from piflow_kernels.distill.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(video_config(tmp_path, wan_folder, wan_cache)))
    _, x, cond = trainer._micro_batch(0, 0)
    assert x.shape == (2, C, 3, 4, 4)  # (B, C, frames, H, W)
    assert set(cond) == {"encoder_hidden_states"} and cond["encoder_hidden_states"].shape == (2, MSL, TEXT_DIM)
    # LoRA on the feed-forward layers and the timestep embedder; the head and log-std MLP trained fully
    names = {n for n, p in trainer.student.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith(("trunk.proj_out.", "proj_out_logstds.")) for n in names)
    adapted = {n.split(".lora_")[0] for n in names if ".lora_" in n}
    assert {"trunk.blocks.0.ffn.net.0.proj", "trunk.blocks.1.ffn.net.2"} <= adapted
    assert "trunk.condition_embedder.time_embedder.linear_1" in adapted and not any("attn" in n for n in adapted)
    # the tied teacher is the separately loaded model, bit for bit, before and after training
    ref, model, _ = build_teacher(trainer.cfg)
    t = torch.rand(2, generator=torch.Generator().manual_seed(5)) * 900 + 50
    with torch.no_grad():
        before = trainer.teacher(x, t, **cond)
        assert before.shape == x.shape
        assert torch.equal(before, ref(x, t, **cond))
        assert torch.equal(before, model(hidden_states=x, timestep=t, **cond, return_dict=False)[0])
    record = trainer.train()
    assert math.isfinite(record["loss"]) and record["loss"] > 0
    with torch.no_grad():
        assert torch.equal(trainer.teacher(x, t, **cond), before)
    # the student folder loads, and is the EMA student with its adapters merged
    student = PiFlowStudent.from_pretrained(tmp_path / "students" / "iter_00000003").eval()
    assert student.teacher_class == "WanTransformer3DModel"
    with torch.no_grad():
        out, ema = student(x, t, **cond), trainer.ema.module(x, t, **trainer._student_cond(cond))
    assert out.means.shape == (2, 2, C, 3, 4, 4)
    for name in ("means", "logweights", "logstds"):
        torch.testing.assert_close(getattr(out, name), getattr(ema, name), rtol=1e-5, atol=1e-5)


def test_a_video_run_evaluates_against_the_teachers_samples(tmp_path, wan_folder, wan_cache):
    from piflow_kernels.distill.config import TrainConfig
    from piflow_kernels.distill.trainer import Trainer

    cfg = video_config(tmp_path, wan_folder, wan_cache)
    cfg.update(max_iters=2, eval_every=2, save_student=False)
    cfg["eval"] = {"num_prompts": 2, "teacher_steps": 3, "batch_size": 2}
    trainer = Trainer(TrainConfig.from_dict(cfg))
    trainer.train()
    assert trainer._text_eval.noise.shape == (2, C, 3, 4, 4)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/latent_rms" in r]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval/latent_rms"]) and evals[0]["eval/latent_rms"] > 0
    from PIL import Image

    # the first frame of each video, decoded by the pipeline's AutoencoderKLWan: 4 x 4 latents are 8 x 8 pixels
    # (a latent preview would be 4 x 4); 2 prompts, the student's row above the teacher's, 2-pixel gaps
    assert Image.open(tmp_path / "eval" / "iter_00000002.png").size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
