"""to_piflow for image-to-image and editing pipelines, end to end on CPU against hand-written loops.

- ``FluxImg2ImgPipeline``, ``StableDiffusion3Img2ImgPipeline``, ``QwenImageImg2ImgPipeline``: ``strength`` starts the
  pi-Flow schedule part-way as the official sampler's ``denoise`` does: the raw grid
  ``linspace(1, (f - 1) / (n + f - 1), n, endpoint=False) * strength`` warped by the shift, every one of the n steps
  run, from ``(1 - sigma_0) * image_latents + sigma_0 * noise``. The hand loop writes that grid and start out and
  draws the noise from the same generator seed.
- ``FluxKontextPipeline``, ``QwenImageEditPipeline``: the reference image's tokens follow the generated image's in
  the transformer's input; the hand loop calls the student's trunk on the concatenated tokens with the ids /
  shapes the pipelines build (their own static methods) and keeps the policy of the first L tokens.

Tiny random components, no text encoders (precomputed prompt embeddings), except the smoke test of folders written by
``piflow_kernels.tiny.save_tiny_pipeline`` and one ``QwenImageEditPipeline`` test with a tiny Qwen2.5-VL encoder and
a stand-in for its processor (``Qwen2VLProcessor`` itself needs torchvision for its video processor).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from piflow_kernels import GMFlowOutput, reference

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (  # noqa: E402
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxKontextPipeline,
    QwenImageEditPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageTransformer2DModel,
    StableDiffusion3Img2ImgPipeline,
)
from test_pipelines import BATCH, HEIGHT, LAT_H, LAT_W, WIDTH, prompt, tiny_vae  # noqa: E402
from test_students import TEXT_DIM, TEXT_LEN, pack, tiny_teacher, unpack  # noqa: E402

from piflow_kernels import PiFlowScheduler, build_student, to_piflow  # noqa: E402
from piflow_kernels.pipelines import PiFlowPipelineScheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFT, F, TEMPERATURE = 3.0, 0.5, 0.7
CHANNELS = {"flux": 3, "sd3": 5, "qwen": 3}


def qwen_vae(c: int = 3) -> AutoencoderKLQwenImage:
    torch.manual_seed(11)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=c, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.1] * c, latents_std=[2.0] * c)  # fmt: skip


def qwen_teacher(c: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * c, out_channels=c, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


def img2img_pipe(kind: str):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    if kind == "flux":
        pipe = FluxImg2ImgPipeline(scheduler=sched, vae=tiny_vae(3), text_encoder=None, tokenizer=None,
                                   text_encoder_2=None, tokenizer_2=None, transformer=tiny_teacher("flux"))  # fmt: skip
    elif kind == "sd3":
        pipe = StableDiffusion3Img2ImgPipeline(
            scheduler=sched, vae=tiny_vae(5), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None, transformer=tiny_teacher("sd3"),
        )  # fmt: skip
    else:
        pipe = QwenImageImg2ImgPipeline(sched, qwen_vae(), None, None, tiny_teacher("qwen"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kontext_pipe() -> FluxKontextPipeline:
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(3), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=tiny_teacher("flux"),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def student_for(pipe, policy_type: str = "GMFlow"):
    g = torch.Generator().manual_seed(7)
    return build_student(pipe.transformer, policy_type, num_components=3, num_points=4, logstd_inner_dim=16, generator=g).eval()


def official_sigmas(steps: int, strength: float, shift: float = SHIFT, f: float = F) -> list[float]:
    """The official sampler's grid with ``denoise = strength``: the raw grid scaled, then warped; a final 0."""
    raw = np.linspace(1, (f - 1) / (steps + f - 1), steps, endpoint=False).clip(min=0) * strength
    return [float(shift * r / (1 + (shift - 1) * r)) for r in raw] + [0.0]


