"""The pi-ID trainer: config validation, learning against the exact teacher, bit-exact resume, checkpoints.

Runs on the CPU in float32 with tiny students (one intra-op thread: these tensors are far too small
for threads to pay, and the machines running the suite are shared).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import piflow_kernels.distill
from piflow_kernels.distill import checkpoint as ckpt
from piflow_kernels.distill.config import ConfigError, TrainConfig, load_config_file
from piflow_kernels.distill.data import TensorDataSource
from piflow_kernels.distill.ema import EMA, ema_decay
from piflow_kernels.distill.lr_scheduler import lr_factor, warmup_factor
from piflow_kernels.distill.seeding import stream_seed
from piflow_kernels.distill.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(out_dir, **changes) -> dict:
    """A tiny exact-teacher run: 2 x 3 x 5 images, K=4 GMFlow toy student, 16 substeps."""
    cfg = {
        "seed": 3,
        "max_iters": 4,
        "out_dir": str(out_dir),
        "log_every": 0,
        "progress": False,
        "tensorboard": False,
        "teacher": {"kind": "exact", "num_modes": 4, "std": 0.1, "mode_scale": 1.0, "seed": 5},
        "student": {"kind": "toy", "num_components": 4, "num_points": 3, "hidden": 32},
        "data": {"batch_size": 16, "channels": 2, "height": 3, "width": 5},
        "optim": {"lr": 1e-2, "warmup_iters": 3, "grad_clip": 10.0},
        "ema": {"decay": 0.5},
        "piid": {"nfe": 2, "total_substeps": 16},
        "eval": {"num_samples": 256, "batch_size": 256},
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def make_trainer(out_dir, **changes) -> Trainer:
    return Trainer(TrainConfig.from_dict(small_config(out_dir, **changes)))


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Student, EMA and optimizer-moment tensors by name."""
    out = {f"student.{k}": v.clone() for k, v in trainer.student.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in trainer.ema.module.state_dict().items()})
    for i, st in trainer.optimizer.state_dict()["state"].items():
        for k, v in st.items():
            out[f"adam.{i}.{k}"] = torch.as_tensor(v).clone()
    return out


# ---------------------------------------------------------------------------------------------- config


def test_config_round_trips_through_dict_json_and_toml(tmp_path):
    cfg = TrainConfig.from_dict(small_config(tmp_path, piid={"gm_dropout": 0.05, "shift": 3.0}))
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_file(path) == cfg
    toml = tmp_path / "c.toml"
    toml.write_text('seed = 7\nmax_iters = 9\n[optim]\nlr = 0.5\nbetas = [0.8, 0.9]\n[piid]\nnfe = 3\nshift = 2\n')
    t = TrainConfig.from_file(toml)
    assert (t.seed, t.max_iters, t.optim.lr, t.optim.betas, t.piid.nfe, t.piid.shift) == (7, 9, 0.5, [0.8, 0.9], 3, 2.0)
    assert cfg.replace(optim={"lr": 0.25}).optim.lr == 0.25


@pytest.mark.parametrize("name", ["distill_exact_teacher", "distill_tiny_dit"])
def test_example_configs_load(name):
    cfg = TrainConfig.from_file(f"examples/{name}.toml")
    assert cfg.max_iters > 0 and cfg.piid.nfe >= 1


