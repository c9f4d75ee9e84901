"""FLUX.2 (diffusers' Flux2Transformer2DModel / Flux2Pipeline): students, the official pi-FLUX.2 layout, the stock
pipeline with and without reference images, the prompt cache and a LoRA distillation run, offline on a CPU.

The reference computations use Flux2Pipeline's own static methods (patchify, pack, position ids) and the official
GMFlux2 head's layout written out by hand (proj_out_means rows (k, c, 2x2 pixel), proj_out_logweights (k, pixel),
log-softmax over k, the log-std MLP on the time embedding), never the library's layout helpers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_pipelines import manual_loop  # noqa: E402
from test_text_distill import text_config  # noqa: E402

import piflow_kernels as pk  # noqa: E402
from piflow_kernels import PiFlowScheduler, PiFlowStudent, build_student, load_official_adapter, to_piflow  # noqa: E402
from piflow_kernels.layouts import TEXT_ARGS, geometry  # noqa: E402
from piflow_kernels.official_export import export_official  # noqa: E402
from piflow_kernels.official_weights import read_policy_config  # noqa: E402
from piflow_kernels.tiny import tiny_prompts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

C, TEXT_LEN, TEXT_DIM, K = 3, 5, 12, 3  # latent channels (12 per 2x2 token), text tokens and width, components
GUIDANCE = 4.0  # the official pi-FLUX.2 embedded guidance
PROMPTS = tiny_prompts(8)
MSL = 256  # the tiny tokenizer spells the system prompt out byte by byte (about 190 tokens)


def tiny_flux2(seed: int = 0) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        in_channels=4 * C, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True,
    )  # fmt: skip
    with torch.no_grad():  # an output layer far from its small default init, so that row-order mistakes show
        model.proj_out.weight.normal_(0, 0.5)
    return model.eval()


def tiny_vae() -> AutoencoderKLFlux2:
    torch.manual_seed(11)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=C, norm_num_groups=4, sample_size=16,
    ).eval()  # fmt: skip
    with torch.no_grad():  # the latent normalisation (bn running statistics) must matter
        vae.bn.running_mean.normal_(0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def inputs(batch: int = 2, h: int = 6, w: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 980 + 10
    emb = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    return x, t, emb, torch.full((batch,), GUIDANCE)


def hand_trunk_call(trunk, x, t, emb, guidance, refs=()):
    """The trunk called as Flux2Pipeline calls it (its own static methods), reference images' tokens appended."""
    lat = Flux2Pipeline._patchify_latents(x)
    hidden, ids = Flux2Pipeline._pack_latents(lat), Flux2Pipeline._prepare_latent_ids(lat)
    if refs:
        patched = [Flux2Pipeline._patchify_latents(r) for r in refs]
        ref_ids = Flux2Pipeline._prepare_image_ids([p[:1] for p in patched]).repeat(x.shape[0], 1, 1)
        ref_tokens = torch.cat([Flux2Pipeline._pack_latents(p).expand(x.shape[0], -1, -1) for p in patched], dim=1)
        hidden, ids = torch.cat([hidden, ref_tokens], dim=1), torch.cat([ids, ref_ids], dim=1)
    out = trunk(hidden_states=hidden, timestep=t / 1000, guidance=guidance, encoder_hidden_states=emb,
                txt_ids=Flux2Pipeline._prepare_text_ids(emb), img_ids=ids, return_dict=False)[0]  # fmt: skip
    return out[:, : lat.shape[2] * lat.shape[3]], lat.shape[2:]


def tokens_to_image(z, hw, n):
    """(B, L, n * (channels) * 4) rows (n, channel, py, px) per token -> (B, n, channels, H, W)."""
    b, h, w = z.shape[0], hw[0], hw[1]
    z = z.reshape(b, h, w, n, -1, 2, 2).permute(0, 3, 4, 1, 5, 2, 6)
    return z.reshape(b, n, z.shape[2], 2 * h, 2 * w)


