"""The building blocks of a text-to-image evaluation (piflow_kernels.distill.eval_grid), offline on CPU.

The teacher's Euler sampler is checked against the exact flow map of Gaussian-mixture data (closed form for a
single Gaussian per class, a float64 RK4 run otherwise) and against diffusers' FlowMatchEulerDiscreteScheduler;
decoding against the stock pipelines' own decode path on tiny random VAEs; the grid by reading the PNG back.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (  # noqa: E402
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
)
from PIL import Image  # noqa: E402
from test_pipelines import tiny_vae  # noqa: E402
from test_prompt_cache import PROMPTS, encode, save_flux  # noqa: E402
from test_students import POOLED_DIM, TEXT_DIM, TEXT_LEN, pack, tiny_teacher  # noqa: E402

from piflow_kernels import tiny  # noqa: E402
from piflow_kernels.distill.eval_grid import (  # noqa: E402
    EvalPrompts,
    decode_latents,
    euler_sigmas,
    fixed_noise,
    latents_preview,
    paired_latent_distance,
    save_grid,
    teacher_samples,
)
from piflow_kernels.distill.prompt_cache import PromptCache, encode_prompts  # noqa: E402
from piflow_kernels.distill.prompts import Prompt  # noqa: E402
from piflow_kernels.distill.teachers import ExactGMTeacher, GaussianMixtureData  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

SHAPE = (3, 4, 4)


def gm_teacher(num_components: int = 4, std: float = 0.2, seed: int = 0) -> ExactGMTeacher:
    g = torch.Generator().manual_seed(seed)
    return ExactGMTeacher(GaussianMixtureData.random(SHAPE, num_components=num_components, std=std, generator=g))


def randn(*shape, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@torch.no_grad()
def rk4(teacher, noise: torch.Tensor, n: int, shift: float) -> torch.Tensor:
    """A float64 fourth-order solution of dx/dsigma = u(x, sigma) from 1 to 0, written independently of the library."""
    raw = [1 - i / n for i in range(n + 1)]
    s = [shift * r / (1 + (shift - 1) * r) for r in raw]
    f = lambda x, sig: teacher(x, torch.full((x.shape[0],), sig * 1000, dtype=torch.float64))
    x = noise.double()
    for a, b in zip(s[:-1], s[1:]):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + h / 2 * k1, a + h / 2)
        k3 = f(x + h / 2 * k2, a + h / 2)
        k4 = f(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------- the teacher's Euler sampler


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("n", [1, 4, 28, 50])
def test_sigma_grid_is_diffusers_flow_match_euler_grid(n, shift):
    # FluxPipeline / QwenImagePipeline pass sigmas = linspace(1, 1/n, n); the scheduler shifts them and appends 0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    ours = euler_sigmas(n, shift)
    assert ours.dtype == torch.float64 and ours.shape == (n + 1,) and ours[0] == 1 and ours[-1] == 0
    torch.testing.assert_close(ours, scheduler.sigmas.double(), atol=2e-7, rtol=0)  # the scheduler runs in float32
    assert torch.equal(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)


def test_teacher_samples_equal_the_diffusers_euler_loop():
    teacher, noise, n, shift = gm_teacher(), randn(5, *SHAPE), 12, 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(teacher(x, t.expand(5)), t, x).prev_sample
    got = teacher_samples(teacher, noise, n, shift=shift)
    assert got.dtype == torch.float32 and got.shape == noise.shape
    torch.testing.assert_close(got, x, atol=2e-5, rtol=0)


def test_teacher_samples_converge_to_the_exact_flow_map_of_a_gaussian():
    # one Gaussian N(mu, std^2 I): x_sigma = (1 - sigma) mu + sqrt((1 - sigma)^2 std^2 + sigma^2) z along the ODE,
    # so the flow map from sigma = 1 (x = z = noise) to 0 is mu + std * noise
    teacher = gm_teacher(num_components=1, std=0.3)
    noise = randn(8, *SHAPE)
    exact = teacher.data.means[0] + 0.3 * noise.double()
    for shift in (1.0, 3.0):
        errs = [max_err(teacher_samples(teacher, noise, n, shift=shift, dtype=torch.float64), exact) for n in (8, 64, 512)]
        assert errs[0] > errs[1] > errs[2] and errs[1] / errs[2] > 6, errs  # first order: about 8x per 8x steps
        f32 = teacher_samples(teacher, noise, 512, shift=shift)
        assert f32.dtype == torch.float32 and max_err(f32, exact) < errs[2] + 1e-5


def test_teacher_samples_converge_to_the_float64_flow_map_of_a_mixture():
    teacher, noise, shift = gm_teacher(), randn(16, *SHAPE), 3.0
    ref = rk4(teacher, noise, 256, shift)  # 256 vs 1024 RK4 steps differ by < 1e-8 here
    errs = {n: max_err(teacher_samples(teacher, noise, n, shift=shift), ref) for n in (8, 64, 512)}
    assert errs[8] > errs[64] > errs[512] and errs[64] / errs[512] > 6 and errs[512] < 0.02, errs
    f64 = teacher_samples(teacher, noise, 512, shift=shift, dtype=torch.float64)
    assert f64.dtype == torch.float64 and max_err(f64, ref) == pytest.approx(errs[512], abs=1e-5)
    # the flow map carries noise onto the data: each sample lies about std from its nearest component mean
    nearest = torch.cdist(ref.flatten(1), teacher.data.means.flatten(1)).min(1).values / math.sqrt(ref[0].numel())
    assert nearest.mean().item() == pytest.approx(0.2, rel=0.15)


def test_conditioning_reaches_every_teacher_call():
    # a class-conditional mixture with one Gaussian per class: the flow map given label y is mu_y + std * noise
    teacher = gm_teacher(num_components=3, std=0.25)
    noise, labels = randn(6, *SHAPE), torch.tensor([0, 1, 2, 2, 1, 0])
    exact = teacher.data.means[labels] + 0.25 * noise.double()
    coarse = max_err(teacher_samples(teacher, noise, 32, labels=labels, dtype=torch.float64), exact)
    fine = max_err(teacher_samples(teacher, noise, 256, labels=labels, dtype=torch.float64), exact)
    assert fine < coarse / 6 and fine < 1e-2, (coarse, fine)
    assert max_err(teacher_samples(teacher, noise, 256, dtype=torch.float64), exact) > 0.5  # the labels mattered
    calls = []

    def spy(x, t, **cond):
        calls.append((x.dtype, t.dtype, tuple(t.shape), sorted(cond)))
        return torch.zeros_like(x)

    out = teacher_samples(spy, noise, 3, shift=2.0, num_train_timesteps=1, labels=labels, extra=1)
    assert torch.equal(out, noise) and calls == [(torch.float32, torch.float32, (6,), ["extra", "labels"])] * 3


def test_teacher_samples_read_diffusers_style_outputs_and_pass_timesteps_in_train_units():
    seen = []

    class Out:
        def __init__(self, sample):
            self.sample = sample

    def model(x, t):
        seen.append(t[0].item())
        return Out(torch.ones_like(x))

    noise = randn(2, *SHAPE)
    out = teacher_samples(model, noise, 4, shift=3.0, num_train_timesteps=500)
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), euler_sigmas(4, 3.0)[:-1] * 500, atol=1e-4, rtol=0)
    torch.testing.assert_close(out, noise - 1)  # x0 = x1 - integral of u = 1 over sigma from 1 to 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"num_steps": 2.5}, TypeError, "num_steps"),
        ({"shift": 0.0}, ValueError, "shift"),
        ({"num_train_timesteps": -1}, ValueError, "num_train_timesteps"),
        ({"noise": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "noise"),
        ({"noise": torch.zeros(5)}, ValueError, "noise"),
        ({"noise": torch.zeros(0, 3, 4, 4)}, ValueError, "noise"),
        ({"teacher": "not a model"}, TypeError, "teacher"),
        ({"teacher": lambda x, t: x[:, :1]}, ValueError, "velocity of shape"),
        ({"dtype": torch.float16}, ValueError, "dtype"),
    ],
)
def test_teacher_samples_bad_inputs(kwargs, error, message):
    args = {"teacher": gm_teacher(), "noise": randn(2, *SHAPE), "num_steps": 4, **kwargs}
    teacher, noise, n = args.pop("teacher"), args.pop("noise"), args.pop("num_steps")
    with pytest.raises(error, match=message):
        teacher_samples(teacher, noise, n, **args)


# ---------------------------------------------------------------------------- paired distance


def test_paired_latent_distance_equals_the_hand_computation():
    student, teacher = randn(3, 2, 5, 4, seed=7), randn(3, 2, 5, 4, seed=8)
    got = paired_latent_distance(student, teacher)
    rms = [math.sqrt(sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / 40)
           for s, t in zip(student, teacher)]  # fmt: skip
    ref = [math.sqrt(sum(v * v for v in t.flatten().tolist()) / 40) for t in teacher]
    assert set(got) == {"per_sample_rms", "per_sample_relative", "mean_rms", "mean_relative"}
    assert got["per_sample_rms"] == pytest.approx(rms, rel=1e-6)
    assert got["per_sample_relative"] == pytest.approx([r / q for r, q in zip(rms, ref)], rel=1e-6)
    assert got["mean_rms"] == pytest.approx(sum(rms) / 3, rel=1e-6)
    assert got["mean_relative"] == pytest.approx(sum(r / q for r, q in zip(rms, ref)) / 3, rel=1e-6)
    assert all(isinstance(v, float) for v in (got["mean_rms"], got["mean_relative"], *got["per_sample_rms"]))
    # float64 reductions whatever the input dtype; bf16 inputs are read exactly
    half = paired_latent_distance(student.bfloat16(), teacher.bfloat16())
    exact = paired_latent_distance(student.bfloat16().double(), teacher.bfloat16().double())
    assert half == exact


def test_paired_latent_distance_edge_values():
    x = randn(2, 3, 4, 4)
    same = paired_latent_distance(x, x.clone())
    assert same["per_sample_rms"] == [0.0, 0.0] and same["mean_relative"] == 0.0
    zero = torch.zeros_like(x)
    assert paired_latent_distance(zero, zero)["per_sample_relative"] == [0.0, 0.0]
    assert paired_latent_distance(x, zero)["mean_relative"] == math.inf
    assert paired_latent_distance(x, 2 * x)["per_sample_relative"] == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize(
    "student, teacher, error, message",
    [
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5), ValueError, "one shape"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4), ValueError, "one shape"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), TypeError, "student_x0"),
        (torch.zeros(2, 3), [[0.0] * 3] * 2, TypeError, "teacher_x0"),
        (torch.zeros(0, 3), torch.zeros(0, 3), ValueError, "student_x0"),
        (torch.tensor(1.0), torch.tensor(1.0), ValueError, "student_x0"),
    ],
)
def test_paired_latent_distance_bad_inputs(student, teacher, error, message):
    with pytest.raises(error, match=message):
        paired_latent_distance(student, teacher)


# ---------------------------------------------------------------------------- decoding

BATCH, HEIGHT, WIDTH = 2, 16, 24  # pixels; the tiny VAEs downsample by 2
LAT_H, LAT_W = HEIGHT // 2, WIDTH // 2


def zero_velocity(transformer: torch.nn.Module) -> torch.nn.Module:
    """The transformer predicts 0: the pipeline's Euler steps keep its latents, so its output is their decode."""
    transformer.forward = lambda hidden_states, *args, **kwargs: (torch.zeros_like(hidden_states),)
    return transformer