BAD_CONFIGS = [
    ("unknown-top-key", {"max_iter": 3}, "max_iter"),
    ("unknown-section-key", {"optim": {"learning_rate": 1.0}}, "optim.learning_rate"),
    ("typo-suggestion", {"data": {"batchsize": 3}}, "did you mean 'data.batch_size'"),
    ("wrong-type", {"data": {"batch_size": "16"}}, "data.batch_size must be of type int"),
    ("bool-is-not-int", {"max_iters": True}, "max_iters must be of type int"),
    ("negative-lr", {"optim": {"lr": -1.0}}, "optim.lr"),
    ("bad-betas", {"optim": {"betas": [0.9]}}, "optim.betas"),
    ("zero-accum", {"optim": {"grad_accum": 0}}, "optim.grad_accum"),
    ("ema-decay-1", {"ema": {"decay": 1.0}}, "ema.decay"),
    ("bad-mode", {"data": {"mode": "datafree"}}, "data.mode"),
    ("tensors-no-path", {"data": {"source": "tensors"}}, "data.path"),
    ("section-not-table", {"optim": 3}, "[optim]"),
    ("unknown-piid-key", {"piid": {"nfee": 2}}, "piid.nfee"),
    ("bad-piid-value", {"piid": {"nfe": 0}}, "[piid]"),
    ("bad-teacher-kind", {"teacher": {"kind": "oracle"}}, "teacher.kind"),
    ("diffusers-needs-model", {"teacher": {"kind": "diffusers"}}, "teacher.model"),
    ("cfg-needs-diffusers", {"teacher": {"guidance_scale": 3.0}}, "teacher.guidance_scale"),
    ("labels-need-diffusers-student", {"data": {"num_classes": 4}}, "data.num_classes"),
    ("bad-device", {"device": "tpu"}, "device"),
    ("bad-dist-mode", {"distributed": {"mode": "zero3"}}, "distributed.mode"),
]


@pytest.mark.parametrize("change,needle", [b[1:] for b in BAD_CONFIGS], ids=[b[0] for b in BAD_CONFIGS])
def test_bad_configs_are_rejected_naming_the_key(tmp_path, change, needle):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(small_config(tmp_path, **change))
    assert needle in str(info.value)


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config_file(bad)
    (tmp_path / "c.yaml").write_text("seed: 3\n")
    with pytest.raises(ConfigError, match=r"\.toml or \.json"):
        load_config_file(tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError):
        load_config_file(tmp_path / "missing.toml")


def test_diffusers_teacher_shape_mismatch_is_reported(tmp_path):
    model = {"sample_size": 8, "in_channels": 4, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}
    cfg = TrainConfig.from_dict(
        small_config(tmp_path, teacher={"kind": "diffusers", "model": model}, student={"kind": "diffusers"})
    )
    with pytest.raises(ConfigError, match="data.channels"):
        Trainer(cfg)


# ---------------------------------------------------------------------------------------------- pieces


def test_cosine_decay_after_the_warmup():
    factors = [lr_factor(it, 4, 0.25, 12, "cosine", 0.1) for it in range(13)]
    assert factors[:5] == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0])
    assert factors[8] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert factors[12] == pytest.approx(0.1) and all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert lr_factor(9, 4, 0.25, 12) == 1.0  # decay "none": constant after the warm-up
    with pytest.raises(ConfigError, match="optim.lr_decay"):
        TrainConfig.from_dict({"optim": {"lr_decay": "linear"}})


def test_warmup_and_ema_decay_schedules():
    assert warmup_factor(0, 4, 0.001) == pytest.approx(0.001)
    assert warmup_factor(2, 4, 0.001) == pytest.approx(0.001 + 0.999 * 0.5)
    assert warmup_factor(4, 4, 0.001) == 1.0 and warmup_factor(7, 0, 0.5) == 1.0
    assert ema_decay(2, 0.9, start_iter=3) == 0.0
    assert ema_decay(5, 0.9, start_iter=3) == 0.9
    assert ema_decay(5, 0.999, start_iter=3, policy="karras", gamma=7.0) == pytest.approx((1 - 1 / 3) ** 8)


def test_ema_update_math():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.75, start_iter=1)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(torch.randn(2, 3))
    ema.update(model, iteration=0)  # before start_iter: copy
    assert torch.equal(ema.module.weight, model.weight) and not torch.equal(before, model.weight)
    old = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(torch.randn(2, 3))
    assert ema.update(model, iteration=1) == 0.75
    torch.testing.assert_close(ema.module.weight, 0.75 * old + 0.25 * model.weight, rtol=1e-6, atol=1e-7)
    assert not ema.module.weight.requires_grad


