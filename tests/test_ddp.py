"""Data-parallel training: 2 CPU processes (torchrun, gloo) against one process on the same global batch.

One torchrun launch runs three trainers in the worker: DDP data-dependent, DDP data-free (several
backward passes per step) and FSDP2 (``fully_shard``, which runs on CPU with gloo). Each computes
the gradient of step 0, takes two optimizer steps, checkpoints, and checks that a second trainer
resumed from that checkpoint takes the same next step bit for bit; rank 0 saves everything.
In-process single trainers with ``grad_accum = 2`` see the same two shards and must agree.

A second launch does the same for a LoRA FLUX.1 student tied to its teacher (data-free, a prompt cache; DDP and
FSDP2 with the FLUX blocks sharded), with the tied teacher's output compared bit for bit and checkpoints crossing
between FSDP2 and one process in both directions.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from piflow_kernels.distill.config import TrainConfig
from piflow_kernels.distill.ddp import DistContext, fully_shard_fn, grad_sync, init_distributed
from piflow_kernels.distill.trainer import Trainer

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from piflow_kernels.distill.config import TrainConfig
    from piflow_kernels.distill.trainer import Trainer

    torch.set_num_threads(1)
    run = json.load(open(sys.argv[1]))
    out_dir = sys.argv[2]
    dist.init_process_group("gloo")

    def full(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    def trained(module, names):
        return {n: full(p) for n, p in module.named_parameters() if n in names}

    def teacher_probe(trainer):
        # the teacher on this rank's micro-batch of step 0, every rank's output stacked in rank order
        _, x, cond = trainer._micro_batch(trainer.ctx.rank, 0)
        with torch.no_grad():
            out = trainer.teacher(x, torch.linspace(50.0, 950.0, x.shape[0]), **cond).contiguous()
        parts = [torch.empty_like(out) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, out)
        return torch.stack(parts)

    for name, cfg in run["configs"].items():
        extra = run["extras"].get(name, {})
        trainer = Trainer(TrainConfig.from_dict(cfg))
        assert trainer.ctx.world_size == 2 and trainer.ctx.mode == cfg["distributed"]["mode"]
        names = [n for n, p in trainer.student.named_parameters() if p.requires_grad]  # one order on every rank
        res = {"wrapped": type(trainer.model).__name__}
        if extra.get("teacher"):
            res["teacher"] = teacher_probe(trainer)
        logs = trainer.accumulate_gradients()
        params = dict(trainer.student.named_parameters())
        res["grads"] = {n: full(params[n].grad) for n in names}  # full_tensor is collective
        res["frozen_with_grad"] = [n for n, p in params.items() if n not in names and p.grad is not None]
        res["loss"] = trainer.ctx.all_reduce_mean(logs["loss"])
        trainer.train_step()
        trainer.train_step()
        res["params"], res["ema"] = trained(trainer.student, names), trained(trainer.ema.module, names)
        if extra.get("teacher"):
            res["teacher_trained"] = teacher_probe(trainer)  # the adapters and the head moved, the teacher must not
        trainer.save_checkpoint()
        # resume in a second trainer: one more step on both must agree bit for bit
        again = Trainer(TrainConfig.from_dict(cfg))
        resumed = again.resume()
        trainer.train_step()
        again.train_step()
        res["params3"] = trained(trainer.student, names)
        pairs = [(full(a), full(b)) for a, b in zip(trainer.student.parameters(), again.student.parameters())]
        pairs += [(full(a), full(b)) for a, b in zip(trainer.ema.module.parameters(), again.ema.module.parameters())]
        res["resumed"] = resumed and all(torch.equal(a, b) for a, b in pairs)
        res["resume_max_diff"] = max(float((a - b).abs().max()) for a, b in pairs)
        if "load_from" in extra:  # a checkpoint written by one process, resumed here
            other = Trainer(TrainConfig.from_dict({**cfg, "out_dir": cfg["out_dir"] + "-loaded", "allow_config_change": True}))
            assert other.resume(extra["load_from"])
            res["loaded"], res["loaded_ema"] = trained(other.student, names), trained(other.ema.module, names)
            other.train_step()
            res["loaded_step"] = trained(other.student, names)
            other.close()
        if dist.get_rank() == 0:
            torch.save(res, f"{out_dir}/{name}.pt")
        trainer.close()
        again.close()
    dist.barrier()
    dist.destroy_process_group()
    """
)


