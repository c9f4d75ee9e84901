"""``distill --dry-run``: the per-rank memory estimate, built on the meta device from the config alone.

Parameter counts are exact (against the trainer's own student, and against FLUX.1-dev's shapes); the estimate must
move the right way (checkpointing lowers activations, FSDP divides the weights by the ranks, 8-bit AdamW quarters the
optimizer state); no weight file is read (a damaged one still estimates). Tiny FLUX.1 pipelines are saved to disk as
in test_prompt_cache.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
from test_prompt_cache import MSL, encode, save_flux  # noqa: E402

from piflow_kernels.cli import main  # noqa: E402
from piflow_kernels.distill.builders import build_teacher, build_training_student  # noqa: E402
from piflow_kernels.distill.config import ConfigError, TrainConfig  # noqa: E402
from piflow_kernels.distill.estimate import BNB_BLOCK, DEFAULT_TEXT_LEN, estimate_memory, meta_models  # noqa: E402
from piflow_kernels.layouts import TEXT_ARGS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
}  # fmt: skip
FLUX_DEV_PARAMS = 11_901_408_320  # FLUX.1-dev's "12B" transformer


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return save_flux(tmp_path_factory.mktemp("pipes") / "flux", seed=4)


@pytest.fixture(scope="module")
def flux_cache(flux_dir, tmp_path_factory) -> Path:
    return encode(flux_dir, tmp_path_factory.mktemp("caches") / "flux")


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory) -> Path:
    """A FLUX.1-dev transformer folder holding only its config.json: no weights at all."""
    folder = tmp_path_factory.mktemp("flux-dev") / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(FLUX_DEV))
    return folder


def tiny_config(pipeline: Path, cache: Path, **changes) -> dict:
    cfg = {
        "out_dir": "unused",
        "teacher": {"kind": "diffusers", "pretrained": str(pipeline)},
        "student": {"kind": "diffusers", "num_components": 2, "lora_rank": 4, "kwargs": {"logstd_inner_dim": 8}},
        "data": {"mode": "data_free", "batch_size": 3, "channels": 3, "height": 4, "width": 4, "prompt_cache": str(cache)},
    }
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def flux_dev_config(folder: Path, **changes) -> TrainConfig:
    """The official pi-FLUX.1 recipe's model side: LoRA rank 256 on the official targets, bf16 base, 1024 px, batch 2."""
    cfg = {
        "teacher": {"kind": "diffusers", "pretrained": str(folder), "dtype": "bfloat16"},
        "student": {"kind": "diffusers", "lora_rank": 256, "lora_dropout": 0.05, "gradient_checkpointing": True},
        "data": {"mode": "data_free", "batch_size": 2, "channels": 16, "height": 128, "width": 128},
        "piid": {"num_intermediate_states": 4},
    }
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.from_dict(cfg)


def counts(module: torch.nn.Module) -> dict[tuple[bool, torch.dtype], int]:
    out: dict[tuple[bool, torch.dtype], int] = {}
    for p in module.parameters():
        out[(p.requires_grad, p.dtype)] = out.get((p.requires_grad, p.dtype), 0) + p.numel()
    return out


# ---------------------------------------------------------------------------- exact counts, no weights read