def test_tensor_source_shards_each_epoch_exactly_once():
    x0 = torch.randn(24, 2, 3, 5)
    source = TensorDataSource(x0, torch.arange(24), seed=4)
    seen = []
    for it in range(2):  # 2 steps x 3 shards x 4 samples = one epoch of 24
        for shard in range(3):
            x, labels = source.draw(4, None, it, shard, 3)
            assert torch.equal(x, x0[labels])
            seen.append(labels)
    assert sorted(torch.cat(seen).tolist()) == list(range(24))
    again, _ = source.draw(4, None, 1, 2, 3)
    assert torch.equal(again, x)  # stateless: the same (iteration, shard) gives the same batch


def test_stream_seeds_differ():
    seeds = {stream_seed(0, it, shard) for it in range(20) for shard in range(4)}
    assert len(seeds) == 80 and all(0 <= s < 2**63 for s in seeds)


def test_grad_clipping_and_lr_warmup_apply(tmp_path):
    trainer = make_trainer(tmp_path, optim={"grad_clip": 1e-3, "warmup_iters": 4, "warmup_ratio": 0.1, "lr": 0.02})
    lrs = []
    for _ in range(2):
        logs = trainer.train_step()
        lrs.append(logs["lr"])
        clipped = torch.cat([p.grad.flatten() for p in trainer.params]).norm()
        assert logs["grad_norm"] > 1e-3
        assert float(clipped) == pytest.approx(1e-3, rel=1e-4)
    assert lrs == pytest.approx([0.02 * 0.1, 0.02 * (0.1 + 0.9 / 4)])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * (0.1 + 0.9 * 2 / 4))
    assert not trainer.use_autocast  # bf16 autocast is for CUDA only


