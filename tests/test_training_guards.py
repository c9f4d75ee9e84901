"""Training guards: finite config values, non-finite steps skipped on the device, no non-finite checkpoint,
start-up checks (device, an explicit backend), the compile notice, resumed-config changes, missing loggers.

Tiny CPU runs as in test_trainer (one intra-op thread). NaN is injected by wrapping the trainer's loss.
"""

from __future__ import annotations

import json
import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from test_trainer import make_trainer, record_host_reads, small_config, state_of

import piflow_kernels.distill.startup as startup_mod
import piflow_kernels.distill.trainer as trainer_mod
from piflow_kernels.distill import checkpoint as ckpt
from piflow_kernels.distill.config import ConfigError, OptimConfig, TrainConfig, run_changes
from piflow_kernels.distill.ema import EMA
from piflow_kernels.distill.optim import make_adamw, step_where
from piflow_kernels.distill.run_log import RunLog
from piflow_kernels.distill.trainer import NonFiniteError, Trainer, rollout_compile_pending

pytestmark = pytest.mark.usefixtures("one_thread")


def inject_nan(monkeypatch, bad) -> None:
    """Make the pi-ID loss (and so every gradient) NaN at the iterations for which ``bad(iteration)`` holds."""
    real = trainer_mod.piid_loss_data_dependent

    def poisoned(*args, iteration, **kwargs):
        loss, logs = real(*args, iteration=iteration, **kwargs)
        return (loss * math.nan if bad(iteration) else loss), logs

    monkeypatch.setattr(trainer_mod, "piid_loss_data_dependent", poisoned)


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def checkpoints(out_dir) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").glob("iter_*"))


def nonfinite_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "non-finite loss or gradient norm" in str(w.message)]


# ---------------------------------------------------------------------------------------------- config values

NON_FINITE = [
    ("optim.eps", {"optim": {"eps": math.inf}}),
    ("optim.lr", {"optim": {"lr": math.nan}}),
    ("optim.betas", {"optim": {"betas": [0.9, math.inf]}}),
    ("optim.weight_decay", {"optim": {"weight_decay": math.inf}}),
    ("optim.grad_clip", {"optim": {"grad_clip": math.inf}}),
    ("optim.warmup_ratio", {"optim": {"warmup_ratio": math.nan}}),
    ("optim.lr_min_ratio", {"optim": {"lr_min_ratio": -math.inf}}),
    ("ema.gamma", {"ema": {"gamma": math.inf}}),
    ("ema.decay", {"ema": {"decay": math.nan}}),
    ("teacher.std", {"teacher": {"std": math.inf}}),
    ("teacher.mode_scale", {"teacher": {"mode_scale": -math.inf}}),
    ("teacher.guidance_scale", {"teacher": {"guidance_scale": math.inf}}),
    ("teacher.guidance_interval", {"teacher": {"guidance_interval": [0, math.inf]}}),
    ("piid.shift", {"piid": {"shift": math.inf}}),
    ("piid.loss_scale", {"piid": {"loss_scale": math.inf}}),
    ("piid.gm_dropout", {"piid": {"gm_dropout": math.nan}}),
    ("piid.final_step_size_scale", {"piid": {"final_step_size_scale": math.inf}}),
    ("optim.max_nonfinite_steps", {"optim": {"max_nonfinite_steps": -1}}),
    ("tensorboard", {"tensorboard": "yes"}),
    ("device", {"device": "cuda:x"}),
    ("device", {"device": "gpu"}),
]


@pytest.mark.parametrize("key,change", NON_FINITE, ids=[f"{k}-{i}" for i, (k, _) in enumerate(NON_FINITE)])
def test_config_values_must_be_finite_and_in_range_naming_the_key(tmp_path, key, change):
    with pytest.raises(ConfigError, match=f"config key {key.replace('.', '[.]')} "):
        TrainConfig.from_dict(small_config(tmp_path, **change))


def test_a_config_built_in_code_is_checked_alike():
    with pytest.raises(ConfigError, match="config key optim.eps must be a finite number, got inf"):
        TrainConfig(optim=OptimConfig(eps=math.inf))
    cfg = TrainConfig(optim=OptimConfig(lr=np.float32(0.5), grad_accum=np.int64(2)))
    assert type(cfg.optim.lr) is float and type(cfg.optim.grad_accum) is int