@pytest.mark.parametrize(
    "changes",
    [
        {},  # LoRA with the tied teacher (the base held once)
        {"student": {"tie_teacher": False, "trainable_dtype": "bfloat16"}, "teacher": {"dtype": "bfloat16"}},
        {"student": {"lora_rank": 0}},  # full fine-tuning: a separate frozen teacher
    ],
    ids=["lora-tied", "lora-untied-bf16", "full"],
)
def test_counts_are_the_trainers_own_student(flux_dir, flux_cache, changes):
    cfg = TrainConfig.from_dict(tiny_config(flux_dir, flux_cache, **changes))
    teacher_meta, student_meta = meta_models(cfg)
    assert all(p.is_meta for p in student_meta.parameters())
    _, model, _ = build_teacher(cfg)
    student = build_training_student(cfg, model)
    assert counts(student_meta) == counts(student)
    tied = cfg.student.lora_rank > 0 and cfg.student.tie_teacher
    assert (teacher_meta is None) == tied
    if not tied:
        assert counts(teacher_meta) == counts(model)
    est = estimate_memory(cfg, world_size=1)
    expected_trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    teacher_count = 0 if tied else sum(p.numel() for p in model.parameters())
    assert est.trainable_params == expected_trained
    assert est.frozen_params == sum(p.numel() for p in student.parameters() if not p.requires_grad) + teacher_count
    assert est.teacher_params == teacher_count
    assert est.total_params == est.trainable_params + est.frozen_params
    trained_bytes = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    assert est.trainable_bytes == trained_bytes
    assert est.ddp["trained weights"] == trained_bytes and est.ddp["gradients"] == trained_bytes
    assert est.ddp["EMA of the trained weights"] == trained_bytes  # the EMA shares the frozen weights
    assert est.ddp["DDP buckets | FSDP gathered"] == 0  # one process: no DDP wrapper
    assert est.text_tokens == MSL and "prompt cache" in est.text_source  # from the cache's index
    dtypes = {str(p.dtype).removeprefix("torch.") for p in student.parameters() if p.requires_grad}
    assert set(est.bytes_by_dtype["trained"]) == dtypes


def test_no_weight_file_is_read(flux_dir, flux_cache, tmp_path):
    pipe = tmp_path / "flux"
    shutil.copytree(flux_dir, pipe)
    cfg = TrainConfig.from_dict(tiny_config(pipe, flux_cache))
    before = estimate_memory(cfg, world_size=2)
    weights = list((pipe / "transformer").glob("*.safetensors"))
    assert weights
    for path in weights:
        path.write_bytes(b"not a safetensors file")  # garbage: loading would fail
    assert estimate_memory(cfg, world_size=2) == before
    for path in weights:
        path.unlink()
    assert estimate_memory(cfg, world_size=2) == before