def embeds(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(BATCH, POOLED_DIM, generator=g)


def qwen_vae() -> AutoencoderKLQwenImage:
    torch.manual_seed(5)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=3, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.1, -0.2, 0.3], latents_std=[0.5, 2.0, 1.5]).eval()  # fmt: skip


@torch.no_grad()
def test_decode_flux_and_sd3_equal_the_pipelines_decode_path():
    for kind, channels in (("flux", 3), ("sd3", 5)):
        vae = tiny_vae(channels)  # shift_factor 0.1, scaling_factor 0.5
        z = randn(BATCH, channels, LAT_H, LAT_W, seed=4)
        got = decode_latents(vae, z, kind)
        assert got.shape == (BATCH, 3, HEIGHT, WIDTH) and got.dtype == torch.float32 and got.device.type == "cpu"
        assert got.min() >= 0 and got.max() <= 1
        # diffusers/pipelines/flux/pipeline_flux.py and stable_diffusion_3/pipeline_stable_diffusion_3.py, __call__:
        #   latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        #   image = self.vae.decode(latents, return_dict=False)[0]
        #   image = self.image_processor.postprocess(image, output_type=output_type)   (denormalize: x / 2 + 0.5, clamp)
        image = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        assert torch.equal(got, (image / 2 + 0.5).clamp(0, 1))
        # and the stock pipeline itself, with a transformer that keeps the latents
        prompt_embeds, pooled = embeds()
        if kind == "flux":
            pipe = FluxPipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None, tokenizer=None,
                text_encoder_2=None, tokenizer_2=None, transformer=zero_velocity(tiny_teacher("flux")),
            )  # fmt: skip
            latents, extra = pack(z), {"guidance_scale": 3.5}
        else:
            pipe = StableDiffusion3Pipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None, tokenizer=None,
                text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                transformer=zero_velocity(tiny_teacher("sd3")),
            )  # fmt: skip
            latents, extra = z, {"guidance_scale": 1.0}
        pipe.set_progress_bar_config(disable=True)
        stock = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=HEIGHT, width=WIDTH, latents=latents,
                     num_inference_steps=2, output_type="pt", **extra).images  # fmt: skip
        assert torch.equal(got, stock)