def test_numpy_scalars_are_accepted_wherever_numbers_are(tmp_path):
    changes = {
        "seed": np.int64(3),
        "log_every": np.int32(2),
        "optim": {"lr": np.float32(1e-2), "betas": [np.float64(0.9), np.float32(0.5)], "grad_accum": np.int16(1)},
        "ema": {"decay": np.float64(0.5), "gamma": np.float32(3)},
        "data": {"batch_size": np.int64(8)},
        "teacher": {"std": np.float32(0.1), "num_modes": np.uint8(4)},
        "piid": {"nfe": np.int64(2), "shift": np.float32(2.0), "total_substeps": np.int32(16)},
    }
    cfg = TrainConfig.from_dict(small_config(tmp_path, **changes))
    plain = [
        cfg.seed,
        cfg.log_every,
        cfg.optim.lr,
        *cfg.optim.betas,
        cfg.ema.gamma,
        cfg.data.batch_size,
        cfg.piid.nfe,
        cfg.piid.shift,
    ]
    assert all(type(v) in (int, float) for v in plain), [type(v) for v in plain]
    assert (cfg.data.batch_size, cfg.piid.nfe, cfg.optim.betas[1]) == (8, 2, 0.5)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # stored as plain JSON numbers


# ---------------------------------------------------------------------------------------------- the skip, in pieces


def test_step_where_leaves_adamw_untouched_on_a_bad_step_and_steps_like_step_otherwise():
    gen = torch.Generator().manual_seed(0)
    for fused in (True, False):
        params = [torch.randn(4, 3, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
        ref = [p.detach().clone().requires_grad_() for p in params]
        opt = make_adamw(params, lr=0.1, weight_decay=0.1) if fused else torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
        opt_ref = torch.optim.AdamW(ref, lr=0.1, weight_decay=0.1, fused=fused or None)
        assert bool(opt.defaults.get("fused")) == fused
        for step, good in enumerate([True, False, False, True, True]):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            for p, q, g in zip(params, ref, grads):
                p.grad = g.clone() if good else torch.full_like(g, math.nan)
                q.grad = g.clone()
            before = [p.detach().clone() for p in params]
            decided = step_where(opt, torch.tensor(good))
            assert isinstance(decided, torch.Tensor) == fused  # fused: decided on the device, never read here
            if good:
                opt_ref.step()
            else:
                assert all(torch.equal(p, b) for p, b in zip(params, before)), step
            for p, q in zip(params, ref):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            steps = {float(st["step"]) for st in opt.state.values()}
            assert steps == {float(st["step"]) for st in opt_ref.state.values()}, (step, steps)
        assert not hasattr(opt, "found_inf")


def test_ema_update_with_a_false_device_flag_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    for start_iter in (0, 5):  # a lerp after start_iter, a copy before
        ema = EMA(model, decay=0.75, start_iter=start_iter)
        with torch.no_grad():
            model.weight.add_(1.0)
        before = {k: v.clone() for k, v in ema.module.state_dict().items()}
        ema.update(model, 1, ok=torch.tensor(False))
        assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())
        ema.update(model, 1, ok=False)
        assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())
        gated, plain = EMA(model, 0.75, start_iter), EMA(model, 0.75, start_iter)
        gated.module.load_state_dict(before)
        plain.module.load_state_dict(before)
        gated.update(model, 1, ok=torch.tensor(True))
        plain.update(model, 1)
        assert all(torch.equal(plain.module.state_dict()[k], v) for k, v in gated.module.state_dict().items())