def test_flux1_dev_lora_256_on_meta(flux_dev):
    est = estimate_memory(flux_dev_config(flux_dev), world_size=8)
    # the base: FLUX.1-dev's 11.9B, bf16, held once (the tied teacher keeps its own output layer and norm_out, of the
    # sizes of the ones the student trains, so the frozen count is the base's)
    assert est.frozen_params == FLUX_DEV_PARAMS
    assert est.bytes_by_dtype["frozen"] == {"bfloat16": 2 * FLUX_DEV_PARAMS}
    # the trained parameters from the shapes: rank-256 adapters r * (in + out) on the official targets, the policy
    # head (K = 8, C = 16, 2 x 2 pixels per token), the log-std MLP (3072 -> 1024 -> 1) and norm_out
    d, ff, r = 3072, 4 * 3072, 256
    lora = 19 * 4 * r * (d + ff)  # ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2
    lora += 38 * (r * (d + ff) + r * (d + ff + d))  # proj_mlp, proj_out (5d -> d)
    lora += r * (256 + d) + r * (d + d)  # timestep_embedder.linear_1, linear_2
    head = (d * 512 + 512) + (d * 32 + 32) + (d * 1024 + 1024) + (1024 + 1) + (d * 2 * d + 2 * d)
    assert est.trainable_params == lora + head == 653_697_569
    assert est.bytes_by_dtype["trained"] == {"float32": 4 * (lora + head)}
    assert (est.image_tokens, est.text_tokens, est.hidden, est.num_blocks) == (4096, 512, 3072, 57)
    # FSDP: each rank holds 1/8 of the student and 1/8 of the EMA (its own shards, the frozen base included)
    assert est.fsdp["trained weights"] == -(-est.trainable_bytes // 8)
    assert est.fsdp["frozen weights"] == -(-2 * est.frozen_bytes // 8)
    assert est.fsdp.peak < est.ddp.peak / 2
    assert est.fsdp.startup > est.frozen_bytes  # the whole student on each rank before it is sharded
    text = est.table()
    assert "653,697,569" in text and "11,901,408,320" in text and "FSDP (8 ranks)" in text


# ---------------------------------------------------------------------------- the estimate moves the right way


def test_checkpointing_lowers_the_activations(flux_dev):
    on = estimate_memory(flux_dev_config(flux_dev), world_size=8)
    off = estimate_memory(flux_dev_config(flux_dev, student={"gradient_checkpointing": False}), world_size=8)
    assert on.trainable_params == off.trainable_params
    saved_on, saved_off = on.ddp["activations saved"], off.ddp["activations saved"]
    assert saved_on * 10 < saved_off  # 57 blocks' activations against their inputs
    assert on.ddp.peak < off.ddp.peak and on.fsdp.peak < off.fsdp.peak
    # activations scale with the batch and the tokens
    big = estimate_memory(flux_dev_config(flux_dev, data={"batch_size": 4}), world_size=8)
    assert 1.9 * saved_on < big.ddp["activations saved"] < 2.1 * saved_on
    longer = estimate_memory(flux_dev_config(flux_dev), world_size=8, text_len=1024)
    assert longer.text_tokens == 1024 and longer.ddp["activations saved"] > saved_on
    # a periodic evaluation samples eval.batch_size images without grad
    assert on.ddp.eval_peak == 0
    small, large = (estimate_memory(flux_dev_config(flux_dev, eval_every=100, eval={"batch_size": n}), 8) for n in (2, 16))
    assert 0 < small.ddp.eval_peak < large.ddp.eval_peak and small.ddp.worst == small.ddp.peak < large.ddp.worst
    assert "evaluation (no grad)" in large.table()


def test_fsdp_divides_the_weights_by_the_world_size(flux_dev):
    cfg = flux_dev_config(flux_dev)
    one, eight = estimate_memory(cfg, world_size=1), estimate_memory(cfg, world_size=8)
    assert one.trainable_params == eight.trainable_params
    for row in ("frozen weights", "trained weights", "EMA of the trained weights", "gradients", "optimizer state"):
        assert eight.ddp[row] == one.ddp[row]  # DDP replicates
        assert eight.fsdp[row] * 7.9 < one.fsdp[row] <= eight.fsdp[row] * 8, row
    assert eight.ddp["activations saved"] == eight.fsdp["activations saved"]  # the per-rank batch
    assert eight.ddp["DDP buckets | FSDP gathered"] == eight.trainable_bytes  # a second copy of the gradients


def test_8bit_adamw_quarters_the_optimizer_state(flux_dev):
    plain = estimate_memory(flux_dev_config(flux_dev), world_size=8)
    eight_bit = estimate_memory(flux_dev_config(flux_dev, optim={"optimizer": "adamw8bit"}), world_size=8)
    ratio = eight_bit.ddp["optimizer state"] / plain.ddp["optimizer state"]
    assert 0.25 < ratio < 0.25 * (1 + 4 / BNB_BLOCK) + 0.001  # 1 B + a float32 scale per block, against 4 B
    assert eight_bit.fsdp["optimizer state"] == plain.fsdp["optimizer state"]  # no sharded parameters: AdamW
    assert eight_bit.ddp.peak < plain.ddp.peak


def test_an_untied_teacher_is_a_second_copy_and_is_not_sharded(flux_dev):
    tied = estimate_memory(flux_dev_config(flux_dev), world_size=8)
    untied = estimate_memory(flux_dev_config(flux_dev, student={"tie_teacher": False}), world_size=8)
    assert untied.teacher_params == FLUX_DEV_PARAMS and tied.teacher_params == 0
    # the student's own copy of the base lacks the output layer (now the head) and norm_out (trained)
    proj_out, norm_out = 3072 * 64 + 64, 3072 * 6144 + 6144
    assert untied.frozen_params == 2 * FLUX_DEV_PARAMS - proj_out - norm_out
    assert untied.trainable_params == tied.trainable_params
    assert untied.fsdp["frozen weights"] >= 2 * FLUX_DEV_PARAMS  # the whole teacher on every rank


def test_fsdp_without_units_gathers_the_whole_student(flux_dev):
    blocks = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    sharded = estimate_memory(flux_dev_config(flux_dev, distributed={"mode": "fsdp", "fsdp_modules": blocks}), 8)
    whole = estimate_memory(flux_dev_config(flux_dev, distributed={"mode": "fsdp"}), 8)
    assert whole.fsdp["DDP buckets | FSDP gathered"] > whole.frozen_bytes  # the root is everything
    assert sharded.fsdp["DDP buckets | FSDP gathered"] < sharded.frozen_bytes / 10
    assert any("fsdp_modules is empty" in n for n in whole.notes)


def test_world_size_comes_from_the_environment(flux_dir, flux_cache, monkeypatch):
    cfg = TrainConfig.from_dict(tiny_config(flux_dir, flux_cache))
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert estimate_memory(cfg).world_size == 4
    monkeypatch.delenv("WORLD_SIZE")
    assert estimate_memory(cfg).world_size == 1
    with pytest.raises(ValueError, match="world_size"):
        estimate_memory(cfg, world_size=0)


def test_what_the_trainer_refuses_is_refused(flux_dir, flux_cache, tmp_path):
    with pytest.raises(ConfigError, match="data.channels"):
        estimate_memory(TrainConfig.from_dict(tiny_config(flux_dir, flux_cache, data={"channels": 4})))
    with pytest.raises(ConfigError, match="teacher.pretrained"):
        estimate_memory(TrainConfig.from_dict(tiny_config(tmp_path / "nowhere", flux_cache)))
    with pytest.raises(ConfigError, match="data.prompt_cache"):
        estimate_memory(TrainConfig.from_dict(tiny_config(flux_dir, tmp_path / "no-cache")))
    with pytest.raises(ConfigError, match="distributed.fsdp_modules.*NoSuchBlock"):
        bad = tiny_config(flux_dir, flux_cache, distributed={"mode": "fsdp", "fsdp_modules": ["NoSuchBlock"]})
        estimate_memory(TrainConfig.from_dict(bad))


# ---------------------------------------------------------------------------- the command line


def test_cli_dry_run_prints_the_table_and_trains_nothing(flux_dir, flux_cache, tmp_path, capsys):
    out = tmp_path / "run"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_config(flux_dir, flux_cache, out_dir=str(out))))
    assert main(["distill", str(path), "--dry-run", "--world-size", "2"]) == 0
    text = capsys.readouterr().out
    est = estimate_memory(TrainConfig.from_file(path), world_size=2)
    assert f"{est.trainable_params:,}" in text and f"{est.frozen_params:,}" in text
    assert "FSDP (2 ranks)" in text and "exact" in text and "estimate" in text and "peak while training" in text
    assert not out.exists()  # nothing trained, nothing written
    assert main(["distill", str(path), "--dry-run", "--text-len", "77"]) == 0
    assert "77 text (--text-len)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dry-run", "--world-size", "0"], "--world-size must be an integer >= 1"),
        (["--dry-run", "--text-len", "-1"], "--text-len must be an integer >= 0"),
        (["--world-size", "2"], "--world-size and --text-len go with --dry-run"),
    ],
)
def test_cli_dry_run_bad_flags_exit_2(flux_dir, flux_cache, tmp_path, capsys, args, message):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_config(flux_dir, flux_cache)))
    assert main(["distill", str(path), *args]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_cli_dry_run_bad_config_exits_2(flux_dir, flux_cache, tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_config(tmp_path / "missing", flux_cache)))
    assert main(["distill", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key teacher.pretrained") and err.count("\n") == 1


# ---------------------------------------------------------------------------- the activation model against a real step


def peak_cpu_bytes(fn) -> int:
    """Peak of the bytes allocated on the CPU while ``fn()`` runs, above what was allocated before (the profiler's
    allocation timeline: every storage created and destroyed)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    try:
        timeline = prof._memory_profile().timeline
    except AttributeError:  # pragma: no cover - a private API of torch.profiler
        pytest.skip("this PyTorch's profiler has no memory timeline")
    live = peak = 0
    for _, action, _, size in timeline:
        live += size if action.name == "CREATE" else -size if action.name == "DESTROY" else 0
        peak = max(peak, live)
    return peak


def test_activation_estimate_matches_a_measured_step_on_the_cpu(flux_cache, tmp_path):
    """One real accumulate_gradients of a small FLUX student (float32 on the CPU): the measured peak of the step minus
    the gradients it leaves is the estimate's activations, within the model's stated accuracy."""
    import diffusers

    folder = tmp_path / "transformer"
    torch.manual_seed(0)
    diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    ).save_pretrained(folder)  # fmt: skip
    from piflow_kernels.distill.trainer import Trainer

    measured, estimated = {}, {}
    for ckpt in (False, True):
        cfg = TrainConfig.from_dict({
            "out_dir": str(tmp_path / "run"), "device": "cpu", "progress": False, "tensorboard": False, "log_every": 0,
            "teacher": {"kind": "diffusers", "pretrained": str(folder)},
            "student": {"kind": "diffusers", "lora_rank": 4, "gradient_checkpointing": ckpt, "kwargs": {"logstd_inner_dim": 16}},
            "data": {"mode": "data_free", "batch_size": 2, "channels": 16, "height": 16, "width": 16,
                     "prompt_cache": str(flux_cache)},
            "piid": {"nfe": 1, "total_substeps": 4, "num_intermediate_states": 1},
        })  # fmt: skip
        trainer = Trainer(cfg)
        trainer.accumulate_gradients()  # first-use work (lazy inits, the native rollout's build) out of the way
        trainer.model.zero_grad(set_to_none=True)
        peak = peak_cpu_bytes(trainer.accumulate_gradients)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in trainer.student.parameters() if p.grad is not None)
        trainer.close()
        est = estimate_memory(cfg, world_size=1)
        assert est.activation_bytes == 4  # float32 weights on the CPU: no autocast
        measured[ckpt] = peak - grads
        estimated[ckpt] = est.ddp["activations saved"] + est.ddp["activations working set"]
    print({ckpt: round(estimated[ckpt] / measured[ckpt], 3) for ckpt in measured}, "estimate / measured (pytest -s)")
    assert measured[True] < measured[False] and estimated[True] < estimated[False]
    for ckpt in (False, True):
        assert 0.6 < estimated[ckpt] / measured[ckpt] < 1.6, (ckpt, estimated[ckpt], measured[ckpt])


def test_every_text_teacher_has_its_pipelines_default_prompt_length():
    """Without a prompt cache the text tokens are the pipeline's default: ``max_sequence_length`` of the pipelines
    that have one (FLUX.1, FLUX.2, Wan; SD3's is the T5 part, after its 77 CLIP tokens), for every TEXT_ARGS class."""
    import inspect

    import diffusers

    assert sorted(DEFAULT_TEXT_LEN) == sorted(TEXT_ARGS)
    pipelines = {"FluxTransformer2DModel": "FluxPipeline", "Flux2Transformer2DModel": "Flux2Pipeline",
                 "WanTransformer3DModel": "WanPipeline", "SD3Transformer2DModel": "StableDiffusion3Pipeline"}  # fmt: skip
    for teacher, name in pipelines.items():
        default = inspect.signature(getattr(diffusers, name).__call__).parameters["max_sequence_length"].default
        assert DEFAULT_TEXT_LEN[teacher] == default + (77 if teacher == "SD3Transformer2DModel" else 0), teacher