pytestmark = pytest.mark.usefixtures("eager_cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(out_dir, mode: str, data_mode: str, grad_accum: int) -> dict:
    return {
        "seed": 11,
        "max_iters": 2,
        "out_dir": str(out_dir),
        "log_every": 0,
        "progress": False,
        "tensorboard": False,
        "teacher": {"kind": "exact", "num_modes": 3, "std": 0.2, "seed": 2},
        "student": {"kind": "toy", "num_components": 3, "hidden": 24},
        "data": {"mode": data_mode, "batch_size": 6, "channels": 2, "height": 3, "width": 5},
        "optim": {"lr": 1e-3, "grad_clip": 10.0, "grad_accum": grad_accum},
        "ema": {"decay": 0.5},
        "piid": {"nfe": 2, "total_substeps": 16, "gm_dropout": 0.1, "num_decay_iters": 4},
        "distributed": {"mode": mode},
    }


CASES = {
    "ddp-data_dependent": ("ddp", "data_dependent"),
    "ddp-data_free": ("ddp", "data_free"),
    "fsdp-data_dependent": ("fsdp", "data_dependent"),
}


def _launch(tmp, configs: dict, extras: dict | None = None) -> dict:
    """Run the worker on 2 gloo ranks under torchrun; returns {case: what rank 0 saved}."""
    (tmp / "run.json").write_text(json.dumps({"configs": configs, "extras": extras or {}}))
    (tmp / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIFLOW_COMPILE": "0"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(tmp / "worker.py"), str(tmp / "run.json"), str(tmp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {name: torch.load(tmp / f"{name}.pt", weights_only=True) for name in configs}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Launch the worker once on 2 gloo ranks; returns {case: saved results}."""
    if fully_shard_fn() is None:
        pytest.skip("this PyTorch has no FSDP2 fully_shard")
    tmp = tmp_path_factory.mktemp("ddp")
    configs = {name: _config(tmp / name, mode, data_mode, grad_accum=1) for name, (mode, data_mode) in CASES.items()}
    return _launch(tmp, configs), tmp


def _single(tmp_path, mode_data: str) -> tuple[dict, dict, dict, float]:
    """One process, grad_accum = 2: the two shards of the 2-rank run, in order."""
    trainer = Trainer(TrainConfig.from_dict(_config(tmp_path, "none", mode_data, grad_accum=2)))
    logs = trainer.accumulate_gradients()
    grads = {n: p.grad.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.train_step()
    trainer.train_step()
    params = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    ema = {n: p.detach().clone() for n, p in trainer.ema.module.named_parameters()}
    return grads, params, ema, logs["loss"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_process_on_the_same_global_batch(two_process_run, tmp_path, case):
    results, _ = two_process_run
    got = results[case]
    mode, data_mode = CASES[case]
    assert got["wrapped"] == ("DistributedDataParallel" if mode == "ddp" else "FSDPToyGMStudent")
    grads, params, ema, loss = _single(tmp_path, data_mode)
    assert float(got["loss"]) == pytest.approx(float(loss), rel=1e-6)  # floats: pytest 9.2 approx refuses 0-d tensors
    assert grads.keys() == got["grads"].keys()
    worst = max(_rel(got["grads"][n], g) for n, g in grads.items())
    assert worst < 1e-5, worst  # measured 0 (data-dependent) and 9e-8 (data-free): reduction order only
    assert any(float(g.abs().max()) > 0 for g in grads.values())
    for name, value in params.items():
        torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in ema.items():
        torch.testing.assert_close(got["ema"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_distributed_resume_is_bit_exact(two_process_run, case):
    results, _ = two_process_run
    assert results[case]["resumed"] is True


def test_distributed_checkpoint_has_full_weights_and_every_rank_rng(two_process_run):
    from piflow_kernels.distill.checkpoint import latest_checkpoint, load_checkpoint

    results, tmp = two_process_run
    for case in CASES:
        path = latest_checkpoint(tmp / case / "checkpoints")
        assert path is not None and path.name == "iter_00000002", case
        assert (path / "rng_rank0.pt").is_file() and (path / "rng_rank1.pt").is_file()
        loaded = load_checkpoint(path, rank=1)
        for name, value in results[case]["params"].items():
            assert torch.equal(loaded.student[name], value), (case, name)
        assert loaded.state["world_size"] == 2 and loaded.state["num_shards"] == 2


def test_single_process_context_and_grad_sync_are_no_ops():
    from piflow_kernels.distill.config import DistributedConfig

    ctx = init_distributed(DistributedConfig(), "cpu")
    assert ctx == DistContext(device=torch.device("cpu")) and not ctx.distributed
    model = torch.nn.Linear(2, 2)
    with grad_sync(model, ctx, enabled=False):
        model(torch.randn(3, 2)).sum().backward()
    assert model.weight.grad is not None
    assert ctx.all_reduce_mean(2.5) == 2.5


def test_mode_none_under_torchrun_is_an_error(monkeypatch):
    from piflow_kernels.distill.config import DistributedConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="distributed.mode = 'none'"):
        init_distributed(DistributedConfig(mode="none"), "cpu")


def _one_process_group(monkeypatch) -> None:
    """The environment torchrun would give a 1-process job (init_distributed then makes a gloo group)."""
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))


def test_fsdp_modules_must_exist(tmp_path, monkeypatch):
    """FSDP2 on one gloo process: an fsdp_modules class the student lacks is named in the error."""
    if fully_shard_fn() is None:
        pytest.skip("this PyTorch has no FSDP2 fully_shard")
    import torch.distributed as dist

    cfg = _config(tmp_path, "fsdp", "data_dependent", 1)
    cfg["distributed"]["fsdp_modules"] = ["NoSuchBlock"]
    _one_process_group(monkeypatch)
    try:
        with pytest.raises(ValueError, match="NoSuchBlock"):
            Trainer(TrainConfig.from_dict(cfg))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fsdp_shards_dit_blocks_and_matches_plain_training(tmp_path, monkeypatch):
    """FSDP2 on one gloo process with each DiT block sharded: same gradients and checkpoint as no wrapping."""
    pytest.importorskip("diffusers")
    if fully_shard_fn() is None:
        pytest.skip("this PyTorch has no FSDP2 fully_shard")
    import torch.distributed as dist

    model = {
        "sample_size": 4, "in_channels": 2, "patch_size": 2, "num_layers": 2,
        "num_attention_heads": 2, "attention_head_dim": 8, "num_embeds_ada_norm": 3,
    }  # fmt: skip

    def cfg(mode, out):
        c = _config(out, mode, "data_dependent", 1)
        c["teacher"] = {"kind": "diffusers", "model": model}
        c["student"] = {"kind": "diffusers", "num_components": 2, "kwargs": {"logstd_inner_dim": 8}}
        c["data"].update({"height": 4, "width": 4, "num_classes": 3})
        c["distributed"]["fsdp_modules"] = ["BasicTransformerBlock"]
        c["distributed"]["fsdp_reshard_after_forward"] = False  # DiT reads block 0's embedding after the blocks
        return TrainConfig.from_dict(c)

    plain = Trainer(cfg("none", tmp_path / "plain"))
    plain.accumulate_gradients()
    expected = {n: p.grad.clone() for n, p in plain.student.named_parameters()}
    _one_process_group(monkeypatch)
    try:
        sharded = Trainer(cfg("fsdp", tmp_path / "fsdp"))
        blocks = [m for m in sharded.student.modules() if type(m).__name__.startswith("FSDPBasicTransformerBlock")]
        assert len(blocks) == 2
        assert plain.optimizer.defaults["fused"] and not sharded.optimizer.defaults["fused"]  # DTensor params: foreach
        sharded.accumulate_gradients()
        for name, p in sharded.student.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), expected[name], rtol=1e-5, atol=1e-7, msg=name)
        path = sharded.save_checkpoint()
        from piflow_kernels.distill.checkpoint import load_checkpoint

        saved = load_checkpoint(path).student
        for name, value in plain.student.state_dict().items():
            assert torch.equal(saved[name], value), name
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fsdp_forwards_without_a_backward_leave_the_shards_in_place(tmp_path, monkeypatch):
    """FSDP2's root keeps its parameters gathered after a forward, for the backward that usually follows. After a
    forward without one (an evaluation, the pi-ID loss of a module, the tied teacher) the EMA update must still
    write into the shards, and a checkpoint must still read them: the weights of training without wrapping."""
    if fully_shard_fn() is None:
        pytest.skip("this PyTorch has no FSDP2 fully_shard")
    import torch.distributed as dist

    from piflow_kernels.distill.checkpoint import load_checkpoint

    def cfg(mode, out):
        c = _config(out, mode, "data_dependent", 1)
        c["eval"] = {"num_samples": 4, "batch_size": 4}
        return TrainConfig.from_dict(c)

    plain = Trainer(cfg("none", tmp_path / "plain"))
    for _ in range(3):
        plain.train_step()
    _one_process_group(monkeypatch)
    try:
        sharded = Trainer(cfg("fsdp", tmp_path / "fsdp"))
        sharded.train_step()
        sharded.evaluate()  # the EMA copy's forward (the next EMA update met its gathered tensors: a DTensor error)
        sharded.train_step()
        sharded.imitation_loss(sharded.student)  # the student's forward
        sharded.train_step()
        path = sharded.save_checkpoint()  # (the student's gathered tensors are not the optimizer's: a KeyError)
        saved = load_checkpoint(path)
        pairs = {"student": (sharded.student, plain.student), "ema": (sharded.ema.module, plain.ema.module)}
        for kind, (module, expected) in pairs.items():
            want = dict(expected.named_parameters())
            for name, p in module.named_parameters():
                assert hasattr(p, "full_tensor"), (kind, name)  # the shards are in place again
                torch.testing.assert_close(p.full_tensor(), want[name], rtol=1e-5, atol=1e-7, msg=f"{kind}.{name}")
                assert torch.equal(getattr(saved, kind)[name], p.full_tensor()), (kind, name)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- LoRA students with a tied teacher

LORA_CASES = {"lora-ddp": "ddp", "lora-fsdp": "fsdp"}
FLUX_BLOCKS = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]


