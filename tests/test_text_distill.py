"""Distilling text-to-image teachers: prompt-cache conditioning, LoRA students tied to the teacher, the student folder.

Tiny random FLUX.1 / SD3 / Qwen-Image pipelines (text encoders from configs, tokenizers from in-memory
vocabularies; see test_prompt_cache.py) are saved to disk, their prompts encoded into a cache, and the trainer
distills a LoRA GMFlow student from the transformer folder, on the CPU in float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
from test_prompt_cache import MSL, PROMPTS, encode, save_flux  # noqa: E402

from piflow_kernels.distill.builders import _diffusers_model, build_teacher  # noqa: E402
from piflow_kernels.distill.config import ConfigError, TrainConfig  # noqa: E402
from piflow_kernels.distill.teachers import DiffusersTeacher  # noqa: E402
from piflow_kernels.distill.trainer import Trainer  # noqa: E402
from piflow_kernels.students import PiFlowStudent  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return save_flux(tmp_path_factory.mktemp("pipes") / "flux", seed=4)


@pytest.fixture(scope="module")
def flux_cache(flux_dir, tmp_path_factory) -> Path:
    return encode(flux_dir, tmp_path_factory.mktemp("caches") / "flux")


def text_config(out_dir, pipeline: Path, cache: Path, **changes) -> dict:
    """A tiny data-free LoRA run on a text teacher: 3 x 4 x 4 latents (2 x 2 FLUX tokens), K = 2."""
    cfg = {
        "seed": 3,
        "max_iters": 4,
        "out_dir": str(out_dir),
        "log_every": 0,
        "progress": False,
        "tensorboard": False,
        "keep_checkpoints": 3,
        "teacher": {"kind": "diffusers", "pretrained": str(pipeline)},
        "student": {"kind": "diffusers", "num_components": 2, "lora_rank": 4, "lora_dropout": 0.0,
                    "kwargs": {"logstd_inner_dim": 8}},  # fmt: skip
        "data": {"mode": "data_free", "batch_size": 3, "channels": 3, "height": 4, "width": 4, "prompt_cache": str(cache)},
        "optim": {"lr": 1e-3},
        "ema": {"decay": 0.5},
        "piid": {"nfe": 2, "total_substeps": 8, "num_intermediate_states": 1},
        "eval": {"num_samples": 4, "batch_size": 4},
    }
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def make(tmp_path, flux_dir, flux_cache, **changes) -> Trainer:
    return Trainer(TrainConfig.from_dict(text_config(tmp_path, flux_dir, flux_cache, **changes)))


def reference_teacher(cfg: TrainConfig) -> DiffusersTeacher:
    """The FLUX teacher loaded on its own (a second copy), called as the pipeline calls it."""
    teacher, model, _ = build_teacher(cfg)
    assert isinstance(teacher, DiffusersTeacher) and teacher.model is model
    return teacher


def micro_batch_cond(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g, x, cond = trainer._micro_batch(0, 0)
    t = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(5)) * 900 + 50
    return x, t, cond


# ---------------------------------------------------------------------------- the tied teacher


def test_the_tied_teacher_is_the_original_model_bit_for_bit_and_shares_its_weights(tmp_path, flux_dir, flux_cache):
    trainer = make(tmp_path, flux_dir, flux_cache)
    ref = reference_teacher(trainer.cfg)
    x, t, cond = micro_batch_cond(trainer)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections", "guidance"}
    assert torch.equal(cond["guidance"], torch.full((3,), 3.5))  # FLUX.1's embedded guidance, by default
    with torch.no_grad():  # as pi-ID queries it (autograd can pick other CPU kernels)
        before = trainer.teacher(x, t, **cond)
        assert torch.equal(before, ref(x, t, **cond))
    trainer.train()
    # the adapters moved (lora_B starts at zero), the teacher did not
    lora_b = [p for n, p in trainer.student.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)
    with torch.no_grad():
        assert torch.equal(trainer.teacher(x, t, **cond), before)
    # one copy of the base weights: every frozen parameter of the EMA is the student's own tensor, and the teacher
    # holds none of its own (it runs the student's trunk)
    ema = dict(trainer.ema.module.named_parameters())
    frozen = [(n, p) for n, p in trainer.student.named_parameters() if not p.requires_grad]
    assert len(frozen) > 10 and all(ema[n] is p for n, p in frozen)
    assert not isinstance(trainer.teacher, torch.nn.Module) or not list(trainer.teacher.parameters())
    # the student's own output differs from the teacher's layer: its head replaced proj_out
    assert trainer.student.trunk.proj_out is not trainer.student.teacher_modules["proj_out"]


def test_only_adapters_and_the_head_are_trained(tmp_path, flux_dir, flux_cache):
    trainer = make(tmp_path, flux_dir, flux_cache, max_iters=2)
    names = {n for n, p in trainer.student.named_parameters() if p.requires_grad}
    full = ("trunk.proj_out.", "proj_out_logstds.", "trunk.norm_out.")
    assert names and all(".lora_" in n or n.startswith(full) for n in names)
    assert any(".lora_" in n for n in names) and any(n.startswith("trunk.norm_out.") for n in names)
    # the default targets: FLUX's feed-forward layers, single-block proj_mlp / proj_out and the timestep embedder
    adapted = {n.split(".lora_")[0] for n in names if ".lora_" in n}
    assert "trunk.single_transformer_blocks.0.proj_out" in adapted
    assert "trunk.time_text_embed.timestep_embedder.linear_1" in adapted
    assert not any("attn" in n for n in adapted)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in trainer.student.named_parameters() if n in names}
    frozen = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if n not in names}
    trainer.train()
    for n, p in trainer.student.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n


# ---------------------------------------------------------------------------- training, resume, the student folder


def test_lora_distillation_lowers_the_imitation_loss(tmp_path, flux_dir, flux_cache):
    trainer = make(tmp_path, flux_dir, flux_cache, max_iters=20, ema={"decay": 0.0}, save_student=False)
    before = trainer.imitation_loss(trainer.student)
    trainer.train()
    after = trainer.imitation_loss(trainer.student)
    assert after < 0.8 * before, (before, after)


def trained_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"student.{n}": p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
    out.update({f"ema.{n}": p.detach().clone() for n, p in trainer.ema.module.named_parameters()})
    return out


def test_resume_with_lora_is_bit_exact_and_checkpoints_only_the_trained_weights(tmp_path, flux_dir, flux_cache):
    whole = make(tmp_path / "a", flux_dir, flux_cache, max_iters=6, ckpt_every=3, save_student=False)
    whole.train()
    cut = make(tmp_path / "b", flux_dir, flux_cache, max_iters=3, save_student=False)
    cut.train()
    from piflow_kernels.files import load_safetensors

    saved = load_safetensors(tmp_path / "b" / "checkpoints" / "iter_00000003" / "student.safetensors", "student weights")
    trained = {n for n, p in cut.student.named_parameters() if p.requires_grad}
    assert set(saved) - set(dict(cut.student.named_buffers())) == trained  # no frozen base weights on disk
    resumed = make(tmp_path / "b", flux_dir, flux_cache, max_iters=6, save_student=False)
    assert resumed.resume()
    resumed.train()
    a, b = trained_state(whole), trained_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_run_leaves_a_student_folder_that_samples_through_the_stock_pipeline(tmp_path, flux_dir, flux_cache):
    from diffusers import FluxPipeline

    import piflow_kernels as pk

    trainer = make(tmp_path, flux_dir, flux_cache, max_iters=3, piid={"shift": 3.0, "final_step_size_scale": 0.5})
    trainer.train()
    folder = tmp_path / "students" / "iter_00000003"
    config = json.loads((folder / "config.json").read_text())
    assert config["num_inference_steps"] == 2
    assert config["sampling"]["shift"] == 3.0 and config["sampling"]["final_step_size_scale"] == 0.5
    student = PiFlowStudent.from_pretrained(folder)
    assert not any("lora" in n or "base_layer" in n or n.startswith("teacher_head") for n, _ in student.named_parameters())
    # the merged student is the EMA student with its adapters
    x, t, cond = micro_batch_cond(trainer)
    cond = trainer._student_cond(cond)
    ema_out = trainer.ema.module(x, t, **cond)
    out = student(x, t, **cond)
    for name in ("means", "logweights", "logstds"):
        torch.testing.assert_close(getattr(out, name), getattr(ema_out, name), rtol=1e-5, atol=1e-5)
    pipe = pk.to_piflow(FluxPipeline.from_pretrained(flux_dir, dtype=torch.float32), student)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPTS[0], height=32, width=32, max_sequence_length=MSL, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert torch.isfinite(image).all() and image.abs().sum() > 0


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"student": {"lora_target_modules": ["no_such_layer"]}}, "student.lora_target_modules"),
        ({"student": {"train_modules": ["no_such_norm"]}}, "student.train_modules"),
        ({"teacher": {"guidance_scale": 3.0}}, "negative prompt embeddings"),
        ({"teacher": {"model_class": "SD3Transformer2DModel"}}, "teacher.model_class"),
        ({"data": {"mode": "data_dependent"}}, "data.prompt_cache"),
        ({"data": {"channels": 4}}, "data.channels"),
    ],
    ids=["lora-target", "train-module", "cfg-without-negatives", "model-class", "data-dependent", "channels"],
)
def test_bad_settings_are_config_errors_naming_the_key(tmp_path, flux_dir, flux_cache, changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make(tmp_path, flux_dir, flux_cache, **changes)


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"student": {"lora_rank": -1}}, "student.lora_rank"),
        ({"student": {"lora_dropout": 1.0}}, "student.lora_dropout"),
        ({"student": {"lora_rank": 0, "lora_target_modules": ["ff.net.2"]}}, "student.lora_target_modules"),
        ({"teacher": {"orthogonal_guidance": 0.5}}, "teacher.orthogonal_guidance"),
        ({"teacher": {"dtype": "float64"}}, "teacher.dtype"),
        ({"optim": {"optimizer": "sgd"}}, "optim.optimizer"),
    ],
    ids=["rank", "dropout", "targets-without-rank", "orthogonal-without-cfg", "dtype", "optimizer"],
)
def test_bad_values_are_refused_by_the_config(tmp_path, changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TrainConfig.from_dict(text_config(tmp_path, tmp_path, tmp_path, **changes))


def test_the_teacher_class_comes_from_the_folders_config(tmp_path, flux_dir, flux_cache):
    cfg = TrainConfig.from_dict(text_config(tmp_path, flux_dir / "transformer", flux_cache))
    assert type(_diffusers_model(cfg)).__name__ == "FluxTransformer2DModel"
    # a UNet folder loads as a UNet, not as the DiT default of a model dict
    from test_students import tiny_teacher

    tiny_teacher("unet").save_pretrained(tmp_path / "unet")
    data = {"channels": 3, "height": 8, "width": 8}
    unet = TrainConfig.from_dict({"teacher": {"kind": "diffusers", "pretrained": str(tmp_path / "unet")},
                                  "student": {"kind": "diffusers"}, "data": data})  # fmt: skip
    assert type(_diffusers_model(unet)).__name__ == "UNet2DModel"


def test_a_second_copy_is_not_made_for_the_tied_teacher(tmp_path, flux_dir, flux_cache):
    tied = make(tmp_path / "a", flux_dir, flux_cache, max_iters=0)
    untied = make(tmp_path / "b", flux_dir, flux_cache, max_iters=0, student={"tie_teacher": False})

    def storages(trainer):
        params = [*trainer.student.parameters(), *trainer.ema.module.parameters()]
        if isinstance(trainer.teacher, torch.nn.Module):
            params += list(trainer.teacher.parameters())
        return {p.untyped_storage().data_ptr(): p.numel() for p in params}

    base = sum(p.numel() for p in reference_teacher(tied.cfg).model.parameters())
    assert sum(storages(untied).values()) - sum(storages(tied).values()) >= base - 1000  # the teacher's copy, gone
    x, t, cond = micro_batch_cond(tied)
    with torch.no_grad():
        assert torch.equal(tied.teacher(x, t, **cond), untied.teacher(x, t, **cond))


# ---------------------------------------------------------------------------- SD3 (true CFG) and Qwen-Image


@pytest.fixture(scope="module")
def sd3_cache(tmp_path_factory) -> tuple[Path, Path]:
    from piflow_kernels.distill.prompt_cache import encode_prompts
    from piflow_kernels.distill.prompts import Prompt
    from piflow_kernels.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("sd3")
    pipe = save_tiny_pipeline("sd3", root / "pipe", seed=6)  # two blocks: the last has no context feed-forward
    prompts = [Prompt(p, "blurry" if i % 2 else "") for i, p in enumerate(PROMPTS)]
    cache = encode_prompts(pipe, prompts, root / "cache", batch_size=8, dtype="float32", progress=False,
                           max_sequence_length=MSL)  # fmt: skip
    return pipe, cache


def test_sd3_teacher_with_true_cfg_and_orthogonal_guidance(tmp_path, sd3_cache):
    pipe, cache = sd3_cache
    guided = {"guidance_scale": 4.0, "guidance_interval": [0, 800], "orthogonal_guidance": 1.0}
    trainer = Trainer(TrainConfig.from_dict(text_config(
        tmp_path, pipe, cache, max_iters=3, teacher=guided, data={"channels": 5, "height": 8, "width": 8},
    )))  # fmt: skip
    x, t, cond = micro_batch_cond(trainer)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections", "negative_encoder_hidden_states",
                         "negative_pooled_projections"}  # fmt: skip
    assert set(trainer._student_cond(cond)) == {"encoder_hidden_states", "pooled_projections"}  # no guidance input
    # the guided velocity by hand: the conditional and unconditional calls of the original transformer
    base = reference_teacher(TrainConfig.from_dict(text_config(tmp_path, pipe, cache, data={"channels": 5, "height": 8,
                                                                                            "width": 8})))  # fmt: skip
    pos = {"encoder_hidden_states": cond["encoder_hidden_states"], "pooled_projections": cond["pooled_projections"]}
    neg = {"encoder_hidden_states": cond["negative_encoder_hidden_states"],
           "pooled_projections": cond["negative_pooled_projections"]}  # fmt: skip
    t = torch.tensor([700.0, 900.0, 300.0])  # the second sample lies outside the guidance interval
    with torch.no_grad():
        v_pos, v_neg, got = base(x, t, **pos), base(x, t, **neg), trainer.teacher(x, t, **cond)
    bias = (v_pos - v_neg) * 3.0
    x0 = x - (t / 1000).reshape(-1, 1, 1, 1) * v_pos
    along = (bias * x0).mean((1, 2, 3), keepdim=True) / (x0 * x0).mean((1, 2, 3), keepdim=True)
    want = v_pos + bias - along * x0
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], v_pos[1], rtol=0, atol=0)
    # orthogonal: what remains of the guidance term has no component along x0
    resid = got[[0, 2]] - v_pos[[0, 2]]
    assert (resid * x0[[0, 2]]).sum((1, 2, 3)).abs().max() < 1e-4 * resid.norm()
    trainer.train()
    assert math.isfinite(trainer.imitation_loss(trainer.student))


def test_embedded_guidance_on_a_teacher_without_it_is_refused(tmp_path, sd3_cache):
    pipe, cache = sd3_cache
    with pytest.raises(ConfigError, match=r"teacher\.embedded_guidance"):
        Trainer(TrainConfig.from_dict(text_config(tmp_path, pipe, cache, teacher={"embedded_guidance": 3.5},
                                                  data={"channels": 5, "height": 8, "width": 8})))  # fmt: skip


def test_qwen_image_lora_student_from_a_cache_of_ragged_prompts(tmp_path):
    from piflow_kernels.distill.prompt_cache import encode_prompts
    from piflow_kernels.tiny import save_tiny_pipeline

    save_tiny_pipeline("qwen", tmp_path / "qwen", seed=8)
    cache = encode_prompts(tmp_path / "qwen", PROMPTS[:8] + ["a much longer prompt about a small red car"], tmp_path / "cache",
                           batch_size=9, dtype="float32", progress=False)  # fmt: skip
    trainer = Trainer(TrainConfig.from_dict(text_config(tmp_path / "run", tmp_path / "qwen", cache, max_iters=3)))
    x, t, cond = micro_batch_cond(trainer)
    assert set(cond) == {"encoder_hidden_states", "encoder_hidden_states_mask"}
    assert cond["encoder_hidden_states"].shape[:2] == cond["encoder_hidden_states_mask"].shape
    # the last block's text feed-forward is not adapted (its output is never used, as the official recipe leaves it)
    adapted = {n.split(".lora_")[0] for n, _ in trainer.student.named_parameters() if ".lora_" in n}
    assert {"trunk.transformer_blocks.0.txt_mlp.net.2", "trunk.transformer_blocks.1.img_mlp.net.2"} <= adapted
    assert not any(n.startswith("trunk.transformer_blocks.1.txt_mlp") for n in adapted)
    with torch.no_grad():
        assert torch.equal(trainer.teacher(x, t, **cond), reference_teacher(trainer.cfg)(x, t, **cond))
    trainer.train()
    assert math.isfinite(trainer.imitation_loss(trainer.student))


# ---------------------------------------------------------------------------- evaluation during training


def test_evaluation_writes_grids_beside_the_teachers_samples_and_logs_the_paired_distance(tmp_path, flux_dir, flux_cache):
    from PIL import Image

    from piflow_kernels.distill.eval_grid import EvalPrompts, fixed_noise, paired_latent_distance, teacher_samples

    trainer = make(tmp_path, flux_dir, flux_cache, max_iters=4, eval_every=2, save_student=False,
                   eval={"num_prompts": 3, "teacher_steps": 4, "batch_size": 3, "seed": 11})  # fmt: skip
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/latent_rms" in r]
    assert [r["iteration"] for r in evals] == [2, 4]
    for it in (2, 4):
        grid = Image.open(tmp_path / "eval" / f"iter_{it:08d}.png")
        assert grid.size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)  # 3 prompts; 4 x 4 latents decode to 8 x 8 (the tiny VAE)
    # the teacher's samples: the original transformer's 4 Euler steps of the first 3 prompts from the fixed noise
    # (one batch of 3: at batch 1 the CPU matmul of a second copy of the weights can differ by an ulp)
    ref = reference_teacher(trainer.cfg)
    prompts = EvalPrompts.from_cache(flux_cache, num=3)
    cond = {"encoder_hidden_states": prompts.embeddings["prompt_embeds"],
            "pooled_projections": prompts.embeddings["pooled_prompt_embeds"], "guidance": torch.full((3,), 3.5)}  # fmt: skip
    noise = fixed_noise(3, (3, 4, 4), 11)
    with torch.no_grad():  # as the evaluation runs it (autograd can pick other CPU kernels)
        want = teacher_samples(ref, noise, 4, **cond)
    from piflow_kernels.files import load_safetensors

    saved = load_safetensors(tmp_path / "eval" / "teacher.safetensors", "teacher samples")["x0"]
    assert torch.equal(saved, want)
    # the logged distance is the EMA student's samples' to those
    distance = paired_latent_distance(_student_samples(trainer), want)["mean_rms"]
    assert distance > 0 and evals[-1]["eval/latent_rms"] == pytest.approx(distance, rel=1e-6)


def _student_samples(trainer: Trainer) -> torch.Tensor:
    from piflow_kernels.distill.evaluation import sample_with

    ev = trainer._text_eval
    with torch.no_grad():
        return sample_with(trainer.ema.module, ev.noise, trainer.cfg.piid, **ev.student_cond)


# ---------------------------------------------------------------------------- data-dependent: image latents + captions


@pytest.fixture(scope="module")
def flux_latents(flux_dir, tmp_path_factory) -> tuple[Path, Path]:
    """12 random 8 x 8 images with captions, their latents (3 x 4 x 4) and their captions' prompt cache."""
    from PIL import Image

    from piflow_kernels.distill.latent_cache import encode_images
    from piflow_kernels.distill.prompt_cache import encode_prompts
    from piflow_kernels.distill.prompts import read_prompts

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(9)
    rows = []
    for i in range(12):
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
        rows.append(json.dumps({"file_name": f"img{i:02d}.png", "prompt": PROMPTS[i]}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    latents = encode_images(flux_dir, root, root / "latents", resolution=8, batch_size=4, dtype="float32", progress=False,
                            num_workers=0)  # fmt: skip
    prompts = encode_prompts(flux_dir, read_prompts(latents / "captions.jsonl"), root / "prompts", batch_size=4,
                             dtype="float32", progress=False, max_sequence_length=MSL)  # fmt: skip
    return latents, prompts


def test_a_damaged_evaluation_cache_is_recomputed_and_a_damaged_vae_config_is_named(tmp_path, flux_dir, flux_cache, caplog):
    """eval/teacher.json (the key of the cached teacher samples) damaged: the samples are recomputed, the same, with a
    warning naming the file, and the key rewritten; a damaged or foreign vae/config.json is a DamagedFileError
    naming it."""
    import logging
    import shutil

    from piflow_kernels.files import DamagedFileError

    trainer = make(tmp_path, flux_dir, flux_cache, max_iters=2, eval_every=2, save_student=False,
                   eval={"num_prompts": 3, "teacher_steps": 2, "batch_size": 3, "seed": 11})  # fmt: skip
    trainer.train()
    evaluation = trainer._text_eval
    first, meta = evaluation._reference.clone(), tmp_path / "eval" / "teacher.json"
    meta.write_bytes(b"\x00garbage")
    evaluation._reference = None
    with caplog.at_level(logging.WARNING, logger="piflow_kernels.distill.text_eval"), torch.no_grad():
        again = evaluation.reference(trainer.teacher, True)
    assert torch.equal(again, first)
    assert "recomputing the teacher's evaluation samples" in caplog.text and str(meta) in caplog.text
    assert isinstance(json.loads(meta.read_text())["key"], str)
    folder = tmp_path / "pipe"
    shutil.copytree(flux_dir / "vae", folder / "vae")
    evaluation.cfg.eval.vae = str(folder)
    bad = (('{"_class_name": ', "vae config: invalid JSON"), ('{"_class_name": "NoSuchVAE"}', "no diffusers class"))
    for text, message in bad:
        (folder / "vae" / "config.json").write_text(text)
        evaluation._vae_loaded = False
        with pytest.raises(DamagedFileError, match=message) as info:
            evaluation._decoder()
        assert info.value.path == folder / "vae" / "config.json"


def test_data_dependent_distillation_pairs_each_latent_with_its_caption(tmp_path, flux_dir, flux_latents, flux_cache):
    from piflow_kernels.distill.latent_cache import LatentCache
    from piflow_kernels.distill.prompt_cache import PromptCache

    latents, prompts = flux_latents
    data = {"mode": "data_dependent", "source": "latents", "path": str(latents), "prompt_cache": str(prompts)}
    trainer = make(tmp_path, flux_dir, prompts, max_iters=20, ema={"decay": 0.0}, save_student=False, data=data)
    lat, pc = LatentCache(latents), PromptCache(prompts)
    for it, shard in ((0, 0), (3, 0), (5, 0)):  # 12 images, 3 a batch: epochs turn over
        g, x0, cond = trainer._micro_batch(shard, it)
        idx = trainer.data.indices(3, it, shard, 1)
        assert torch.equal(x0, torch.stack([lat[i]["latents"] for i in idx]))
        assert torch.equal(cond["encoder_hidden_states"], torch.stack([pc[i]["prompt_embeds"] for i in idx]))
        assert [pc.prompts[i].prompt for i in idx] == [lat.prompts[i] for i in idx]
    before = trainer.imitation_loss(trainer.student)
    trainer.train()
    assert trainer.imitation_loss(trainer.student) < before
    # a prompt cache of other prompts than the captions is refused, naming the key
    with pytest.raises(ConfigError, match=r"data\.prompt_cache.*not aligned"):
        make(tmp_path / "bad", flux_dir, flux_cache, data={**data, "prompt_cache": str(flux_cache)})


def test_labels_in_the_data_do_not_reach_an_unconditional_teacher(tmp_path):
    from safetensors.torch import save_file
    from test_students import tiny_teacher

    tiny_teacher("unet").save_pretrained(tmp_path / "unet")
    g = torch.Generator().manual_seed(0)
    save_file({"x0": torch.randn(8, 3, 8, 8, generator=g), "class_labels": torch.arange(8)}, str(tmp_path / "x0.safetensors"))
    cfg = TrainConfig.from_dict({
        "max_iters": 1, "out_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False, "log_every": 0,
        "save_student": False, "teacher": {"kind": "diffusers", "pretrained": str(tmp_path / "unet")},
        "student": {"kind": "diffusers", "num_components": 2, "kwargs": {"logstd_inner_dim": 8}},
        "data": {"source": "tensors", "path": str(tmp_path / "x0.safetensors"), "batch_size": 2, "channels": 3,
                 "height": 8, "width": 8},
        "piid": {"nfe": 2, "total_substeps": 8},
    })  # fmt: skip
    trainer = Trainer(cfg)
    with pytest.warns(UserWarning, match="num_classes = 0"):
        _, _, cond = trainer._micro_batch(0, 0)
    assert cond == {}
    trainer.train()
    assert trainer.iteration == 1


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, flux_dir, flux_cache):
    grads = []
    for checkpointing in (False, True):
        trainer = make(tmp_path / str(checkpointing), flux_dir, flux_cache, student={"gradient_checkpointing": checkpointing})
        assert trainer.student.trunk.is_gradient_checkpointing == checkpointing
        trainer.accumulate_gradients()
        grads.append({n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_adamw8bit_off_cuda_is_plain_adamw_with_one_logged_reason(tmp_path, flux_dir, flux_cache):
    trainer = make(tmp_path, flux_dir, flux_cache, optim={"optimizer": "adamw8bit"}, max_iters=1)
    assert type(trainer.optimizer) is torch.optim.AdamW
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    reasons = [r["reason"] for r in records if r.get("event") == "optimizer"]
    assert len(reasons) == 1 and "CUDA" in reasons[0]


def test_a_dx_lora_student_records_its_segment_size(tmp_path, flux_dir, flux_cache):
    trainer = make(tmp_path, flux_dir, flux_cache, max_iters=2,
                   piid={"policy_type": "DX", "dx_segment_size": 0.25, "window_substeps": 0},
                   student={"num_points": 3})  # fmt: skip
    trainer.train()
    student = PiFlowStudent.from_pretrained(tmp_path / "students" / "iter_00000002")
    assert student.policy_type == "DX" and student.sampling["dx_segment_size"] == 0.25
    import piflow_kernels as pk

    assert pk.PiFlowScheduler.from_student(student).config.dx_segment_size == 0.25
