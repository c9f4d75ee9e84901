"""Drop-in pi-Flow sampling in stock FluxPipeline / StableDiffusion3Pipeline, end to end on CPU.

Tiny randomly initialised components are built offline; the text encoders are skipped by passing
precomputed prompt embeddings. The pipeline path must equal a manual loop written from the public
pieces (student -> make_policy -> rollout -> FlowMapSDE) on the same latents.
"""

from __future__ import annotations

import io

import pytest
import torch

from piflow_kernels import GMFlowOutput, dynamic_shift, make_policy, reference

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the stock pipelines import their text encoders' classes
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline  # noqa: E402
from test_students import POOLED_DIM, TEXT_DIM, TEXT_LEN, pack, tiny_teacher, unpack  # noqa: E402

from piflow_kernels import PiFlowScheduler, build_student, sample, to_piflow  # noqa: E402
from piflow_kernels.pipelines import PiFlowPipelineScheduler, PiFlowTransformer  # noqa: E402

BATCH, HEIGHT, WIDTH = 2, 16, 24  # pixels; the tiny VAE downsamples by 2: latents 8 x 12 (FLUX: 4 x 6 tokens)
LAT_H, LAT_W = HEIGHT // 2, WIDTH // 2


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(11)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
        shift_factor=0.1, scaling_factor=0.5,
    ).eval()  # fmt: skip


def flux_pipe() -> FluxPipeline:
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=tiny_vae(3),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tiny_teacher("flux"),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipe() -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(5), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=tiny_teacher("sd3"),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt(seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g),
        "pooled_prompt_embeds": torch.randn(BATCH, POOLED_DIM, generator=g),
    }


def student_for(pipe, policy_type: str = "GMFlow"):
    g = torch.Generator().manual_seed(7)
    return build_student(pipe.transformer, policy_type, num_components=3, num_points=4, logstd_inner_dim=16, generator=g).eval()


def converted(kind: str, policy_type: str = "GMFlow", **scheduler_kwargs):
    pipe = flux_pipe() if kind == "flux" else sd3_pipe()
    student = student_for(pipe, policy_type)
    scheduler = PiFlowScheduler(policy_type=policy_type, **scheduler_kwargs)
    return to_piflow(pipe, student, scheduler), student


def call(pipe, kind: str, steps: int, **kwargs):
    defaults = {"height": HEIGHT, "width": WIDTH, "num_inference_steps": steps}
    defaults["guidance_scale"] = 3.5 if kind == "flux" else 1.0
    return pipe(**prompt(), **{**defaults, **kwargs})


@torch.no_grad()
def rollout_loop(policy_at, x, sigmas, shift, temperature=1.0, dx=None):
    """FlowMapSDE with h = 0 over ``sigmas`` from the public pieces: the policy at each sigma (``policy_at(x, t)``,
    t = sigma * 1000 in float32, in the layout of ``x``: image, video or tokens), rolled out to the next."""
    n = len(sigmas) - 1
    for i in range(n):
        out = policy_at(x, torch.tensor(sigmas[i], dtype=torch.float32) * 1000)
        if dx is None:
            policy = make_policy(out, x, sigmas[i])
            if i < n - 1:
                policy = policy.temperature(temperature)
        else:
            policy = make_policy(out, x, sigmas[i], segment_size=dx, shift=shift)
        x_dst = policy.rollout(x, sigmas[i], sigmas[i + 1], total_substeps=128, shift=shift)
        _, m = reference.flowmap_sde_dst(sigmas[i], sigmas[i + 1], 0)
        x = reference.flowmap_sde_step(x_dst, sigmas[i + 1], m, torch.zeros_like(x_dst))
    return x


def manual_loop(student, x, steps, shift, f, cond, temperature=1.0, dx=None):
    """The sampler written from the public pieces on the student's latents, h = 0 (deterministic FlowMapSDE)."""
    sigmas = reference.flowmap_sde_sigmas(steps, shift, f).tolist()
    return rollout_loop(lambda x, t: student(x, t, **cond), x, sigmas, shift, temperature, dx)


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_pipeline_matches_manual_loop(kind, policy_type):
    steps, shift, f = 3, 3.0, 0.5
    seg = 1.0 / (steps - 1 + f)
    options = {"temperature": 0.7} if policy_type == "GMFlow" else {"dx_segment_size": seg, "dx_shift": shift}
    pipe, student = converted(kind, policy_type, shift=shift, final_step_size_scale=f, **options)
    c = student.latent_channels
    x0 = torch.randn(BATCH, c, LAT_H, LAT_W, generator=torch.Generator().manual_seed(0))
    latents = pack(x0) if kind == "flux" else x0
    got = call(pipe, kind, steps, latents=latents, output_type="latent").images
    if kind == "flux":
        assert got.shape == (BATCH, LAT_H * LAT_W // 4, 4 * c)  # the pipeline keeps its packed latents
        got = unpack(got, LAT_H, LAT_W)
    cond = {"encoder_hidden_states": prompt()["prompt_embeds"], "pooled_projections": prompt()["pooled_prompt_embeds"]}
    if kind == "flux":
        cond["guidance"] = torch.full((BATCH,), 3.5)
    ref = manual_loop(student, x0, steps, shift, f, cond, temperature=0.7, dx=None if policy_type == "GMFlow" else seg)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the library's own loop drives the same student in image layout
    looped = sample(student, x0, steps, PiFlowScheduler.from_config(pipe.scheduler.config), progress=False, **cond)
    torch.testing.assert_close(looped, ref, atol=1e-5, rtol=1e-5)
    # the stock grid linspace(1, 1/n, n) that FLUX passes was replaced: the final step keeps its scale f
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), reference.flowmap_sde_sigmas(steps, shift, f), atol=1e-6, rtol=0)