@torch.no_grad()
def hand_loop(policy_at, x, sigmas, shift=SHIFT, temperature=TEMPERATURE, dx=None):
    """FlowMapSDE with h = 0 over the given sigmas (test_pipelines.rollout_loop at this file's settings)."""
    from test_pipelines import rollout_loop

    return rollout_loop(policy_at, x, sigmas, shift, temperature, dx)


def conditioning(kind: str) -> tuple[dict, dict]:
    """(pipeline keyword arguments, the student's conditioning) for the precomputed prompt embeddings."""
    p = prompt()
    if kind == "qwen":
        mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.long)
        return ({"prompt_embeds": p["prompt_embeds"], "prompt_embeds_mask": mask},
                {"encoder_hidden_states": p["prompt_embeds"], "encoder_hidden_states_mask": mask})  # fmt: skip
    cond = {"encoder_hidden_states": p["prompt_embeds"], "pooled_projections": p["pooled_prompt_embeds"]}
    if kind == "flux":
        cond["guidance"] = torch.full((BATCH,), 3.5)
    return p, cond


def noise_shape(kind: str) -> tuple[int, ...]:
    c = CHANNELS[kind]
    return (BATCH, 1, c, LAT_H, LAT_W) if kind == "qwen" else (BATCH, c, LAT_H, LAT_W)


# ---------------------------------------------------------------------------- image-to-image


@pytest.mark.parametrize(
    "kind, policy_type, strength",
    [("flux", "GMFlow", 0.6), ("flux", "DX", 0.45), ("flux", "GMFlow", 1.0), ("sd3", "GMFlow", 0.6),
     ("qwen", "GMFlow", 0.7)],
)  # fmt: skip
def test_img2img_matches_the_official_part_way_start(kind, policy_type, strength):
    steps = 3
    seg = strength / (steps - 1 + F)  # a DX segment spans one (scaled) step of raw time
    pipe = img2img_pipe(kind)
    student = student_for(pipe, policy_type)
    options = {"temperature": TEMPERATURE} if policy_type == "GMFlow" else {"dx_segment_size": seg, "dx_shift": SHIFT}
    to_piflow(pipe, student, PiFlowScheduler(policy_type=policy_type, shift=SHIFT, final_step_size_scale=F, **options))
    c = CHANNELS[kind]
    image_latents = torch.randn(BATCH, c, LAT_H, LAT_W, generator=torch.Generator().manual_seed(1))
    call_kwargs, cond = conditioning(kind)
    if kind != "qwen":
        call_kwargs["guidance_scale"] = 3.5 if kind == "flux" else 1.0
    seen = []
    got = pipe(**call_kwargs, image=image_latents, height=HEIGHT, width=WIDTH, strength=strength,
               num_inference_steps=steps, generator=torch.Generator().manual_seed(5), output_type="latent",
               callback_on_step_end=lambda p, i, t, d: seen.append(float(t)) or {}).images  # fmt: skip
    if kind != "sd3":
        got = unpack(got, LAT_H, LAT_W)

    sigmas = official_sigmas(steps, strength)
    noise = torch.randn(noise_shape(kind), generator=torch.Generator().manual_seed(5))
    noise = noise[:, 0] if kind == "qwen" else noise
    x = (1 - sigmas[0]) * image_latents + sigmas[0] * noise
    ref = hand_loop(lambda x, t: student(x, t, **cond), x, sigmas, dx=None if policy_type == "GMFlow" else seg)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # every one of the n steps ran, on the scaled grid (not the stock pipelines' dropped first steps)
    assert seen == pytest.approx([s * 1000 for s in sigmas[:-1]], rel=1e-6)
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), torch.tensor(sigmas, dtype=torch.float64), atol=1e-6, rtol=0)
    if strength == 1.0:  # from pure noise: the image does not matter
        other = pipe(**call_kwargs, image=image_latents * 0, height=HEIGHT, width=WIDTH, strength=1.0,
                     num_inference_steps=steps, generator=torch.Generator().manual_seed(5), output_type="latent").images
        torch.testing.assert_close(unpack(other, LAT_H, LAT_W), got, atol=1e-6, rtol=0)  # fmt: skip