def official_logstds(tensors: dict, temb: torch.Tensor) -> torch.Tensor:
    hidden = torch.nn.functional.silu(temb) @ tensors["proj_out_logstds.1.weight"].T + tensors["proj_out_logstds.1.bias"]
    return torch.nn.functional.silu(hidden) @ tensors["proj_out_logstds.3.weight"].T + tensors["proj_out_logstds.3.bias"]


# ---------------------------------------------------------------------------- the student


def test_the_teacher_table():
    teacher = tiny_flux2()
    assert geometry("Flux2Transformer2DModel", teacher.config) == (C, C, 2)
    assert TEXT_ARGS["Flux2Transformer2DModel"] == {"prompt_embeds": "encoder_hidden_states"}
    with pytest.raises(ValueError, match="patch_size=2 is not supported"):
        geometry("Flux2Transformer2DModel", {"in_channels": 12, "patch_size": 2})


@pytest.mark.parametrize("with_refs", [False, True], ids=["text-to-image", "edit"])
def test_student_forward_is_the_hand_trunk_call(with_refs):
    teacher = tiny_flux2()
    student = build_student(teacher, "GMFlow", num_components=K, logstd_inner_dim=8,
                            generator=torch.Generator().manual_seed(3)).eval()  # fmt: skip
    assert student.latent_channels == C and student.patch_size == 2 and student.latent_layout == "tokens"
    x, t, emb, g = inputs()
    refs = [torch.randn(1, C, 4, 6), torch.randn(2, C, 6, 4)] if with_refs else []
    with torch.no_grad():
        out = student(x, t, encoder_hidden_states=emb, guidance=g, **({"condition_latents": refs} if refs else {}))
        raw, hw = hand_trunk_call(student.trunk, x, t, emb, g, refs)
        temb = student.trunk.time_guidance_embed((t / 1000) * 1000, g * 1000)
        logstds = student.proj_out_logstds(temb).reshape(-1, 1, 1, 1, 1)
    means = tokens_to_image(raw[..., : K * C * 4], hw, K)
    logits = raw[..., K * C * 4 :].reshape(*raw.shape[:2], K, 4).log_softmax(dim=-2).flatten(2)
    assert out.means.shape == (2, K, C, 6, 10) and out.logweights.shape == (2, K, 1, 6, 10)
    torch.testing.assert_close(out.means, means, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.logweights, tokens_to_image(logits, hw, K), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.logstds, logstds, atol=1e-6, rtol=1e-6)
    if with_refs:  # the reference images reach the generated image's tokens
        with torch.no_grad():
            plain = student(x, t, encoder_hidden_states=emb, guidance=g)
        assert not torch.allclose(plain.means, out.means)


@pytest.mark.parametrize("with_refs", [False, True], ids=["text-to-image", "edit"])
@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
def test_a_fresh_student_starts_at_the_teacher(policy_type, with_refs):
    teacher = tiny_flux2()
    student = build_student(teacher, policy_type, num_components=K, num_points=4, init_noise=0.0, logstd_inner_dim=8).eval()
    x, t, emb, g = inputs()
    refs = [torch.randn(2, C, 4, 4)] if with_refs else []
    with torch.no_grad():
        out = student(x, t, encoder_hidden_states=emb, guidance=g, **({"condition_latents": refs} if refs else {}))
        raw, hw = hand_trunk_call(teacher, x, t, emb, g, refs)
    velocity = tokens_to_image(raw, hw, 1)[:, 0]
    policy = pk.make_policy(out, x, t / 1000)
    torch.testing.assert_close(policy.velocity(x, t / 1000), velocity, atol=2e-5, rtol=2e-5)


def test_save_and_load_round_trip(tmp_path):
    student = build_student(tiny_flux2(), "GMFlow", num_components=K, logstd_inner_dim=8).eval()
    student.save_pretrained(tmp_path / "s")
    again = PiFlowStudent.from_pretrained(tmp_path / "s").eval()
    x, t, emb, g = inputs()
    with torch.no_grad():
        a, b = student(x, t, encoder_hidden_states=emb, guidance=g), again(x, t, encoder_hidden_states=emb, guidance=g)
    assert again.teacher_class == "Flux2Transformer2DModel" and torch.equal(a.means, b.means)


