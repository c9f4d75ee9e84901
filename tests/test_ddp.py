"""Data-parallel training: 2 CPU processes (torchrun, gloo) against one process on the same global batch.

One torchrun launch runs three trainers in the worker: DDP data-dependent, DDP data-free (several
backward passes per step) and FSDP2 (``fully_shard``, which runs on CPU with gloo). Each computes
the gradient of step 0, takes two optimizer steps, checkpoints, and checks that a second trainer
resumed from that checkpoint takes the same next step bit for bit; rank 0 saves everything.
In-process single trainers with ``grad_accum = 2`` see the same two shards and must agree.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

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
    configs = json.load(open(sys.argv[1]))
    out_dir = sys.argv[2]
    dist.init_process_group("gloo")

    def full(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    for name, cfg in configs.items():
        trainer = Trainer(TrainConfig.from_dict(cfg))
        assert trainer.ctx.world_size == 2 and trainer.ctx.mode == cfg["distributed"]["mode"]
        wrapped = type(trainer.model).__name__
        logs = trainer.accumulate_gradients()
        grads = {n: full(p.grad) for n, p in trainer.student.named_parameters()}
        loss = trainer.ctx.all_reduce_mean(logs["loss"])
        trainer.train_step()
        trainer.train_step()
        params = {n: full(p) for n, p in trainer.student.named_parameters()}
        ema = {n: full(p) for n, p in trainer.ema.module.named_parameters()}
        trainer.save_checkpoint()
        # resume in a second trainer: one more step on both must agree bit for bit
        again = Trainer(TrainConfig.from_dict(cfg))
        resumed = again.resume()
        trainer.train_step()
        again.train_step()
        same = [torch.equal(full(a), full(b)) for a, b in zip(trainer.student.parameters(), again.student.parameters())]
        same += [torch.equal(full(a), full(b)) for a, b in zip(trainer.ema.module.parameters(), again.ema.module.parameters())]
        if dist.get_rank() == 0:
            torch.save({"grads": grads, "params": params, "ema": ema, "loss": loss, "wrapped": wrapped,
                        "resumed": resumed and all(same)}, f"{out_dir}/{name}.pt")
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


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Launch the worker once on 2 gloo ranks; returns {case: saved results}."""
    if fully_shard_fn() is None:
        pytest.skip("this PyTorch has no FSDP2 fully_shard")
    tmp = tmp_path_factory.mktemp("ddp")
    configs = {name: _config(tmp / name, mode, data_mode, grad_accum=1) for name, (mode, data_mode) in CASES.items()}
    (tmp / "configs.json").write_text(__import__("json").dumps(configs))
    (tmp / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIFLOW_COMPILE": "0"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(tmp / "worker.py"), str(tmp / "configs.json"), str(tmp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {name: torch.load(tmp / f"{name}.pt", weights_only=True) for name in CASES}, tmp


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


def test_fsdp_modules_must_exist(tmp_path, monkeypatch):
    """FSDP2 on one gloo process: an fsdp_modules class the student lacks is named in the error."""
    if fully_shard_fn() is None:
        pytest.skip("this PyTorch has no FSDP2 fully_shard")
    import torch.distributed as dist

    cfg = _config(tmp_path, "fsdp", "data_dependent", 1)
    cfg["distributed"]["fsdp_modules"] = ["NoSuchBlock"]
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
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
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
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