def _lora_config(out_dir, flux, cache, mode: str, grad_accum: int) -> dict:
    """A tiny data-free LoRA FLUX.1 student tied to its teacher, conditioned from a prompt cache (test_text_distill)."""
    from test_text_distill import text_config

    cfg = text_config(out_dir, flux, cache, max_iters=2, save_student=False, distributed={"mode": mode},
                      optim={"grad_accum": grad_accum, "grad_clip": 10.0})  # fmt: skip
    if mode == "fsdp":
        cfg["distributed"]["fsdp_modules"] = FLUX_BLOCKS
    return cfg


def _trained(module, names) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if n in names}


def _teacher_probe(trainer) -> torch.Tensor:
    """The teacher on the micro-batches of shards 0 and 1 of step 0, stacked (what the worker's ranks compute)."""
    outs = []
    for shard in range(2):
        _, x, cond = trainer._micro_batch(shard, 0)
        with torch.no_grad():  # as pi-ID queries it
            outs.append(trainer.teacher(x, torch.linspace(50.0, 950.0, x.shape[0]), **cond))
    return torch.stack(outs)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, one_thread_per_module):
    """One process (grad_accum = 2) and 2 gloo ranks (DDP, FSDP2) distilling the same tied LoRA FLUX.1 student.

    The single process checkpoints step 2, which the FSDP2 run resumes in a third trainer (the other direction, an
    FSDP2 checkpoint resumed in one process, is a test below). Returns (single-process results, {case: worker
    results}, tmp).
    """
    for module in ("diffusers", "transformers", "peft"):
        pytest.importorskip(module)
    if fully_shard_fn() is None:
        pytest.skip("this PyTorch has no FSDP2 fully_shard")
    from test_prompt_cache import encode, save_flux

    tmp = tmp_path_factory.mktemp("lora")
    flux = save_flux(tmp / "flux", seed=4)
    cache = encode(flux, tmp / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIFLOW_COMPILE", "0")
        single = Trainer(TrainConfig.from_dict(_lora_config(tmp / "single", flux, cache, "none", grad_accum=2)))
        names = {n for n, p in single.student.named_parameters() if p.requires_grad}
        ref = {"names": names, "teacher": _teacher_probe(single)}
        ref["loss"] = float(single.accumulate_gradients()["loss"])
        params = dict(single.student.named_parameters())
        ref["grads"] = {n: params[n].grad.detach().clone() for n in names}
        ref["frozen_with_grad"] = [n for n, p in params.items() if n not in names and p.grad is not None]
        single.train_step()
        single.train_step()
        ref["params"], ref["ema"] = _trained(single.student, names), _trained(single.ema.module, names)
        ref["checkpoint"] = single.save_checkpoint()
        single.train_step()
        ref["params3"] = _trained(single.student, names)
        single.close()
    configs = {case: _lora_config(tmp / case, flux, cache, mode, grad_accum=1) for case, mode in LORA_CASES.items()}
    extras = {case: {"teacher": True} for case in LORA_CASES}
    extras["lora-fsdp"]["load_from"] = str(ref["checkpoint"])
    return ref, _launch(tmp, configs, extras), {"tmp": tmp, "flux": flux, "cache": cache}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_student_gradients_match_one_process_and_the_base_gets_none(lora_run, case):
    ref, results, _ = lora_run
    got = results[case]
    assert got["wrapped"] == ("DistributedDataParallel" if LORA_CASES[case] == "ddp" else "FSDPPiFlowStudent")
    assert got["grads"].keys() == ref["grads"].keys() == ref["names"]
    assert any(".lora_A." in n for n in ref["names"]) and any(".lora_B." in n for n in ref["names"])
    assert got["frozen_with_grad"] == [] and ref["frozen_with_grad"] == []  # the frozen base: no gradient at all
    assert float(got["loss"]) == pytest.approx(ref["loss"], rel=1e-6)
    worst = max(_rel(got["grads"][n], g) for n, g in ref["grads"].items())
    assert worst < 1e-5, worst  # measured 1e-7 (DDP) and 1.4e-7 (FSDP2): the reduction order only
    moving = {n for n, g in ref["grads"].items() if float(g.abs().max()) > 0}  # lora_A's start at lora_B = 0: none
    assert any(".lora_B." in n for n in moving) and any(n.startswith("trunk.proj_out.") for n in moving)
    for name, value in ref["params"].items():  # measured: 3e-8 at most after two steps of about 1e-3
        torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got["ema"][name], ref["ema"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_tied_teacher_matches_one_process_bit_for_bit(lora_run, case):
    """The teacher runs the base with the adapters off through the DDP / FSDP2 wrapper: the single process's output
    exactly, before and after training (which moves the adapters, the head and norm_out, never the teacher)."""
    ref, results, _ = lora_run
    assert torch.equal(results[case]["teacher"], ref["teacher"])
    assert torch.equal(results[case]["teacher_trained"], ref["teacher"])


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_distributed_resume_is_bit_exact(lora_run, case):
    _, results, _ = lora_run
    assert results[case]["resumed"] is True, results[case]["resume_max_diff"]


def test_lora_checkpoints_cross_between_fsdp2_and_one_process(lora_run, tmp_path):
    """LoRA checkpoints hold full tensors by name: one written under FSDP2 resumes in one process, and the single
    process's checkpoint resumed under FSDP2 (in the worker). The weights load exactly; the next step agrees to float32
    rounding (the reduction order of the gradients differs; measured 1.5e-8 at most, a step moves weights by about
    1e-3 and would be off by that much with the AdamW moments or step count lost)."""
    from piflow_kernels.distill.checkpoint import latest_checkpoint, load_checkpoint

    ref, results, paths = lora_run
    fsdp = results["lora-fsdp"]
    path = latest_checkpoint(paths["tmp"] / "lora-fsdp" / "checkpoints")
    saved = load_checkpoint(path).student
    assert set(saved) == ref["names"]  # only the trained weights (the tiny FLUX has no buffers)
    for name, value in fsdp["params"].items():
        assert torch.equal(saved[name], value), name
    cfg = _lora_config(tmp_path, paths["flux"], paths["cache"], "none", grad_accum=2)
    # grad_accum 1 on 2 ranks -> 2 on 1: the same micro-batches per step, so not a change of the run
    one = Trainer(TrainConfig.from_dict(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert one.resume(path)
    for name, value in fsdp["params"].items():
        assert torch.equal(dict(one.student.named_parameters())[name], value), name
        assert torch.equal(dict(one.ema.module.named_parameters())[name], fsdp["ema"][name]), name
    one.train_step()
    for name, value in _trained(one.student, ref["names"]).items():
        torch.testing.assert_close(value, fsdp["params3"][name], rtol=1e-5, atol=1e-6, msg=name)
    # and the single process's checkpoint, resumed under FSDP2
    for name, value in ref["params"].items():
        assert torch.equal(fsdp["loaded"][name], value), name
        assert torch.equal(fsdp["loaded_ema"][name], ref["ema"][name]), name
        torch.testing.assert_close(fsdp["loaded_step"][name], ref["params3"][name], rtol=1e-5, atol=1e-6, msg=name)