def test_qwen_image_pipeline_matches_manual_loop():
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=3, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 3, latents_std=[1.0] * 3)  # fmt: skip
    pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(shift=3.0), vae, None, None, tiny_teacher("qwen"))
    pipe.set_progress_bar_config(disable=True)
    student = student_for(pipe)
    to_piflow(pipe, student, PiFlowScheduler(shift=3.0, final_step_size_scale=0.5, temperature=0.7))
    x0 = torch.randn(BATCH, 3, LAT_H, LAT_W, generator=torch.Generator().manual_seed(0))
    embeds, mask = prompt()["prompt_embeds"], torch.ones(BATCH, TEXT_LEN, dtype=torch.long)
    got = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, height=HEIGHT, width=WIDTH, num_inference_steps=3,
               latents=pack(x0), output_type="latent").images  # fmt: skip
    cond = {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}
    ref = manual_loop(student, x0, 3, 3.0, 0.5, cond, temperature=0.7)
    torch.testing.assert_close(unpack(got, LAT_H, LAT_W), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_decoded_images_are_deterministic_with_a_generator(kind):
    pipe, _ = converted(kind, shift=3.0)
    images = [call(pipe, kind, 2, generator=torch.Generator().manual_seed(s), output_type="np").images for s in (0, 0, 1)]
    assert images[0].shape == (BATCH, HEIGHT, WIDTH, 3)
    assert all(bool((im >= 0).all() and (im <= 1).all()) for im in images)
    assert (images[0] == images[1]).all()
    assert (images[0] != images[2]).any()


def test_bf16_pipeline_keeps_its_dtype():
    pipe, _ = converted("flux", shift=3.0)
    pipe.to(torch.bfloat16)
    embeds = {k: v.bfloat16() for k, v in prompt().items()}
    latents = pipe(**embeds, height=HEIGHT, width=WIDTH, num_inference_steps=2, guidance_scale=3.5, output_type="latent").images
    assert latents.dtype == torch.bfloat16 and torch.isfinite(latents).all()
    assert pipe.transformer.dtype == torch.bfloat16


def test_renoising_noise_comes_from_the_scheduler_generator():
    pipe, _ = converted("flux", shift=3.0, h=0.5)
    results = []
    for seed in (4, 4, 5):
        pipe.scheduler.generator = torch.Generator().manual_seed(seed)
        results.append(call(pipe, "flux", 2, generator=torch.Generator().manual_seed(0), output_type="latent").images)
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)
    assert not torch.allclose(results[0], results[2])
    assert all(torch.isfinite(r).all() for r in results)