def test_adamw_is_fused_where_possible_and_steps_like_the_default():
    """make_adamw: fused on CPU float parameters, the same update as torch's default AdamW step."""
    from piflow_kernels.distill.optim import make_adamw

    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(5, 3, generator=gen).requires_grad_(), torch.randn(7, generator=gen).requires_grad_()]
    ours = [p.detach().clone().requires_grad_() for p in ref]
    start = [p.detach().clone() for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    opt = make_adamw(ours, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    assert opt.defaults["fused"]
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in ref]
        for p, q, g in zip(ref, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    for p, q in zip(ref, ours):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert all((p - p0).abs().min() > 0 for p, p0 in zip(ref, start))  # every parameter moved


def test_tensor_data_source_trains(tmp_path):
    from safetensors.torch import save_file

    x0 = torch.randn(40, 2, 3, 5)
    save_file({"x0": x0}, str(tmp_path / "data.safetensors"))
    trainer = make_trainer(tmp_path, data={"source": "tensors", "path": str(tmp_path / "data.safetensors")})
    logs = trainer.train_step()
    assert math.isfinite(logs["loss"]) and logs["grad_norm"] > 0


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("seed", [3, 4])
def test_training_against_exact_teacher_lowers_loss_and_distance(tmp_path, seed):
    """50 steps of data-dependent pi-ID (2 NFE, two-mode data): imitation loss and distance to exact data drop.

    Measured over seeds 3-5: loss and energy distance fall to about 0.4x, sliced W2 to about 0.7x.
    (With 4 modes and 1 NFE this tiny MLP student first learns the mode average: its loss falls but
    its samples do not approach the data within a few hundred steps.)
    """
    trainer = make_trainer(
        tmp_path, seed=seed, max_iters=50, teacher={"num_modes": 2, "seed": seed + 10}, data={"batch_size": 32}
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval/finite"] == 1.0
    assert after["eval/piid_loss"] < 0.7 * before["eval/piid_loss"], (before, after)
    assert after["eval/energy_distance"] < 0.6 * before["eval/energy_distance"], (before, after)
    assert after["eval/sliced_w2"] < 0.85 * before["eval/sliced_w2"], (before, after)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("eval/energy_distance" in r for r in lines)


# ---------------------------------------------------------------------------------------------- resume


RESUME_CASES = [
    ("data_dependent-GMFlow-accum2-decay", {"optim": {"grad_accum": 2}, "piid": {"gm_dropout": 0.2, "num_decay_iters": 3}}),
    ("data_free-GMFlow-window", {"data": {"mode": "data_free"}, "piid": {"window_substeps": 2}}),
    ("data_dependent-DX", {"piid": {"policy_type": "DX"}, "ema": {"policy": "karras"}}),
]


@pytest.mark.parametrize("changes", [c[1] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_resume_is_bit_exact(tmp_path, changes):
    full = make_trainer(tmp_path / "full", max_iters=4, **changes)
    full.train()
    full_state = state_of(full)

    half = make_trainer(tmp_path / "half", max_iters=2, **changes)
    half.train()
    half.close()
    resumed = make_trainer(tmp_path / "half", max_iters=4, **changes)
    assert resumed.resume() and resumed.iteration == 2
    resumed.train()
    resumed_state = state_of(resumed)

    assert full_state.keys() == resumed_state.keys()
    for name, value in full_state.items():
        assert torch.equal(value, resumed_state[name]), name
    fresh = make_trainer(tmp_path / "fresh", **changes).student.state_dict()
    assert any(not torch.equal(full_state[f"student.{k}"], v) for k, v in fresh.items())  # training moved the weights
    assert resumed.lr_scheduler.state_dict() == full.lr_scheduler.state_dict()


def test_run_name_and_no_final_checkpoint(tmp_path, capsys):
    optim = {"lr_decay": "cosine", "warmup_iters": 0}
    trainer = make_trainer(tmp_path, max_iters=2, name="pi-ID toy", final_checkpoint=False, optim=optim)
    assert trainer.train()["iteration"] == 2
    assert "pi-ID toy training: iterations 0 -> 2" in capsys.readouterr().out
    assert not (tmp_path / "checkpoints").exists()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # cosine to lr_min_ratio 0 at max_iters


def test_evaluation_sampler_is_built_from_the_piid_config():
    from piflow_kernels.distill.evaluation import scheduler_for
    from piflow_kernels.distill.piid import PiIDConfig

    cfg = PiIDConfig(nfe=3, policy_type="DX", total_substeps=40, shift=2.5, final_step_size_scale=0.5, dx_mode="polynomial")
    sched = scheduler_for(cfg, temperature=0.9)
    c = sched.config
    assert (c.shift, c.total_substeps, c.final_step_size_scale, c.policy_type, c.temperature) == (2.5, 40, 0.5, "DX", 0.9)
    assert (c.dx_segment_size, c.dx_shift, c.dx_mode) == (cfg.base_segment_size, 2.5, "polynomial")
    assert c.num_train_timesteps == 1000 and isinstance(c.num_train_timesteps, int)
    with pytest.raises(ValueError, match="integer num_train_timesteps"):
        scheduler_for(PiIDConfig(num_train_timesteps=999.5))


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.resume() is False and trainer.iteration == 0


HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


def record_host_reads(monkeypatch) -> list[tuple[str, str, int]]:
    """Patch the tensor -> Python conversions to record (function, file, line) of every call made from the
    distill package (on a GPU each one would wait for the device). Reads made by the policies' own CPU-only
    checks are not the trainer's and are not recorded."""
    distill_dir = Path(piflow_kernels.distill.__file__).parent
    reads = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if Path(caller.co_filename).parent == distill_dir:
                reads.append((caller.co_name, Path(caller.co_filename).name, sys._getframe(1).f_lineno))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in HOST_READS:
        spy(name)
    return reads


@pytest.mark.parametrize("changes", [c[1] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_training_reads_the_device_only_to_log(tmp_path, monkeypatch, changes):
    """Steps keep losses and norms as tensors: the only reads are the log windows' (one per log line)."""
    changes = {"piid": {}, **changes}
    changes["piid"] = {**changes["piid"], "window_substeps": 2, "num_decay_iters": 3}  # mean-velocity rollouts too
    trainer = make_trainer(tmp_path, max_iters=4, log_every=2, **changes)
    reads = record_host_reads(monkeypatch)
    logs = trainer.train_step()
    assert reads == [] and isinstance(logs["loss"], torch.Tensor) and isinstance(logs["grad_norm"], torch.Tensor)
    trainer.train()
    assert [(fn, file) for fn, file, _ in reads] == [("reduce", "run_log.py")] * 2, reads


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_layout_and_weights_only_load(tmp_path):
    trainer = make_trainer(tmp_path, max_iters=3, ckpt_every=1, keep_checkpoints=2)
    trainer.train()
    root = tmp_path / "checkpoints"
    kept = sorted(p.name for p in root.glob("iter_*"))
    assert kept == ["iter_00000002", "iter_00000003"]
    assert (root / "latest").read_text() == "iter_00000003"
    latest = ckpt.latest_checkpoint(root)
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["iteration"] == 3 and "optimizer" in state and "scheduler" in state
    rng = torch.load(latest / "rng_rank0.pt", weights_only=True)
    assert isinstance(rng["torch"], torch.Tensor)
    loaded = ckpt.load_checkpoint(latest)
    for name, value in trainer.student.state_dict().items():
        assert torch.equal(loaded.student[name], value), name
    for name, value in trainer.ema.module.state_dict().items():
        assert torch.equal(loaded.ema[name], value), name
    # a crash mid-write leaves a staging directory behind: it is never picked up
    ckpt.begin_checkpoint(root, 9)
    assert ckpt.latest_checkpoint(root) == latest


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.get_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(path, b"first")
    ckpt.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ---------------------------------------------------------------------------------------------- diffusers


def test_tiny_dit_teacher_with_cfg_trains_data_free(tmp_path):
    """A tiny random DiT teacher with CFG and a build_student GMFlow student: steps run, the student changes."""
    pytest.importorskip("diffusers")
    model = {
        "sample_size": 4, "in_channels": 2, "patch_size": 2, "num_layers": 1,
        "num_attention_heads": 2, "attention_head_dim": 8, "num_embeds_ada_norm": 3,
    }  # fmt: skip
    trainer = make_trainer(
        tmp_path,
        teacher={"kind": "diffusers", "model": model, "guidance_scale": 2.0, "guidance_interval": [0, 600]},
        student={"kind": "diffusers", "kwargs": {"logstd_inner_dim": 16}},
        data={"mode": "data_free", "height": 4, "width": 4, "num_classes": 3, "batch_size": 4},
        eval={"num_samples": 8, "batch_size": 8},
    )
    start = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    logs = [trainer.train_step() for _ in range(2)]
    assert all(math.isfinite(lg["loss"]) and lg["grad_norm"] > 0 for lg in logs)
    assert any(not torch.equal(start[k], v) for k, v in trainer.student.state_dict().items())
    assert trainer.evaluate()["eval/finite"] == 1.0


@pytest.mark.cuda
def test_bf16_autocast_on_cuda(tmp_path):
    trainer = make_trainer(tmp_path, device="cuda")
    assert trainer.use_autocast
    logs = trainer.train_step()
    assert math.isfinite(logs["loss"])
    assert next(trainer.student.parameters()).dtype == torch.float32


def test_grad_accum_may_trade_places_with_the_world_size_on_resume(tmp_path):
    from piflow_kernels.distill.startup import check_resumed_config

    two_ranks = TrainConfig.from_dict(small_config(tmp_path))  # grad_accum 1 (on 2 ranks: 2 micro-batches a step)
    saved = TrainConfig.from_dict(small_config(tmp_path, optim={"grad_accum": 2})).to_dict()  # 1 process, grad_accum 2
    assert check_resumed_config(saved, two_ranks, tmp_path, saved_shards=2, shards=2) == []
    with pytest.raises(ConfigError, match=r"optim\.grad_accum: 2 -> 1"):
        check_resumed_config(saved, two_ranks, tmp_path, saved_shards=2, shards=1)