# ---------------------------------------------------------------------------- the official pi-FLUX.2 layout

RANK = 2
LORA_TARGETS = ("transformer_blocks.0.ff.linear_in", "transformer_blocks.0.ff_context.linear_out",
                "single_transformer_blocks.0.attn.to_out", "time_guidance_embed.timestep_embedder.linear_1")  # fmt: skip


def rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.2


def official_checkpoint(folder, teacher, k: int = K, inner: int = 24):
    """A gmflux2-style adapter: the GMFlux2 head, norm_out.linear (FLUX.2 has no bias there), LoRA pairs (some under
    the un-exported PEFT name and the "transformer." prefix the official loader strips), the config that LakonLab's
    exporter writes (_GMFlux2Transformer2DModel's arguments) and the policy_config metadata."""
    cfg = teacher.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    packed = cfg.in_channels
    tensors = {
        "proj_out_means.weight": rand(k * packed, d, seed=1), "proj_out_means.bias": rand(k * packed, seed=2),
        "proj_out_logweights.weight": rand(k * 4, d, seed=3), "proj_out_logweights.bias": rand(k * 4, seed=4),
        "proj_out_logstds.1.weight": rand(inner, d, seed=5), "proj_out_logstds.1.bias": rand(inner, seed=6),
        "proj_out_logstds.3.weight": rand(1, inner, seed=7), "proj_out_logstds.3.bias": torch.full((1,), math.log(0.05)),
        "norm_out.linear.weight": rand(*teacher.norm_out.linear.weight.shape, seed=8),
    }  # fmt: skip
    for i, path in enumerate(LORA_TARGETS):
        layer = teacher.get_submodule(path)
        prefix = "transformer." if i == 0 else ""
        suffix = ".default" if i == 1 else ""
        tensors[f"{prefix}{path}.lora_A{suffix}.weight"] = rand(RANK, layer.in_features, seed=20 + 2 * i)
        tensors[f"{prefix}{path}.lora_B{suffix}.weight"] = rand(layer.out_features, RANK, seed=21 + 2 * i)
    config = {"_class_name": "GMFlux2Transformer2DModel", "num_gaussians": k, "constant_logstd": None,
              "logstd_inner_dim": inner, "gm_num_logstd_layers": 2, "logweights_channels": 4,
              **{key: cfg[key] for key in ("in_channels", "out_channels", "num_layers", "num_single_layers",
                                           "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                                           "timestep_guidance_channels", "mlp_ratio", "axes_dims_rope", "rope_theta",
                                           "eps", "guidance_embeds")}}  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    meta = {"policy_config": json.dumps({"type": "GMFlow"})}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata=meta)
    return tensors


def plain_key(key: str) -> str:
    return key.removeprefix("transformer.").replace(".default.", ".")