def test_callbacks_progress_bar_and_elastic_steps():
    pipe, _ = converted("flux", shift=3.0)
    bar = io.StringIO()
    pipe.set_progress_bar_config(file=bar, disable=False, ncols=80)
    seen = []

    def on_step_end(p, i, t, tensors):
        seen.append((i, float(t), tuple(tensors["latents"].shape)))
        return {}

    call(pipe, "flux", 3, callback_on_step_end=on_step_end, output_type="latent")
    assert [s[0] for s in seen] == [0, 1, 2]
    assert all(shape == (BATCH, LAT_H * LAT_W // 4, 12) for *_, shape in seen)
    assert seen[0][1] == pytest.approx(1000.0) and seen[1][1] < seen[0][1]
    assert "3/3" in bar.getvalue()
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2):  # any number of steps: elastic NFE
        assert torch.isfinite(call(pipe, "flux", steps, output_type="latent").images).all()


def test_dynamic_shift_uses_the_scheduler_constants():
    pipe, _ = converted("flux", use_dynamic_shifting=True, base_logshift=0.3, max_logshift=1.4, base_seq_len=16, max_seq_len=64)
    call(pipe, "flux", 2, output_type="latent")
    tokens = LAT_H * LAT_W // 4
    assert pipe.scheduler.shift == pytest.approx(dynamic_shift(tokens, 16, 64, 0.3, 1.4), rel=1e-6)
    cfg = pipe.scheduler.config
    assert (cfg.base_shift, cfg.max_shift, cfg.base_image_seq_len, cfg.max_image_seq_len) == (0.3, 1.4, 16, 64)


def test_defaults_and_reconversion(tmp_path):
    pipe = sd3_pipe()
    first = to_piflow(pipe, student_for(pipe))  # no scheduler: the pipeline's own config, policy type of the student
    assert isinstance(pipe.transformer, PiFlowTransformer) and isinstance(pipe.scheduler, PiFlowPipelineScheduler)
    assert first is pipe and pipe.scheduler.config.shift == 3.0 and pipe.scheduler.config.policy_type == "GMFlow"
    with pytest.raises(TypeError, match="already a student's trunk"):
        build_student(pipe.transformer.student.trunk)
    dx = build_student(tiny_teacher("sd3"), "DX", num_points=2)  # re-convert with another student
    to_piflow(pipe, dx, PiFlowScheduler(policy_type="DX"))
    assert pipe.transformer.student is dx and pipe.scheduler.config.policy_type == "DX"
    assert torch.isfinite(call(pipe, "sd3", 2, output_type="latent").images).all()
    pipe.scheduler.save_config(tmp_path)
    again = PiFlowPipelineScheduler.from_pretrained(tmp_path)
    assert again.config.policy_type == "DX" and again.config.base_image_seq_len == 256
    # the wrapper stands in for the teacher where pipelines look
    assert pipe.transformer.config.in_channels == 5 and pipe.transformer.dtype == torch.float32


# ---------------------------------------------------------------------------- bad input


def test_classifier_free_guidance_is_refused_with_the_fix_named():
    pipe, _ = converted("sd3")
    with pytest.raises(ValueError, match="guidance_scale=1.0"):
        call(pipe, "sd3", 2, guidance_scale=5.0, negative_prompt_embeds=prompt(4)["prompt_embeds"],
             negative_pooled_prompt_embeds=prompt(4)["pooled_prompt_embeds"], output_type="latent")  # fmt: skip
    pipe, _ = converted("flux")
    with pytest.raises(ValueError, match="true_cfg_scale"):
        call(pipe, "flux", 2, true_cfg_scale=2.0, negative_prompt_embeds=prompt(4)["prompt_embeds"],
             negative_pooled_prompt_embeds=prompt(4)["pooled_prompt_embeds"], output_type="latent")  # fmt: skip


def test_to_piflow_bad_arguments():
    pipe = flux_pipe()
    student = student_for(pipe)
    with pytest.raises(TypeError, match="PiFlowStudent"):
        to_piflow(pipe, pipe.transformer)
    with pytest.raises(TypeError, match="transformer and a scheduler"):
        to_piflow(object(), student)
    with pytest.raises(ValueError, match="built from a SD3Transformer2DModel"):
        to_piflow(pipe, build_student(tiny_teacher("sd3"), logstd_inner_dim=16))
    with pytest.raises(ValueError, match="in_channels"):
        other = build_student(type(pipe.transformer)(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
        ), logstd_inner_dim=16)  # fmt: skip
        to_piflow(pipe, other)
    with pytest.raises(TypeError, match="must be a PiFlowScheduler"):
        to_piflow(pipe, student, FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="policy_type is 'DX'"):
        to_piflow(pipe, student, PiFlowScheduler(policy_type="DX"))
    assert isinstance(pipe.transformer, type(tiny_teacher("flux")))  # nothing was changed by the failed calls


def test_packed_step_checks_the_policy_layout():
    scheduler = PiFlowPipelineScheduler(shift=3.0)
    scheduler.set_timesteps(2)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 6, 12, generator=g)  # packed (B, L, 4C) with C = 3
    image = GMFlowOutput(
        torch.randn(2, 3, 3, 4, 6, generator=g), torch.randn(2, 3, 1, 4, 6, generator=g), torch.zeros(2, 1, 1, 1, 1)
    )
    with pytest.raises(ValueError, match=r"token-layout policy output with means / grid of shape \(B, K, C, L, p2\)"):
        scheduler.step(
            GMFlowOutput(image.means[..., 0], image.logweights[..., 0], image.logstds[..., 0]), scheduler.timesteps[0], sample
        )
    tokens = GMFlowOutput(torch.randn(2, 3, 3, 5, 4, generator=g), torch.randn(2, 3, 1, 5, 4, generator=g).log_softmax(1),
                          torch.zeros(2, 1, 1, 1, 1))  # fmt: skip
    with pytest.raises(ValueError, match=r"\(B, L, C\*p2\) = \(2, 5, 12\)"):
        scheduler.step(tokens, scheduler.timesteps[0], sample)
    with pytest.raises(ValueError, match="noise must have the shape of sample"):
        scheduler.step(tokens, scheduler.timesteps[0], torch.randn(2, 5, 12), noise=torch.randn(2, 12, 5))
    out = scheduler.step(tokens, scheduler.timesteps[0], torch.randn(2, 5, 12, generator=g)).prev_sample
    assert out.shape == (2, 5, 12) and torch.isfinite(out).all()


def test_unconverted_pipeline_cannot_consume_a_policy_silently():
    """A stock scheduler given a student's output fails loudly instead of broadcasting the means."""
    out = GMFlowOutput(torch.randn(1, 2, 3, 4, 4), torch.randn(1, 2, 1, 4, 4), torch.zeros(1, 1, 1, 1, 1))
    stock = FlowMatchEulerDiscreteScheduler()
    stock.set_timesteps(2)
    with pytest.raises(TypeError):
        stock.step(out, stock.timesteps[0], torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="cannot be indexed"):
        out[0]