@pytest.mark.cuda
def test_the_device_skip_does_not_sync_on_cuda():
    """Fused AdamW's skip flag and the gated EMA update on CUDA: no host sync (sync debug mode raises on one); a bad
    step leaves parameters, moments, step counts and the EMA bit for bit, a good one moves them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).cuda()
    params = list(model.parameters())
    opt = make_adamw(params, lr=0.1, weight_decay=0.1)
    assert opt.defaults["fused"]
    ema = EMA(model, decay=0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the moments exist

    def snapshot() -> list[torch.Tensor]:
        state = [v for st in opt.state.values() for v in st.values()]
        return [t.detach().clone() for t in (*params, *state, *ema.module.parameters())]

    snapshots = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for good in (False, True):
            for p in params:
                p.grad = torch.randn_like(p) if good else torch.full_like(p, math.nan)
            ok = torch.isfinite(torch.nn.utils.clip_grad_norm_(params, math.inf))
            before = snapshot()
            decided = step_where(opt, ok)
            ema.update(model, 1, ok=decided)
            snapshots.append((before, snapshot()))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    (bad_before, bad_after), (good_before, good_after) = snapshots
    assert all(torch.equal(a, b) for a, b in zip(bad_before, bad_after))
    assert all(not torch.equal(a, b) for a, b in zip(good_before[: len(params)], good_after[: len(params)]))


# ---------------------------------------------------------------------------------------------- the skip, in training


def test_nonfinite_steps_change_nothing_but_the_counters(tmp_path, monkeypatch):
    """Steps 1 and 2 have a NaN loss: weights, AdamW state (step count included) and EMA stay bit for bit; the
    iteration and the LR schedule advance; step 3 trains again."""
    inject_nan(monkeypatch, lambda it: it in (1, 2))
    trainer = make_trainer(tmp_path, max_iters=4, optim={"warmup_iters": 4, "lr": 1e-2})
    trainer.train_step()
    after_first = state_of(trainer)
    lrs = []
    for _ in range(2):
        lrs.append(trainer.train_step()["lr"])
        now = state_of(trainer)
        assert now.keys() == after_first.keys()
        for name, value in after_first.items():
            assert torch.equal(value, now[name]), name
    assert trainer.iteration == 3 and lrs[0] < lrs[1] < trainer.optimizer.param_groups[0]["lr"]
    logs = trainer.train_step()
    assert math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"])
    moved = state_of(trainer)
    assert any(not torch.equal(moved[k], v) for k, v in after_first.items() if k.startswith("student."))
    assert all(torch.isfinite(v).all() for v in moved.values())
    counts = {k: int(v) for k, v in trainer.health.counters.items()}
    assert counts == {"run": 0, "longest": 2, "total": 2}


def test_skipped_steps_warn_and_the_run_goes_on(tmp_path, monkeypatch):
    inject_nan(monkeypatch, lambda it: it in (2, 3))  # the steps that end at iterations 3 and 4
    trainer = make_trainer(tmp_path, max_iters=6, log_every=1, optim={"max_nonfinite_steps": 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = trainer.train()
    messages = nonfinite_warnings(caught)
    assert len(messages) == 2 and "2 in a row now" in messages[1], messages
    skipped = {r["iteration"]: r["skipped_steps"] for r in records(tmp_path) if "skipped_steps" in r}
    assert skipped == {3: 1, 4: 1}
    assert record["iteration"] == 6 and math.isfinite(record["loss"])
    assert checkpoints(tmp_path) == ["iter_00000006"]
    assert all(torch.isfinite(v).all() for v in ckpt.load_checkpoint(tmp_path / "checkpoints" / "iter_00000006").student.values())


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_without_saving(tmp_path, monkeypatch):
    """NaN from step 3 on, max_nonfinite_steps = 2, a checkpoint every step, a log line every 10: the check before
    the checkpoint at iteration 5 sees two in a row and stops; iteration 4's checkpoint (one skipped step, finite
    weights) is the latest."""
    inject_nan(monkeypatch, lambda it: it >= 3)
    trainer = make_trainer(
        tmp_path, max_iters=10, log_every=10, ckpt_every=1, keep_checkpoints=10, optim={"max_nonfinite_steps": 2}
    )
    with warnings.catch_warnings(record=True) as caught, pytest.raises(NonFiniteError) as info:
        warnings.simplefilter("always")
        trainer.train()
    message = str(info.value)
    assert "stopped at iteration 5" in message and "2 steps in a row" in message and "max_nonfinite_steps = 2" in message
    assert "Nothing was saved" in message
    assert checkpoints(tmp_path) == [f"iter_{i:08d}" for i in range(1, 5)]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_00000004"
    assert len(nonfinite_warnings(caught)) == 2  # at the checkpoints of iterations 4 and 5
    assert [r["iteration"] for r in records(tmp_path) if "loss" in r][-1] == 5  # the stopping window is logged


def test_the_stop_is_read_at_log_lines_only_so_it_may_come_late(tmp_path, monkeypatch):
    inject_nan(monkeypatch, lambda it: it >= 1)
    trainer = make_trainer(tmp_path, max_iters=20, log_every=4, final_checkpoint=False, optim={"max_nonfinite_steps": 2})
    with pytest.warns(RuntimeWarning, match="non-finite"), pytest.raises(NonFiniteError, match="stopped at iteration 4: 3 steps"):
        trainer.train()
    assert trainer.iteration == 4  # the limit was reached at iteration 3, the next log line is at 4


def test_zero_max_nonfinite_steps_never_stops(tmp_path, monkeypatch):
    inject_nan(monkeypatch, lambda it: it >= 1)
    trainer = make_trainer(tmp_path, max_iters=4, log_every=2, final_checkpoint=False, optim={"max_nonfinite_steps": 0})
    with pytest.warns(RuntimeWarning, match="0: never"):
        assert trainer.train()["skipped_steps"] == 2


def test_a_resume_from_nan_weights_refuses_to_save(tmp_path, monkeypatch):
    """A complete, intact checkpoint whose student weights hold a NaN (as an unguarded trainer wrote them). On the
    CPU the policies' data checks stop the first step (non-finite means); with them off, as on a GPU, the steps
    are skipped and the checkpoint is refused."""
    damaged = make_trainer(tmp_path, max_iters=2)
    damaged.train()
    name, weight = next(iter(damaged.student.named_parameters()))
    with torch.no_grad():
        weight.view(-1)[0] = math.nan
    ckpt.save_training_checkpoint(tmp_path / "checkpoints", 2, damaged._training_state(), damaged.ctx)  # unguarded
    damaged.close()

    trainer = make_trainer(tmp_path, max_iters=3)
    with pytest.warns(RuntimeWarning, match=f"damaged: 1 weight tensor.*student.{name}"):
        assert trainer.resume()
    with pytest.raises(NonFiniteError, match=f"refusing to save a checkpoint at iteration 2: .*student.{name}"):
        trainer.save_checkpoint()
    with pytest.raises(ValueError, match="means must be finite"):
        trainer.train()
    monkeypatch.setenv("PIFLOW_VALIDATE", "0")
    with pytest.warns(RuntimeWarning, match="non-finite"), pytest.raises(NonFiniteError, match="refusing to save"):
        trainer.train()
    assert trainer.iteration == 3
    assert checkpoints(tmp_path) == ["iter_00000002"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_00000002"


def test_training_reads_the_device_only_at_log_lines_and_checkpoints(tmp_path, monkeypatch):
    """With skipped steps in the run, the guards add no host read: the counters and, before a checkpoint, the
    weights' check travel with the log window's one transfer (log lines at 3 and 6, checkpoints at 2, 4, 6)."""
    inject_nan(monkeypatch, lambda it: it in (1, 4))
    trainer = make_trainer(tmp_path, max_iters=6, log_every=3, ckpt_every=2)
    reads = record_host_reads(monkeypatch)
    at = []
    real_reduce = trainer_mod.MetricsWindow.reduce

    def reduce(self, ctx, iteration, latest=None):
        at.append((iteration, sorted(latest)))
        return real_reduce(self, ctx, iteration, latest)

    monkeypatch.setattr(trainer_mod.MetricsWindow, "reduce", reduce)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        trainer.train()
    assert [(fn, file) for fn, file, _ in reads] == [("reduce", "run_log.py")] * 4, reads
    assert [it for it, _ in at] == [2, 3, 4, 6]
    assert ["nonfinite_weights" in keys for _, keys in at] == [True, False, True, True]
    assert checkpoints(tmp_path) == ["iter_00000004", "iter_00000006"]


# ---------------------------------------------------------------------------------------------- start-up checks


def _no_models(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("built a model or a process group before checking the device and the backend")

    monkeypatch.setattr(trainer_mod, "init_distributed", never)
    monkeypatch.setattr(trainer_mod, "build_teacher", never)
    monkeypatch.setattr(trainer_mod, "build_training_student", never)


# ids not "cuda": conftest skips every test with a "cuda" keyword when there is no GPU
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"], ids=["plain", "index0", "index1"])
def test_cuda_without_cuda_fails_naming_device_before_anything_is_built(tmp_path, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = TrainConfig.from_dict(small_config(tmp_path, device=device))
    _no_models(monkeypatch)
    with pytest.raises(ConfigError, match=f"config key device = '{device}', but CUDA is not available"):
        Trainer(cfg)


def test_a_gpu_index_beyond_the_visible_ones_fails_naming_device(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = TrainConfig.from_dict(small_config(tmp_path, device="cuda:2"))
    _no_models(monkeypatch)
    with pytest.raises(ConfigError, match="device = 'cuda:2' means GPU 2, but 2 GPU"):
        Trainer(cfg)


def test_cli_device_cuda_without_cuda_is_a_clean_error(tmp_path, monkeypatch, capsys):
    from piflow_kernels.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_models(monkeypatch)
    args = ["distill", "examples/distill_exact_teacher.toml", "--out", str(tmp_path), "--device", "cuda", "--no-progress"]
    assert main(args) == 2
    assert "config key device = 'cuda'" in capsys.readouterr().err


def test_an_explicit_triton_backend_that_cannot_run_fails_up_front(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from piflow_kernels.ops import dispatch
    from piflow_kernels.ops.gm import triton_common

    cfg = TrainConfig.from_dict(small_config(tmp_path, piid={"backend": "triton"}))
    _no_models(monkeypatch)
    monkeypatch.setattr(triton_common, "INTERPRET", False)  # CPU tensors, no interpreter
    with pytest.raises(ConfigError, match="config key piid.backend = 'triton' cannot run .* on cpu: .*TRITON_INTERPRET=1"):
        Trainer(cfg)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(ConfigError, match="config key piid.backend = 'triton' needs the triton package"):
        Trainer(cfg)
    big = TrainConfig.from_dict(small_config(tmp_path, piid={"backend": "triton"}, student={"num_components": 65}))
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(triton_common, "INTERPRET", True)
    with pytest.raises(ConfigError, match="piid.backend = 'triton' .*K=65"):
        Trainer(big)


def test_the_automatic_backend_is_not_refused(tmp_path, monkeypatch):
    from piflow_kernels.ops import dispatch

    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    trainer = make_trainer(tmp_path, max_iters=1)
    assert trainer.cfg.piid.backend is None and math.isfinite(trainer.train_step()["loss"])


# ---------------------------------------------------------------------------------------------- compile notice


def test_the_compile_notice_is_logged_once_when_the_substep_will_compile(tmp_path, monkeypatch, capsys):
    # the trainer's view: no native loop, compilation on and not yet done (the rollouts themselves keep the real
    # dispatch, so nothing compiles for 30 s here)
    monkeypatch.setattr(startup_mod, "gm_native", types.SimpleNamespace(available=lambda: False))
    monkeypatch.setattr(
        startup_mod, "gm_twin", types.SimpleNamespace(compile_enabled=lambda: True, last_compile_seconds=lambda: None)
    )
    monkeypatch.setattr(trainer_mod, "_NOTICED", set())
    cfg = TrainConfig.from_dict(small_config(tmp_path, max_iters=2))
    assert rollout_compile_pending(cfg, torch.device("cpu"))
    assert not rollout_compile_pending(cfg.replace(piid={"policy_type": "DX"}), torch.device("cpu"))
    assert not rollout_compile_pending(cfg.replace(piid={"backend": "reference"}), torch.device("cpu"))
    trainer = Trainer(cfg)
    trainer.train()
    trainer.evaluate()
    Trainer(cfg.replace(max_iters=3)).train()
    out = capsys.readouterr().out
    assert out.count("compiling the GM rollout substep") == 1, out
    assert out.index("compiling the GM rollout substep") < out.index("it 2/2")
    assert [r["event"] for r in records(tmp_path) if r.get("event") == "compile"] == ["compile"]


def test_no_compile_notice_with_the_native_loop_or_compilation_off(tmp_path, monkeypatch):
    cfg = TrainConfig.from_dict(small_config(tmp_path))
    monkeypatch.setattr(startup_mod, "gm_native", types.SimpleNamespace(available=lambda: True))
    assert not rollout_compile_pending(cfg, torch.device("cpu"))
    monkeypatch.setattr(startup_mod, "gm_native", types.SimpleNamespace(available=lambda: False))
    monkeypatch.setenv("PIFLOW_COMPILE", "0")
    assert not rollout_compile_pending(cfg, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- resumed configs


def test_a_resumed_config_that_changes_the_run_is_refused_listing_the_keys(tmp_path):
    make_trainer(tmp_path, max_iters=2).train()
    changed = make_trainer(tmp_path, max_iters=4, data={"batch_size": 8}, optim={"lr": 2e-2})
    with pytest.raises(ConfigError) as info:
        changed.resume()
    message = str(info.value)
    assert "data.batch_size: 16 -> 8" in message and "optim.lr: 0.01 -> 0.02" in message and "--force-resume" in message
    assert "seed" not in message.split("may change freely")[0]

    forced = make_trainer(tmp_path, max_iters=3, data={"batch_size": 8}, allow_config_change=True)
    with pytest.warns(UserWarning, match="data.batch_size: 16 -> 8"):
        assert forced.resume() and forced.iteration == 2
    assert forced.train()["iteration"] == 3
    assert any(r.get("event") == "config_change" and r["keys"] == ["data.batch_size"] for r in records(tmp_path))


def test_keys_that_do_not_change_the_run_may_change_on_resume(tmp_path):
    make_trainer(tmp_path, max_iters=2).train()
    trainer = make_trainer(
        tmp_path, max_iters=5, log_every=1, ckpt_every=3, keep_checkpoints=3, name="renamed", eval={"num_samples": 16},
        optim={"max_nonfinite_steps": 1}, piid={"backend": "torch"},
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.resume() and trainer.iteration == 2


def test_run_changes_compares_tables_whole_and_skips_unknown_keys():
    saved = TrainConfig().to_dict()
    current = TrainConfig.from_dict({"teacher": {"model": {"num_layers": 2}}, "seed": 1, "max_iters": 7}).to_dict()
    saved.pop("allow_config_change")  # a checkpoint from before the key existed
    saved["retired_key"] = 3
    assert run_changes(saved, current) == [("seed", 0, 1), ("teacher.model", {}, {"num_layers": 2})]


def test_a_checkpoint_from_before_substep_rule_resumes_as_round(tmp_path):
    """A saved config without piid.substep_rule was made when every rollout rounded: resuming it with the new
    default (ceil) is a run change, refused by name; with substep_rule = "round" it resumes."""
    from piflow_kernels.distill.startup import check_resumed_config

    saved = TrainConfig().to_dict()
    saved["piid"].pop("substep_rule")
    with pytest.raises(ConfigError, match=r"piid.substep_rule: 'round' -> 'ceil'"):
        check_resumed_config(saved, TrainConfig(), tmp_path)
    assert check_resumed_config(saved, TrainConfig.from_dict({"piid": {"substep_rule": "round"}}), tmp_path) == []


def test_cli_force_resume_sets_allow_config_change(tmp_path, capsys):
    from piflow_kernels.cli import build_parser, main

    assert build_parser().parse_args(["distill", "c.toml", "--force-resume"]).force_resume
    config = tmp_path / "c.json"
    config.write_text(json.dumps(small_config(tmp_path / "run", max_iters=1)))
    assert main(["distill", str(config)]) == 0
    config.write_text(json.dumps(small_config(tmp_path / "run", max_iters=2, seed=4)))
    try:  # the refusal is a ConfigError: printed as "error: ..." (exit 2) where the command line reports it
        code, message = main(["distill", str(config), "--resume"]), capsys.readouterr().err
    except ConfigError as err:
        code, message = 2, str(err)
    assert code == 2 and "seed: 3 -> 4" in message
    with pytest.warns(UserWarning, match="seed: 3 -> 4"):
        assert main(["distill", str(config), "--resume", "--force-resume"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "iter_00000002"


# ---------------------------------------------------------------------------------------------- optional loggers


def test_tensorboard_asked_for_but_missing_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RunLog(tmp_path / "auto", True, "auto").close()
        RunLog(tmp_path / "off", True, False).close()
    assert [str(w.message) for w in caught] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path / "on", max_iters=3, log_every=1, tensorboard=True)
        trainer.train()
        trainer.evaluate()
        trainer.close()
    messages = [str(w.message) for w in caught if "tensorboard" in str(w.message).lower()]
    assert len(messages) == 1 and "tensorboard = true" in messages[0] and "tensorboard package" in messages[0], messages
    assert TrainConfig().tensorboard == "auto"