def test_img2img_default_strength_is_the_pipelines_and_the_scheduler_is_left_as_it_was():
    pipe = img2img_pipe("sd3")
    to_piflow(pipe, student_for(pipe), PiFlowScheduler(shift=SHIFT, final_step_size_scale=F), num_inference_steps=2)
    image_latents = torch.randn(BATCH, 5, LAT_H, LAT_W, generator=torch.Generator().manual_seed(1))
    pipe(**prompt(), image=image_latents, height=HEIGHT, width=WIDTH, guidance_scale=1.0, output_type="latent")
    # StableDiffusion3Img2ImgPipeline's default strength 0.6, the student's default step count (2)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(official_sigmas(2, 0.6), abs=1e-6)
    pipe.scheduler.set_timesteps(2)  # outside a call: the whole grid again
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(official_sigmas(2, 1.0), abs=1e-6)
    pipe.scheduler.set_timesteps(2, strength=0.5)  # the scheduler's own argument
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(official_sigmas(2, 0.5), abs=1e-6)


def test_a_plain_scheduler_takes_strength_too():
    sched = PiFlowScheduler(shift=SHIFT, final_step_size_scale=F)
    sched.set_timesteps(4, strength=0.3)
    assert sched.num_inference_steps == 4
    assert sched.sigmas.tolist() == pytest.approx(official_sigmas(4, 0.3), abs=1e-6)
    sched.set_timesteps(sigmas=[1.0, 0.5], strength=0.5)  # custom raw sigmas are scaled as the default grid
    assert sched.sigmas.tolist() == pytest.approx([SHIFT * r / (1 + (SHIFT - 1) * r) for r in (0.5, 0.25)] + [0.0], abs=1e-6)


# ---------------------------------------------------------------------------- editing: reference-image tokens


def flux_ids(h: int, w: int, first: float) -> torch.Tensor:
    return FluxKontextPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32).index_fill(
        1, torch.tensor([0]), first
    )


def token_policy(out: GMFlowOutput, length: int) -> GMFlowOutput:
    """The first ``length`` tokens of a token-layout policy (B, K, C, L_all, 4)."""
    return GMFlowOutput(out.means[:, :, :, :length], out.logweights[:, :, :, :length], out.logstds)