def test_official_checkpoint_loads_where_the_official_head_uses_it(tmp_path):
    teacher = tiny_flux2()
    tensors = official_checkpoint(tmp_path / "gmflux2_k3", teacher)
    fused = load_official_adapter(tmp_path / "gmflux2_k3", teacher, fuse=True)
    assert fused.teacher_class == "Flux2Transformer2DModel" and fused.num_components == K
    for path in LORA_TARGETS:  # fused: W + B @ A (alpha = rank)
        a = next(v for key, v in tensors.items() if plain_key(key) == f"{path}.lora_A.weight")
        b = next(v for key, v in tensors.items() if plain_key(key) == f"{path}.lora_B.weight")
        torch.testing.assert_close(fused.trunk.get_submodule(path).weight, teacher.get_submodule(path).weight + b @ a,
                                   atol=1e-6, rtol=0)  # fmt: skip
    assert torch.equal(fused.trunk.norm_out.linear.weight, tensors["norm_out.linear.weight"])

    features, temb = {}, {}
    fused.trunk.proj_out.register_forward_pre_hook(lambda m, args: features.__setitem__("v", args[0]))
    fused.trunk.time_guidance_embed.register_forward_hook(lambda m, args, out: temb.__setitem__("v", out))
    x, t, emb, g = inputs()
    with torch.no_grad():
        out = fused(x, t, encoder_hidden_states=emb, guidance=g)
    f, (b, seq) = features["v"], features["v"].shape[:2]
    hw = (x.shape[2] // 2, x.shape[3] // 2)
    # the official GMFlux2 head and PiFlux2Pipeline's unpacking: means (bs, seq, K, 4C) -> (bs, K, C, H, W)
    means = (f @ tensors["proj_out_means.weight"].T + tensors["proj_out_means.bias"]).reshape(b, seq, K, 4 * C)
    logweights = (f @ tensors["proj_out_logweights.weight"].T + tensors["proj_out_logweights.bias"]).reshape(b, seq, K, 4)
    logweights = logweights.log_softmax(dim=-2)
    torch.testing.assert_close(out.means, tokens_to_image(means.flatten(2), hw, K), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logweights, tokens_to_image(logweights.flatten(2), hw, K), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logstds, official_logstds(tensors, temb["v"]).reshape(b, 1, 1, 1, 1), atol=1e-6, rtol=0)

    # the default: the LoRA as the named PEFT adapter of the official loader, computing what the fused student does
    student = load_official_adapter(tmp_path / "gmflux2_k3", teacher)
    assert "transformer_piflow" in student.trunk.peft_config
    with torch.no_grad():
        unfused = student(x, t, encoder_hidden_states=emb, guidance=g)
    torch.testing.assert_close(unfused.means, out.means, atol=1e-5, rtol=1e-5)


def test_export_writes_the_official_layout_back_exactly(tmp_path):
    teacher = tiny_flux2()
    tensors = official_checkpoint(tmp_path / "in", teacher)
    student = load_official_adapter(tmp_path / "in", teacher)  # unfused: exported as an adapter
    folder = export_official(student, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    original = json.loads((tmp_path / "in" / "config.json").read_text())
    # the class name, the head settings and the trunk's arguments; out_channels written out (the class reads None as
    # in_channels)
    assert config == {**original, "out_channels": 4 * C}
    written = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert set(written) == {plain_key(k) for k in tensors}
    for key, value in tensors.items():
        assert torch.equal(written[plain_key(key)], value), key
    assert read_policy_config(folder) == {"type": "GMFlow"}
    again = load_official_adapter(folder, teacher)
    x, t, emb, g = inputs()
    with torch.no_grad():
        a, b = student(x, t, encoder_hidden_states=emb, guidance=g), again(x, t, encoder_hidden_states=emb, guidance=g)
    for name in ("means", "logweights", "logstds"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_official_checkpoint_for_another_teacher_is_refused(tmp_path):
    from test_students import tiny_teacher

    official_checkpoint(tmp_path / "gm", tiny_flux2())
    with pytest.raises(ValueError, match="GMFlux2Transformer2DModel checkpoints are for a Flux2Transformer2DModel teacher"):
        load_official_adapter(tmp_path / "gm", tiny_teacher("flux"))
    with pytest.raises(ValueError, match=r"proj_out_means\.(weight|bias): checkpoint tensor \(36"):
        bigger = Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=8,
                                         axes_dims_rope=(2, 2, 2, 2))  # fmt: skip
        load_official_adapter(tmp_path / "gm", bigger)
    dx = build_student(tiny_flux2(), "DX", num_points=4)
    with pytest.raises(ValueError, match="no official layout for a DX student of a Flux2Transformer2DModel"):
        export_official(dx, tmp_path / "dx")


# ---------------------------------------------------------------------------- the stock pipeline

HEIGHT, WIDTH = 16, 24  # pixels; the tiny VAE downsamples by 2: latents 8 x 12, 4 x 6 tokens


def flux2_pipe() -> Flux2Pipeline:
    pipe = Flux2Pipeline(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), tiny_vae(), None, None,
                         tiny_flux2())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images():
    rng = np.random.default_rng(0)
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))]  # fmt: skip