@torch.no_grad()
def test_decode_sd3_without_a_shift_factor_and_in_batches():
    vae = tiny_vae(5)
    vae.register_to_config(shift_factor=None)
    z = randn(3, 5, LAT_H, LAT_W, seed=6)
    got = decode_latents(vae, z, "sd3")
    assert torch.equal(got, (vae.decode(z / 0.5, return_dict=False)[0] / 2 + 0.5).clamp(0, 1))
    torch.testing.assert_close(decode_latents(vae, z, "sd3", batch_size=2), got, atol=1e-6, rtol=0)


@torch.no_grad()
def test_decode_qwen_equals_the_pipelines_decode_path():
    vae = qwen_vae()
    z = randn(BATCH, 3, LAT_H, LAT_W, seed=4)
    got = decode_latents(vae, z, "qwen")
    assert got.shape == (BATCH, 3, HEIGHT, WIDTH) and got.dtype == torch.float32 and got.min() >= 0 and got.max() <= 1
    # diffusers/pipelines/qwenimage/pipeline_qwenimage.py, QwenImagePipeline.__call__ (latents (B, C, 1, H, W)):
    #   latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, self.vae.config.z_dim, 1, 1, 1)...
    #   latents_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, self.vae.config.z_dim, 1, 1, 1)...
    #   latents = latents / latents_std + latents_mean
    #   image = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
    mean = torch.tensor(vae.config.latents_mean).view(1, 3, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 3, 1, 1, 1)
    image = vae.decode(z[:, :, None] / std + mean, return_dict=False)[0][:, :, 0]
    assert torch.equal(got, (image / 2 + 0.5).clamp(0, 1))
    assert torch.equal(decode_latents(vae, z[:, :, None], "qwen"), got)  # a frame axis of 1 is accepted
    pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(shift=3.0), vae, None, None, zero_velocity(tiny_teacher("qwen")))
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds = embeds()[0]
    stock = pipe(prompt_embeds=prompt_embeds, prompt_embeds_mask=torch.ones(BATCH, TEXT_LEN, dtype=torch.long), height=HEIGHT,
                 width=WIDTH, latents=pack(z), num_inference_steps=2, output_type="pt").images  # fmt: skip
    assert torch.equal(got, stock)


