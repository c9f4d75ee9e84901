"""Training checkpoints: weights in safetensors, the rest in a torch file loadable with ``weights_only=True``.

Layout of one checkpoint (a directory, renamed into place only once complete)::

    <root>/iter_00000200/
        student.safetensors      the student's weights
        ema.safetensors          the EMA student's weights
        state.pt                 iteration, optimizer, LR schedule (key "scheduler"), EMA counters, config
        rng_rank0.pt ...         each rank's RNG states (torch CPU/CUDA, python, numpy) as tensors
    <root>/latest                the name of the newest complete checkpoint

Every file is written to a temporary name and moved with ``os.replace``; the directory is built
under a temporary name and renamed, and ``latest`` is replaced last, so a crash at any point leaves
the previous checkpoint intact and ``latest`` pointing at a complete one.

    >>> begin_checkpoint(root, 200)                    # rank 0, then a barrier
    >>> write_rank_rng(root, 200, rank)                # every rank, then a barrier
    >>> finish_checkpoint(root, 200, student_sd, ema_sd, train_state)   # rank 0
    >>> ckpt = load_checkpoint(latest_checkpoint(root))
    >>> save_training_checkpoint(root, 200, TrainingState(model, ema, optimizer, lr_scheduler, config, 1), ctx)  # all ranks
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from piflow_kernels.distill.ddp import DistContext
    from piflow_kernels.distill.ema import EMA

__all__ = [
    "atomic_write_bytes",
    "save_safetensors_atomic",
    "torch_save_atomic",
    "get_rng_state",
    "set_rng_state",
    "Checkpoint",
    "checkpoint_dir",
    "begin_checkpoint",
    "write_rank_rng",
    "finish_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "TrainingState",
    "save_training_checkpoint",
    "load_training_checkpoint",
]

_LATEST = "latest"
_PREFIX = "iter_"


# ---------------------------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors_atomic(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a flat tensor dict as safetensors (tensors moved to CPU, made contiguous and unshared)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file; ``obj`` must hold only tensors, dicts, lists, numbers and strings."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- RNG state


def get_rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and numbers (loadable with ``weights_only=True``)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": [py_gauss is not None, float(py_gauss or 0.0)],
        "numpy_name": str(np_name),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state["python_gauss"]
    py_state = tuple(int(v) for v in state["python_state"].tolist())
    random.setstate((state["python_version"], py_state, gauss if has_gauss else None))
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights, the train state and this rank's RNG state (None if absent)."""

    path: Path
    iteration: int
    student: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    state: dict[str, Any]
    rng: dict[str, Any] | None


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"{_PREFIX}{iteration:08d}"


def _staging_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f".{_PREFIX}{iteration:08d}.partial"


def begin_checkpoint(root: str | Path, iteration: int) -> Path:
    """Create (empty) the staging directory of checkpoint ``iteration``; call on one rank, then barrier."""
    staging = _staging_dir(root, iteration)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def write_rank_rng(root: str | Path, iteration: int, rank: int) -> None:
    """Write this rank's RNG states into the staging directory (every rank, after begin_checkpoint)."""
    torch_save_atomic(get_rng_state(), _staging_dir(root, iteration) / f"rng_rank{rank}.pt")


def finish_checkpoint(
    root: str | Path,
    iteration: int,
    student: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write weights and state into the staging directory, move it into place, update ``latest``, prune.

    Call on one rank after every rank's :func:`write_rank_rng`. Returns the checkpoint directory.
    """
    root = Path(root)
    staging = _staging_dir(root, iteration)
    meta = {"iteration": str(iteration)}
    save_safetensors_atomic(student, staging / "student.safetensors", meta)
    save_safetensors_atomic(ema, staging / "ema.safetensors", meta)
    torch_save_atomic({**state, "iteration": int(iteration)}, staging / "state.pt")
    final = checkpoint_dir(root, iteration)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    atomic_write_bytes(root / _LATEST, final.name.encode())
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and p.name[len(_PREFIX) :].isdigit())
    for old in done[:-keep] if keep > 0 else []:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (via ``latest``), or None."""
    root = Path(root)
    marker = root / _LATEST
    if marker.is_file():
        path = root / marker.read_text().strip()
        if (path / "state.pt").is_file():
            return path
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | Path, rank: int = 0, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory; the torch files go through ``torch.load(..., weights_only=True)``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.pt)")
    state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    rng_file = path / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    device = str(map_location)
    return Checkpoint(
        path=path,
        iteration=int(state["iteration"]),
        student=load_file(path / "student.safetensors", device=device),
        ema=load_file(path / "ema.safetensors", device=device),
        state=state,
        rng=rng,
    )


# ---------------------------------------------------------------------------------------------- training state


@dataclass
class TrainingState:
    """What a training checkpoint holds besides the iteration: the (possibly wrapped) student, the EMA,
    the optimizer, the LR schedule, and the run's description (config, world size, micro-batches per step)."""

    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    config: dict[str, Any]
    num_shards: int


def save_training_checkpoint(
    root: str | Path, iteration: int, train: TrainingState, ctx: DistContext, keep: int = 2
) -> Path | None:
    """Checkpoint ``train`` at ``iteration`` under ``root``; collective: call on every rank.

    Every rank writes its RNG states; rank 0 writes the full weights and the state and returns the
    checkpoint directory (the other ranks return None). Works for plain, DDP and FSDP2 models.
    """
    from piflow_kernels.distill.ddp import model_state_dict, optimizer_state_dict

    student_sd = model_state_dict(train.model, ctx)
    ema_sd = model_state_dict(train.ema.module, ctx)
    optim_sd = optimizer_state_dict(train.model, train.optimizer, ctx)
    if ctx.is_main:
        begin_checkpoint(root, iteration)
    ctx.barrier()
    write_rank_rng(root, iteration, ctx.rank)
    ctx.barrier()
    path = None
    if ctx.is_main:
        state = {
            "optimizer": optim_sd,
            "scheduler": train.lr_scheduler.state_dict(),  # the LR schedule (the file format keeps the key)
            "ema": train.ema.meta_state(),
            "world_size": ctx.world_size,
            "num_shards": train.num_shards,
            "config": train.config,
        }
        path = finish_checkpoint(root, iteration, student_sd, ema_sd, state, keep)
    ctx.barrier()
    return path


def load_training_checkpoint(path: str | Path, train: TrainingState, ctx: DistContext) -> Checkpoint:
    """Load the checkpoint at ``path`` into ``train`` (weights, optimizer, schedule, EMA counters) and
    this rank's global RNG states; returns the loaded :class:`Checkpoint` (its iteration, state)."""
    from piflow_kernels.distill.ddp import load_model_state_dict, load_optimizer_state_dict

    loaded = load_checkpoint(path, rank=ctx.rank)
    load_model_state_dict(train.model, loaded.student, ctx)
    load_model_state_dict(train.ema.module, loaded.ema, ctx)
    load_optimizer_state_dict(train.model, train.optimizer, loaded.state["optimizer"], ctx)
    train.lr_scheduler.load_state_dict(loaded.state["scheduler"])
    train.ema.load_meta_state(loaded.state["ema"])
    if loaded.rng is not None:
        set_rng_state(loaded.rng)
    return loaded