def to_tokens(packed: torch.Tensor) -> torch.Tensor:
    b, length, d = packed.shape
    return packed.reshape(b, length, d // 4, 4).permute(0, 2, 1, 3)


def to_packed(tokens: torch.Tensor) -> torch.Tensor:
    b, c, length, p2 = tokens.shape
    return tokens.permute(0, 2, 1, 3).reshape(b, length, c * p2)


def test_flux_kontext_matches_a_hand_loop_over_the_reference_tokens():
    steps = 3
    pipe = kontext_pipe()
    student = student_for(pipe)
    to_piflow(pipe, student, PiFlowScheduler(shift=SHIFT, final_step_size_scale=F, temperature=TEMPERATURE))
    x0 = torch.randn(BATCH, 3, LAT_H, LAT_W, generator=torch.Generator().manual_seed(0))
    ref_image = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))  # latents: 4 x 4 tokens
    p = prompt()
    got = pipe(image=ref_image, **p, latents=pack(x0), height=HEIGHT, width=WIDTH, max_area=HEIGHT * WIDTH,
               num_inference_steps=steps, guidance_scale=3.5, output_type="latent").images  # fmt: skip

    length = (LAT_H // 2) * (LAT_W // 2)
    ref_tokens = FluxKontextPipeline._pack_latents(ref_image, 1, 3, 8, 8).expand(BATCH, -1, -1)
    img_ids = torch.cat([flux_ids(LAT_H // 2, LAT_W // 2, 0.0), flux_ids(4, 4, 1.0)])
    txt_ids = torch.zeros(TEXT_LEN, 3)

    def policy_at(x_tok, t):
        hidden = torch.cat([to_packed(x_tok), ref_tokens], dim=1)
        out = student.forward_native(hidden_states=hidden, timestep=t.expand(BATCH) / 1000, guidance=torch.full((BATCH,), 3.5),
                                     pooled_projections=p["pooled_prompt_embeds"], encoder_hidden_states=p["prompt_embeds"],
                                     txt_ids=txt_ids, img_ids=img_ids)  # fmt: skip
        assert out.means.shape[3] == length + 16  # the trunk saw the reference tokens too
        return token_policy(out, length)

    ref = to_packed(hand_loop(policy_at, to_tokens(pack(x0)), reference.flowmap_sde_sigmas(steps, SHIFT, F).tolist()))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    plain = pipe(**p, latents=pack(x0), height=HEIGHT, width=WIDTH, max_area=HEIGHT * WIDTH, num_inference_steps=steps,
                 guidance_scale=3.5, output_type="latent").images  # fmt: skip
    assert not torch.allclose(plain, got, atol=1e-3)  # the reference image conditions the sample


@pytest.fixture
def small_edit_references(monkeypatch):
    """QwenImageEditPipeline resizes the reference image to about 1024 x 1024 pixels: 32 x 32 here (8 x 8 tokens)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

    original = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: original(32 * 32, ratio))


def test_qwen_image_edit_matches_a_hand_loop_over_the_reference_tokens(small_edit_references):
    from PIL import Image

    # 4 latent channels: with 3 the pipeline would take the preprocessed RGB reference image for latents
    steps, c = 3, 4
    pipe = QwenImageEditPipeline(FlowMatchEulerDiscreteScheduler(shift=3.0), qwen_vae(c), None, None, None, qwen_teacher(c))
    pipe.set_progress_bar_config(disable=True)
    student = student_for(pipe)
    to_piflow(pipe, student, PiFlowScheduler(shift=SHIFT, final_step_size_scale=F, temperature=TEMPERATURE))
    x0 = torch.randn(BATCH, c, LAT_H, LAT_W, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    embeds = prompt()["prompt_embeds"]
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.long)
    mask[1, -2:] = 0  # a padded prompt: the mask reaches the trunk
    got = pipe(image=image, prompt_embeds=embeds, prompt_embeds_mask=mask, latents=pack(x0), height=HEIGHT, width=WIDTH,
               num_inference_steps=steps, output_type="latent").images  # fmt: skip

    # the reference image as the pipeline encodes it: resized, preprocessed, VAE mode, normalised, packed
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(image, 32, 32), 32, 32).unsqueeze(2)
        ref_latents = pipe._encode_vae_image(pixels, generator=None)
    ref_tokens = QwenImageEditPipeline._pack_latents(ref_latents, 1, c, 16, 16).expand(BATCH, -1, -1)
    length = (LAT_H // 2) * (LAT_W // 2)
    img_shapes = [[(1, LAT_H // 2, LAT_W // 2), (1, 8, 8)]] * BATCH

    def policy_at(x_tok, t):
        hidden = torch.cat([to_packed(x_tok), ref_tokens], dim=1)
        out = student.forward_native(hidden_states=hidden, timestep=t.expand(BATCH) / 1000, encoder_hidden_states=embeds,
                                     encoder_hidden_states_mask=mask, img_shapes=img_shapes)  # fmt: skip
        assert out.means.shape[3] == length + 64
        return token_policy(out, length)

    ref = to_packed(hand_loop(policy_at, to_tokens(pack(x0)), reference.flowmap_sde_sigmas(steps, SHIFT, F).tolist()))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


class TinyVLProcessor:
    """What ``Qwen2VLProcessor`` does for ``QwenImageEditPipeline`` (the real one also needs a video processor, which
    needs torchvision): the image processor's pixels and grid, each ``<|image_pad|>`` repeated once per image token."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __call__(self, text, images=None, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        extra = {}
        if images is not None:
            extra = dict(self.image_processor(images=images, return_tensors="pt"))
            n = int(extra["image_grid_thw"][0].prod()) // self.image_processor.merge_size**2
            text = [t.replace("<|image_pad|>", "<|image_pad|>" * n) for t in text]
        return BatchFeature({**self.tokenizer(text, padding=padding, return_tensors=return_tensors), **extra})


def tiny_vl_encoder():
    """A byte-level Qwen2 tokenizer with the vision tokens, a one-layer Qwen2.5-VL and its image processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessorPil

    from piflow_kernels.tiny import _byte_level_vocab

    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    tok = Qwen2Tokenizer(vocab=_byte_level_vocab(), merges=[], unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", additional_special_tokens=special)  # fmt: skip
    ids = dict(zip(special, tok.convert_tokens_to_ids(special)))
    text = {"vocab_size": len(tok), "hidden_size": TEXT_DIM, "intermediate_size": 24, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 1]},
            "bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}  # fmt: skip
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "out_hidden_size": TEXT_DIM,
              "patch_size": 2, "spatial_merge_size": 1, "temporal_patch_size": 1, "window_size": 4,
              "fullatt_block_indexes": [0]}  # fmt: skip
    torch.manual_seed(0)
    tokens = {"image_token_id": ids["<|image_pad|>"], "vision_start_token_id": ids["<|vision_start|>"],
              "vision_end_token_id": ids["<|vision_end|>"]}  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    image_processor = Qwen2VLImageProcessorPil(patch_size=2, temporal_patch_size=1, merge_size=1, min_pixels=16,
                                               max_pixels=16 * 16)  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config).eval(), tok, TinyVLProcessor(tok, image_processor)


def test_qwen_image_edit_encodes_the_prompt_with_the_reference_image(small_edit_references):
    """The prompt path: the pipeline's Qwen2.5-VL encoder reads the image; the converted pipeline given the prompt
    samples what it samples given the embeddings its encode_prompt makes (whose sampling the hand loop above checks)."""
    from PIL import Image

    c = 4
    encoder, tok, processor = tiny_vl_encoder()
    pipe = QwenImageEditPipeline(FlowMatchEulerDiscreteScheduler(shift=3.0), qwen_vae(c), encoder, tok, processor,
                                 qwen_teacher(c))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    to_piflow(pipe, student_for(pipe), PiFlowScheduler(shift=SHIFT, final_step_size_scale=F, temperature=TEMPERATURE))
    rng = np.random.default_rng(0)
    image, other = (Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(2))
    x0 = pack(torch.randn(1, c, LAT_H, LAT_W, generator=torch.Generator().manual_seed(0)))
    run = {"latents": x0, "height": HEIGHT, "width": WIDTH, "num_inference_steps": 2, "output_type": "latent"}
    got = pipe(image=image, prompt="add a red hat", **run).images
    emb, mask = pipe.encode_prompt("add a red hat", image=pipe.image_processor.resize(image, 32, 32))
    torch.testing.assert_close(pipe(image=image, prompt_embeds=emb, prompt_embeds_mask=mask, **run).images, got,
                               atol=0, rtol=0)  # fmt: skip
    emb_other, _ = pipe.encode_prompt("add a red hat", image=pipe.image_processor.resize(other, 32, 32))
    assert emb_other.shape == emb.shape and not torch.allclose(emb_other, emb)  # the encoder read the image
    assert torch.isfinite(got).all()


# ---------------------------------------------------------------------------- whole tiny folders


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from piflow_kernels.tiny import save_tiny_pipeline

    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("pipes") / "flux", seed=3)


@pytest.mark.parametrize("cls", [FluxImg2ImgPipeline, FluxKontextPipeline])
def test_tiny_folders_load_as_img2img_and_edit_pipelines_and_decode(flux_dir, cls):
    """The folder's text encoders encode the prompt and its VAE decodes. The image is given as latents: the tiny
    FLUX.1 VAE has 3 latent channels, so these pipelines would take a preprocessed RGB image for latents as well."""
    pipe = cls.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    to_piflow(pipe, student_for(pipe), shift=SHIFT, use_dynamic_shifting=False, final_step_size_scale=F)
    image = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    extra = {"strength": 0.5} if cls is FluxImg2ImgPipeline else {"_auto_resize": False, "max_area": 16 * 16}
    out = pipe(prompt="a red cat", image=image, height=16, width=16, num_inference_steps=2, guidance_scale=3.5,
               max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np", **extra).images  # fmt: skip
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("strength", [0, 0.0, -0.2, 1.5, float("nan"), "0.5", True])
def test_strength_outside_0_1_is_refused_naming_it(strength):
    pipe = img2img_pipe("flux")
    to_piflow(pipe, student_for(pipe), PiFlowScheduler(shift=SHIFT))
    image_latents = torch.randn(BATCH, 3, LAT_H, LAT_W)
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
        pipe(**prompt(), image=image_latents, height=HEIGHT, width=WIDTH, strength=strength, num_inference_steps=2,
             output_type="latent")  # fmt: skip
    assert pipe.scheduler._call_strength is None
    with pytest.raises(ValueError, match="strength"):
        PiFlowPipelineScheduler(shift=SHIFT).set_timesteps(2, strength=strength)


def test_a_student_of_another_teacher_is_refused_naming_both():
    pipe = img2img_pipe("qwen")
    with pytest.raises(ValueError, match="QwenImageImg2ImgPipeline.transformer is a QwenImageTransformer2DModel but the "
                                         "student was built from a FluxTransformer2DModel"):  # fmt: skip
        to_piflow(pipe, student_for(img2img_pipe("flux")))
    kontext = kontext_pipe()
    with pytest.raises(ValueError, match="built from a SD3Transformer2DModel"):
        to_piflow(kontext, student_for(img2img_pipe("sd3")))


def test_true_cfg_is_refused_before_the_edit_pipeline_runs():
    pipe = kontext_pipe()
    to_piflow(pipe, student_for(pipe), PiFlowScheduler(shift=SHIFT))
    p, neg = prompt(), prompt(4)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        pipe(image=torch.randn(1, 3, 8, 8), **p, negative_prompt_embeds=neg["prompt_embeds"],
             negative_pooled_prompt_embeds=neg["pooled_prompt_embeds"], true_cfg_scale=2.0, height=HEIGHT, width=WIDTH,
             max_area=HEIGHT * WIDTH, num_inference_steps=2, output_type="latent")  # fmt: skip


def test_a_saved_img2img_pipeline_loads_back_with_the_part_way_start(tmp_path):
    from piflow_kernels import load_piflow_pipeline

    pipe = img2img_pipe("flux")
    to_piflow(pipe, student_for(pipe), PiFlowScheduler(shift=SHIFT, final_step_size_scale=F, temperature=TEMPERATURE))
    image_latents = torch.randn(BATCH, 3, LAT_H, LAT_W, generator=torch.Generator().manual_seed(1))

    def run(p):
        return p(**prompt(), image=image_latents, height=HEIGHT, width=WIDTH, strength=0.5, num_inference_steps=3,
                 guidance_scale=3.5, generator=torch.Generator().manual_seed(5), output_type="latent").images  # fmt: skip

    expected = run(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = load_piflow_pipeline(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "FluxImg2ImgPipeline"
    torch.testing.assert_close(run(loaded), expected, atol=0, rtol=0)
    assert loaded.scheduler.sigmas.tolist() == pytest.approx(official_sigmas(3, 0.5), abs=1e-6)