def _zero_velocity_pipeline(kind: str):
    """The tiny ``kind`` pipeline (piflow_kernels.tiny) with an Euler scheduler and a transformer that predicts 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler as Euler

    torch.manual_seed(7)
    pipe = tiny._BUILDERS[kind]()
    pipe.scheduler = Euler(shift=3.0)
    pipe.transformer = zero_velocity(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_decode_flux2_equals_the_pipelines_decode_path():
    from diffusers import Flux2Pipeline

    pipe = _zero_velocity_pipeline("flux2")
    vae = pipe.vae
    vae.bn.running_mean.copy_(randn(12, seed=8))  # the batch norm of the 2x2-patchified channels, not the identity
    vae.bn.running_var.copy_(randn(12, seed=9).abs() + 0.5)
    z = randn(BATCH, 3, 8, 8, seed=4)  # the library's image layout: 3 channels, 2x2 patches of a 16 x 16 image
    got = decode_latents(vae, z, "flux2")
    assert got.shape == (BATCH, 3, 16, 16) and got.dtype == torch.float32 and got.min() >= 0 and got.max() <= 1
    # diffusers/pipelines/flux2/pipeline_flux2.py, Flux2Pipeline.__call__ (latents (B, 4 C, H/2, W/2)):
    #   latents = latents * sqrt(bn.running_var + batch_norm_eps) + bn.running_mean
    #   latents = self._unpatchify_latents(latents); image = self.vae.decode(latents, return_dict=False)[0]
    patched = Flux2Pipeline._patchify_latents(z)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    image = vae.decode(Flux2Pipeline._unpatchify_latents(patched * std + vae.bn.running_mean.view(1, -1, 1, 1)),
                       return_dict=False)[0]  # fmt: skip
    assert torch.equal(got, (image / 2 + 0.5).clamp(0, 1))
    emb = randn(BATCH, TEXT_LEN, pipe.transformer.config.joint_attention_dim, seed=3)
    stock = pipe(prompt_embeds=emb, latents=patched, height=16, width=16, num_inference_steps=2, guidance_scale=4.0,
                 output_type="pt").images  # fmt: skip
    assert torch.equal(got, stock)
    with pytest.raises(ValueError, match="the flux2 VAE normalises 12 = 4 x 3"):
        decode_latents(vae, randn(BATCH, 4, 8, 8), "flux2")
    with pytest.raises(ValueError, match="even height and width"):
        decode_latents(vae, randn(BATCH, 3, 7, 8), "flux2")
    with pytest.raises(ValueError, match="no bn.running_mean .*AutoencoderKLFlux2"):
        decode_latents(tiny_vae(3), z, "flux2")


@torch.no_grad()
def test_decode_wan_is_frame_0_of_the_pipelines_video():
    pipe = _zero_velocity_pipeline("wan")
    vae = pipe.vae
    vae.register_to_config(latents_mean=[0.1, -0.2, 0.3], latents_std=[0.5, 2.0, 1.5])
    z = randn(BATCH, 3, 3, 8, 8, seed=4)  # 5 frames of 16 x 16 (2x temporal and spatial downsampling)
    got = decode_latents(vae, z, "wan")
    assert got.shape == (BATCH, 3, 16, 16) and got.dtype == torch.float32 and got.min() >= 0 and got.max() <= 1
    # diffusers/pipelines/wan/pipeline_wan.py, WanPipeline.__call__: latents / (1 / latents_std) + latents_mean,
    # self.vae.decode(latents, return_dict=False)[0], self.video_processor.postprocess_video
    mean = torch.tensor(vae.config.latents_mean).view(1, 3, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 3, 1, 1, 1)
    video = vae.decode(z / std + mean, return_dict=False)[0]
    assert torch.equal(got, (video[:, :, 0] / 2 + 0.5).clamp(0, 1))
    emb = randn(BATCH, TEXT_LEN, pipe.transformer.config.text_dim, seed=3)
    frames = pipe(prompt_embeds=emb, latents=z, num_frames=5, height=16, width=16, num_inference_steps=2,
                  guidance_scale=1.0, output_type="pt").frames  # fmt: skip
    assert frames.shape[:3] == (BATCH, 5, 3)
    assert torch.equal(got, frames[:, 0])
    assert torch.equal(decode_latents(None, z, "wan"), latents_preview(z[:, :, 0]))
    with pytest.raises(ValueError, match="latents must have shape .B, C, F, H, W."):
        decode_latents(vae, randn(BATCH, 3, 8), "wan")


def test_decode_bad_inputs():
    vae = tiny_vae(3)
    z = randn(BATCH, 3, LAT_H, LAT_W)
    with pytest.raises(ValueError, match="pipeline_kind"):
        decode_latents(vae, z, "sdxl")
    with pytest.raises(ValueError, match="4 channels, the flux VAE takes 3"):
        decode_latents(vae, randn(BATCH, 4, LAT_H, LAT_W), "flux")
    with pytest.raises(ValueError, match="latents must have shape"):
        decode_latents(vae, randn(BATCH, LAT_H * LAT_W // 4, 12), "flux")  # packed FLUX tokens
    with pytest.raises(ValueError, match="no z_dim .*AutoencoderKLQwenImage"):
        decode_latents(vae, z, "qwen")  # an AutoencoderKL is not a Qwen VAE
    with pytest.raises(ValueError, match="no scaling_factor .*AutoencoderKL"):
        decode_latents(qwen_vae(), z, "flux")
    with pytest.raises(TypeError, match="vae must be"):
        decode_latents(object(), z, "flux")
    with pytest.raises(ValueError, match="batch_size"):
        decode_latents(vae, z, "flux", batch_size=0)


def test_without_a_vae_the_latents_are_previewed():
    z = randn(2, 5, 3, 4) * 3 + 1
    preview = decode_latents(None, z, "sd3")
    assert torch.equal(preview, latents_preview(z))
    assert preview.shape == (2, 3, 3, 4) and preview.dtype == torch.float32
    for j in range(2):
        first3 = z[j, :3]
        assert torch.allclose(preview[j], (first3 - first3.min()) / (first3.max() - first3.min()))
        assert preview[j].min() == 0 and preview[j].max() == 1
    constant = latents_preview(torch.full((1, 4, 2, 2), 7.0))
    assert torch.equal(constant, torch.full((1, 3, 2, 2), 0.5))
    grey = latents_preview(randn(1, 1, 3, 3))
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 0], grey[:, 2])
    with pytest.raises(ValueError, match="latents"):
        latents_preview(torch.zeros(3, 4))


# ---------------------------------------------------------------------------- the grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, as diffusers' VaeImageProcessor.numpy_to_pil."""
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")