def reference_latents(pipe: Flux2Pipeline, images) -> list[torch.Tensor]:
    """Each reference image as Flux2Pipeline encodes it (preprocess, VAE mode, bn normalisation), in image layout."""
    out = []
    for img in images:
        w, h = img.size
        pixels = pipe.image_processor.preprocess(img, height=h - h % 4, width=w - w % 4, resize_mode="crop")
        with torch.no_grad():
            out.append(Flux2Pipeline._unpatchify_latents(pipe._encode_vae_image(pixels, generator=None)))
    return out


@pytest.mark.parametrize("edit", [False, True], ids=["text-to-image", "edit"])
@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
def test_stock_pipeline_matches_a_hand_loop(policy_type, edit):
    steps, shift, f = 3, 3.2, 0.5
    seg = 1.0 / (steps - 1 + f)
    pipe = flux2_pipe()
    student = build_student(pipe.transformer, policy_type, num_components=K, num_points=4, logstd_inner_dim=8,
                            generator=torch.Generator().manual_seed(7)).eval()  # fmt: skip
    options = {"temperature": 0.7} if policy_type == "GMFlow" else {"dx_segment_size": seg, "dx_shift": shift}
    scheduler = PiFlowScheduler(policy_type=policy_type, shift=shift, use_dynamic_shifting=False, final_step_size_scale=f,
                                **options)  # fmt: skip
    to_piflow(pipe, student, scheduler)
    x0 = torch.randn(2, C, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    images = reference_images() if edit else None
    lat = Flux2Pipeline._patchify_latents(x0)
    got = pipe(prompt_embeds=emb, image=images, latents=lat, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
               guidance_scale=GUIDANCE, output_type="latent").images  # fmt: skip
    assert got.shape == (2, (HEIGHT // 4) * (WIDTH // 4), 4 * C)  # the pipeline's packed latents
    got = Flux2Pipeline._unpatchify_latents(Flux2Pipeline._unpack_latents_with_ids(got, Flux2Pipeline._prepare_latent_ids(lat)))
    cond = {"encoder_hidden_states": emb, "guidance": torch.full((2,), GUIDANCE)}
    if edit:
        cond["condition_latents"] = reference_latents(pipe, images)
    ref = manual_loop(student, x0, steps, shift, f, cond, temperature=0.7, dx=None if policy_type == "GMFlow" else seg)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if edit:  # the reference images changed the sample
        plain = manual_loop(student, x0, steps, shift, f, {k: v for k, v in cond.items() if k != "condition_latents"},
                            temperature=0.7, dx=None if policy_type == "GMFlow" else seg)  # fmt: skip
        assert not torch.allclose(plain, ref, atol=1e-3)


def test_converted_pipeline_decodes_edits_and_keeps_the_dynamic_shift():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    pipe = flux2_pipe()
    to_piflow(pipe, build_student(pipe.transformer, "GMFlow", num_components=K, logstd_inner_dim=8).eval())
    assert pipe.scheduler.config.use_dynamic_shifting  # taken from the stock scheduler: Flux2Pipeline passes its mu
    emb = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    images = pipe(prompt_embeds=emb, image=reference_images()[:1], height=HEIGHT, width=WIDTH, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (1, HEIGHT, WIDTH, 3) and np.isfinite(images).all()
    seq_len = (HEIGHT // 4) * (WIDTH // 4)
    assert math.isclose(pipe.scheduler._shift, math.exp(compute_empirical_mu(seq_len, 4)), rel_tol=1e-9)


# ---------------------------------------------------------------------------- the prompt cache and the trainer


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    from piflow_kernels.cli import main

    folder = tmp_path_factory.mktemp("pipes") / "flux2"
    with torch.random.fork_rng(devices=[]):
        assert main(["make-tiny-pipeline", "flux2", str(folder), "--seed", "4"]) == 0
    return folder


@pytest.fixture(scope="module")
def flux2_cache(flux2_dir, tmp_path_factory):
    from piflow_kernels.distill.prompt_cache import encode_prompts

    out = tmp_path_factory.mktemp("caches") / "flux2"
    return encode_prompts(flux2_dir, PROMPTS, out, batch_size=4, shard_size=4, dtype="float32", progress=False,
                          max_sequence_length=MSL)  # fmt: skip


def test_the_prompt_cache_holds_what_encode_prompt_returns(flux2_dir, flux2_cache):
    from diffusers import DiffusionPipeline

    from piflow_kernels.distill.prompt_cache import PromptCache

    pipe = DiffusionPipeline.from_pretrained(str(flux2_dir), transformer=None, vae=None)
    assert type(pipe).__name__ == "Flux2Pipeline"
    cache = PromptCache(flux2_cache)
    assert len(cache) == len(PROMPTS)
    for start in (0, 4):  # the batches encode_prompts ran (shards of 4 prompts, batches of 4)
        with torch.no_grad():
            embeds, text_ids = pipe.encode_prompt(PROMPTS[start : start + 4], device="cpu", max_sequence_length=MSL)
        assert text_ids.shape == (4, MSL, 4)  # derived, not stored
        for j in range(4):
            row = cache[start + j]
            assert set(row) == {"prompt_embeds"} and row["prompt_embeds"].shape == (MSL, TEXT_DIM)
            assert torch.equal(row["prompt_embeds"], embeds[j])
    assert not torch.equal(cache[0]["prompt_embeds"], cache[1]["prompt_embeds"])  # the prompts were not cut off


def test_a_lora_run_on_a_flux2_teacher_leaves_a_student_folder_that_samples(tmp_path, flux2_dir, flux2_cache):
    from piflow_kernels.distill.builders import build_teacher
    from piflow_kernels.distill.config import TrainConfig
    from piflow_kernels.distill.trainer import Trainer

    cfg = text_config(tmp_path, flux2_dir, flux2_cache, max_iters=3, teacher={"embedded_guidance": GUIDANCE},
                      piid={"shift": 3.2, "final_step_size_scale": 0.5}, eval_every=3,
                      eval={"num_prompts": 2, "teacher_steps": 2, "batch_size": 2})  # fmt: skip
    trainer = Trainer(TrainConfig.from_dict(cfg))
    adapted = {n.split(".lora_")[0] for n, p in trainer.student.named_parameters() if ".lora_" in n and p.requires_grad}
    assert "trunk.single_transformer_blocks.0.attn.to_out" in adapted
    assert "trunk.transformer_blocks.0.ff.linear_in" in adapted
    assert "trunk.time_guidance_embed.timestep_embedder.linear_1" in adapted
    assert not any("to_q" in n or "to_qkv" in n or "guidance_embedder" in n for n in adapted)
    g, x, cond = trainer._micro_batch(0, 0)
    assert set(cond) == {"encoder_hidden_states", "guidance"} and torch.equal(cond["guidance"], torch.full((3,), GUIDANCE))
    t = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(5)) * 900 + 50
    reference, _, _ = build_teacher(trainer.cfg)  # the FLUX.2 transformer on its own, called as the pipeline calls it
    with torch.no_grad():  # the tied teacher (the student's trunk, adapters off, the teacher's proj_out) is the teacher
        assert torch.equal(trainer.teacher(x, t, **cond), reference(x, t, **cond))
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    # the evaluation grid is decoded by the pipeline's AutoencoderKLFlux2: 4 x 4 latents are 8 x 8 images (a latent
    # preview would be 4 x 4); 2 prompts, the student's row above the teacher's, 2-pixel gaps
    from PIL import Image

    assert x.shape[-2:] == (4, 4)
    assert Image.open(tmp_path / "eval" / "iter_00000003.png").size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)

    folder = tmp_path / "students" / "iter_00000003"
    student = PiFlowStudent.from_pretrained(folder).eval()
    assert student.teacher_class == "Flux2Transformer2DModel" and student.sampling["shift"] == 3.2
    pipe = to_piflow(Flux2Pipeline.from_pretrained(flux2_dir, dtype=torch.float32), student)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=PROMPTS[0], height=16, width=16, max_sequence_length=MSL, guidance_scale=GUIDANCE, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert image.shape == (1, 16, 4 * C) and torch.isfinite(image).all() and image.abs().sum() > 0