def test_save_grid_writes_a_png_whose_pixels_are_the_images(tmp_path):
    b, h, w, pad = 3, 5, 7, 2
    student, teacher = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0)), torch.rand(b, 3, h, w)
    path = save_grid(tmp_path / "evals" / "eval_000100.png", student, teacher, captions=["a cat", "a dog", "ünïcode"])
    assert path == tmp_path / "evals" / "eval_000100.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (b * w + (b + 1) * pad, 2 * h + 3 * pad)
        pixels = np.asarray(im)
    for r, rows in enumerate((to_uint8(student), to_uint8(teacher))):
        for j in range(b):
            y, x = pad + r * (h + pad), pad + j * (w + pad)
            assert np.array_equal(pixels[y : y + h, x : x + w], rows[j]), (r, j)
    mask = np.ones(pixels.shape[:2], dtype=bool)  # everything outside the cells is the white padding
    for r in range(2):
        for j in range(b):
            mask[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + j * (w + pad) : pad + j * (w + pad) + w] = False
    assert (pixels[mask] == 255).all()
    doc = json.loads((tmp_path / "evals" / "eval_000100.json").read_text(encoding="utf-8"))
    assert doc == {"image": "eval_000100.png", "rows": ["student", "teacher"], "captions": ["a cat", "a dog", "ünïcode"]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval_000100.json", "eval_000100.png"]  # no temporary left
    # rewritten without captions, the stale sidecar goes; out-of-range and NaN values are clamped; grey images
    grey = torch.tensor([[[[-1.0, 0.5], [2.0, math.nan]]]])
    save_grid(path, grey, grey, padding=0)
    assert not (tmp_path / "evals" / "eval_000100.json").exists()
    with Image.open(path) as im:
        assert im.size == (2, 4) and np.asarray(im)[:2, :, 0].tolist() == [[0, 128], [255, 0]]


@pytest.mark.parametrize(
    "name, student, teacher, kwargs, error, message",
    [
        ("g.png", torch.rand(2, 3, 4, 4), torch.rand(3, 3, 4, 4), {}, ValueError, "one shape"),
        ("g.png", torch.rand(2, 4, 4, 4), torch.rand(2, 4, 4, 4), {}, ValueError, "student_images"),
        ("g.png", torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4), {}, ValueError, "teacher_images"),
        ("g.png", torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.rand(2, 3, 4, 4), {}, TypeError, "student_images"),
        ("g.png", torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), {"captions": ["one"]}, ValueError, "captions"),
        ("g.png", torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), {"captions": "ab"}, ValueError, "captions"),
        ("g.png", torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), {"padding": -1}, ValueError, "padding"),
        ("g.jpg", torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), {}, ValueError, "path"),
    ],
)
def test_save_grid_bad_inputs(tmp_path, name, student, teacher, kwargs, error, message):
    with pytest.raises(error, match=message):
        save_grid(tmp_path / name, student, teacher, **kwargs)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- fixed noise and prompts


def test_fixed_noise_is_seeded_per_sample():
    a = fixed_noise(4, (3, 5, 6), seed=0)
    assert a.shape == (4, 3, 5, 6) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, fixed_noise(4, [3, 5, 6], seed=0))  # the same on every call
    assert torch.equal(a, fixed_noise(8, (3, 5, 6), seed=0)[:4])  # sample i does not depend on num
    assert not torch.equal(a, fixed_noise(4, (3, 5, 6), seed=1))
    assert not torch.equal(a[0], a[1])
    assert EvalPrompts.fixed_noise is fixed_noise
    big = fixed_noise(2, (16, 64, 64), seed=3)
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02
    for args, error in (((0, (3, 4, 4), 0), ValueError), ((2, (), 0), ValueError), ((2, (3, 0, 4), 0), ValueError),
                        ((2, "abc", 0), ValueError), ((2, (3, 4, 4), 0.5), TypeError)):  # fmt: skip
        with pytest.raises(error, match=("num" if args[0] == 0 else "shape" if error is ValueError else "seed")):
            fixed_noise(*args)


@pytest.fixture(scope="module")
def flux_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-prompts")
    return encode(save_flux(root / "flux"), root / "cache")


def test_eval_prompts_from_a_cache(flux_cache):
    cache = PromptCache(flux_cache)
    ev = EvalPrompts.from_cache(flux_cache, num=5)
    assert len(ev) == 5 and ev.indices == [0, 1, 2, 3, 4] and ev.prompts == PROMPTS[:5] and ev.negative_prompts == [None] * 5
    assert sorted(ev.embeddings) == ["pooled_prompt_embeds", "prompt_embeds"]
    for name, t in ev.embeddings.items():
        assert torch.equal(t, torch.stack([cache[i][name] for i in range(5)])), name
    picked = EvalPrompts.from_cache(cache, indices=[9, 2, 15])  # an open cache works too; num is not used
    assert picked.indices == [9, 2, 15] and picked.prompts == [PROMPTS[9], PROMPTS[2], PROMPTS[15]]
    assert torch.equal(picked.embeddings["prompt_embeds"][1], ev.embeddings["prompt_embeds"][2])
    assert torch.equal(EvalPrompts.from_cache(cache, indices=torch.tensor([9, 2, 15])).embeddings["prompt_embeds"],
                       picked.embeddings["prompt_embeds"])  # fmt: skip
    assert len(EvalPrompts.from_cache(cache)) == 8  # the default num
    half = ev.to(dtype=torch.bfloat16)
    assert half.embeddings["prompt_embeds"].dtype == torch.bfloat16 and ev.embeddings["prompt_embeds"].dtype == torch.float32
    bad = [({"num": 17}, "holds 16 prompts"), ({"num": 0}, "num"), ({"indices": [0, 16]}, r"\[16\]"),
           ({"indices": [-1]}, "indices"), ({"indices": []}, "indices"), ({"indices": [1.0]}, "indices")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            EvalPrompts.from_cache(cache, **kwargs)


def test_eval_prompts_pad_prompts_of_their_own_lengths(tmp_path):

    torch.manual_seed(3)
    tok, encoder = tiny._qwen_text_encoder(hidden=16, intermediate=32, mrope_section=(1, 1, 2))
    pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), qwen_vae(), encoder, tok, tiny_teacher("qwen"))
    pipe.save_pretrained(tmp_path / "q")
    prompts = [Prompt("a cat", "dark"), Prompt("a much longer prompt about a dog"), Prompt("sky")]
    encode_prompts(tmp_path / "q", prompts, tmp_path / "cache", batch_size=3, dtype="float32", progress=False)
    cache = PromptCache(tmp_path / "cache")
    ev = EvalPrompts.from_cache(tmp_path / "cache", num=3)
    assert ev.prompts == ["a cat", "a much longer prompt about a dog", "sky"] and ev.negative_prompts == ["dark", None, None]
    lengths = [cache[i]["prompt_embeds"].shape[0] for i in range(3)]
    assert len(set(lengths)) == 3
    embeds, mask = ev.embeddings["prompt_embeds"], ev.embeddings["prompt_embeds_mask"]
    assert embeds.shape == (3, max(lengths), 16) and mask.shape == (3, max(lengths)) and mask.dtype == torch.long
    for j, n in enumerate(lengths):
        assert torch.equal(embeds[j, :n], cache[j]["prompt_embeds"]) and embeds[j, n:].eq(0).all()
        assert mask[j].sum() == n and mask[j, :n].eq(1).all()
    assert ev.to(dtype=torch.bfloat16).embeddings["prompt_embeds_mask"].dtype == torch.long  # masks keep their dtype
