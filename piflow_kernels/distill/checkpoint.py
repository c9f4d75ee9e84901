"""Training checkpoints: weights in safetensors, the rest in a torch file loadable with ``weights_only=True``.

Layout of one checkpoint (a directory, renamed into place only once complete)::

    <root>/iter_00000200/
        student.safetensors      the student's weights
        ema.safetensors          the EMA student's weights
        state.pt                 iteration, optimizer, LR schedule (key "scheduler"), EMA counters, config
        rng_rank0.pt ...         each rank's RNG states (torch CPU/CUDA, python, numpy) as tensors
        manifest.json            written last: every other file's name, size and sha256
    <root>/latest                the name of the newest complete checkpoint

Every file is written to a temporary name and moved with ``os.replace``; the directory is built
under a temporary name (``.iter_00000200.partial``) and renamed, and ``latest`` is replaced last, so a
crash at any point leaves the previous checkpoint intact and ``latest`` pointing at a complete one.
What a killed save leaves behind (``.iter_*.partial`` folders, ``.latest.*.tmp`` files) is removed by
the next save.

Loading verifies: :func:`load_checkpoint` checks every file against the manifest (size, then sha256)
before reading it, and :func:`latest_checkpoint` returns the newest checkpoint that verifies, warning
about each newer one it skips and why (a truncated ``state.pt``, a missing file, ...). A checkpoint
without a manifest (written by a version before manifests) is accepted when its files pass a structural
check (every safetensors header covers its file, every torch file's zip members match their CRC-32s),
with a warning that it is loaded unverified. A damaged file is a
:class:`~piflow_kernels.files.DamagedFileError` naming it.

    >>> begin_checkpoint(root, 200)                    # rank 0, then a barrier
    >>> write_rank_rng(root, 200, rank)                # every rank, then a barrier
    >>> finish_checkpoint(root, 200, student_sd, ema_sd, train_state)   # rank 0
    >>> ckpt = load_checkpoint(latest_checkpoint(root))
    >>> save_training_checkpoint(root, 200, TrainingState(model, ema, optimizer, lr_scheduler, config, 1), ctx)  # all ranks
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from piflow_kernels.files import (
    DamagedFileError,
    check_torch_file,
    load_safetensors,
    read_json,
    read_text,
    require_file,
    safetensors_metadata,
    sha256_file,
    torch_load,
)

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
    "write_manifest",
    "verify_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "TrainingState",
    "save_training_checkpoint",
    "load_training_checkpoint",
]

_LATEST = "latest"
_PREFIX = "iter_"
MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = "piflow_kernels.checkpoint"
_MANIFEST_VERSION = 1
_REQUIRED = ("student.safetensors", "ema.safetensors", "state.pt")
_CHECKPOINT_NAME = re.compile(rf"^{_PREFIX}(\d+)$")


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


def _remove_stale(root: Path) -> None:
    """What killed saves left under ``root``: staging folders and temporary ``latest`` files."""
    for staging in root.glob(f".{_PREFIX}*.partial"):
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
    for tmp in root.glob(f".{_LATEST}.*.tmp"):
        tmp.unlink(missing_ok=True)


def begin_checkpoint(root: str | Path, iteration: int) -> Path:
    """Create (empty) the staging directory of checkpoint ``iteration``, removing what killed saves left
    under ``root``; call on one rank, then barrier."""
    _remove_stale(Path(root))
    staging = _staging_dir(root, iteration)
    staging.mkdir(parents=True)
    return staging


def write_rank_rng(root: str | Path, iteration: int, rank: int) -> None:
    """Write this rank's RNG states into the staging directory (every rank, after begin_checkpoint)."""
    torch_save_atomic(get_rng_state(), _staging_dir(root, iteration) / f"rng_rank{rank}.pt")


def write_manifest(folder: str | Path, iteration: int) -> Path:
    """Record every file of a checkpoint folder (name, size, sha256) in its ``manifest.json``, atomically.

    Format: ``{"format": "piflow_kernels.checkpoint", "version": 1, "iteration": N,
    "files": {"state.pt": {"size": 1234, "sha256": "..."}, ...}}``. Hidden (temporary) files are not listed.
    """
    folder = Path(folder)
    files = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and not file.name.startswith(".") and file.name != MANIFEST_NAME:
            files[file.name] = {"size": file.stat().st_size, "sha256": sha256_file(file, _what(file.name))}
    doc = {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "iteration": int(iteration), "files": files}
    path = folder / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path


def finish_checkpoint(
    root: str | Path,
    iteration: int,
    student: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write weights, state and the manifest into the staging directory, move it into place, update
    ``latest``, prune.

    Call on one rank after every rank's :func:`write_rank_rng`. Returns the checkpoint directory.
    """
    root = Path(root)
    staging = _staging_dir(root, iteration)
    meta = {"iteration": str(iteration)}
    save_safetensors_atomic(student, staging / "student.safetensors", meta)
    save_safetensors_atomic(ema, staging / "ema.safetensors", meta)
    torch_save_atomic({**state, "iteration": int(iteration)}, staging / "state.pt")
    write_manifest(staging, iteration)  # last: a folder with a manifest is complete
    final = checkpoint_dir(root, iteration)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    atomic_write_bytes(root / _LATEST, final.name.encode())
    _prune(root, keep, final.name)
    return final


def _iteration_of(folder: Path) -> int | None:
    m = _CHECKPOINT_NAME.match(folder.name)
    return int(m.group(1)) if m and folder.is_dir() else None


def _prune(root: Path, keep: int, newest: str) -> None:
    """Keep ``newest`` and the ``keep - 1`` checkpoints before it. Folders past ``newest`` (a run resumed
    from an older checkpoint, e.g. after skipping a damaged one) stay until this run overwrites them."""
    top = int(newest[len(_PREFIX) :])
    done = sorted((it, p) for p in root.glob(f"{_PREFIX}*") if (it := _iteration_of(p)) is not None and it <= top)
    for _, old in done[:-keep] if keep > 0 else []:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- verification


def _what(name: str) -> str:
    """How a checkpoint file is named in errors."""
    if name.startswith("rng_rank"):
        return "RNG state"
    return {
        "student.safetensors": "student weights",
        "ema.safetensors": "EMA weights",
        "state.pt": "training state",
        MANIFEST_NAME: "checkpoint manifest",
    }.get(name, "checkpoint file")


def _require_folder(path: Path) -> None:
    if not path.exists():
        err: OSError = FileNotFoundError(f"{path} does not exist (training checkpoint)")
    elif not path.is_dir():
        err = NotADirectoryError(f"{path} is not a directory (a training checkpoint is a folder such as iter_00000200)")
    else:
        return
    raise err


def _manifest_files(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's files table, checked for shape; DamagedFileError naming the manifest otherwise."""
    file = path / MANIFEST_NAME
    doc = read_json(file, _what(MANIFEST_NAME))
    files = doc.get("files") if isinstance(doc, dict) else None
    entries_ok = isinstance(files, dict) and all(
        isinstance(name, str) and "/" not in name and name not in (".", "..") and isinstance(entry, dict)
        and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        for name, entry in files.items()
    )  # fmt: skip
    if not isinstance(doc, dict) or doc.get("format") != _MANIFEST_FORMAT or not entries_ok:
        raise DamagedFileError(
            file, f"{_what(MANIFEST_NAME)}: not a {_MANIFEST_FORMAT} manifest (a 'files' table of sizes and sha256s)"
        )
    missing = [name for name in _REQUIRED if name not in files]
    if missing:
        raise DamagedFileError(file, f"{_what(MANIFEST_NAME)}: does not list {', '.join(missing)}")
    return files


def verify_checkpoint(path: str | Path) -> bool:
    """Check a checkpoint folder; True when it has a manifest (every listed file verified), False for a
    checkpoint without one whose files pass the structural check.

    Sizes are compared first (a truncated file fails without being read), then sha256s. Raises
    :class:`~piflow_kernels.files.DamagedFileError` naming the first bad file, ``FileNotFoundError`` for a
    missing file or folder, ``NotADirectoryError`` when ``path`` is a file.
    """
    path = Path(path)
    _require_folder(path)
    if not (path / MANIFEST_NAME).exists():
        for name in _REQUIRED:
            require_file(path / name, _what(name))
        for file in sorted(path.iterdir()):
            if file.suffix == ".safetensors":
                safetensors_metadata(file, _what(file.name))
            elif file.suffix == ".pt":
                check_torch_file(file, _what(file.name))
        return False
    files = _manifest_files(path)
    for name, entry in files.items():
        file = require_file(path / name, _what(name))
        size = file.stat().st_size
        if size != entry["size"]:
            cut = " (truncated)" if size < entry["size"] else ""
            problem = f"{_what(name)}: {size} bytes where the checkpoint's manifest records {entry['size']}{cut}"
            raise DamagedFileError(file, problem)
    for name, entry in files.items():
        if sha256_file(path / name, _what(name)) != entry["sha256"]:
            raise DamagedFileError(
                path / name, f"{_what(name)}: its sha256 differs from the one the checkpoint's manifest records"
            )
    return True


# a checkpoint latest_checkpoint just verified -> (its files' stat signature, has a manifest): load_checkpoint
# then skips hashing it a second time unless a file changed in between (used once, then dropped)
_just_verified: dict[str, tuple[tuple, bool]] = {}


def _signature(path: Path) -> tuple:
    stats = [(f.name, f.stat()) for f in path.iterdir() if f.is_file()]
    return tuple(sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats))


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (see :func:`verify_checkpoint`), or None when there is none.

    The folder ``latest`` names is tried first, then every ``iter_*`` folder from the highest iteration
    down. Each one skipped is a warning naming it and the reason (on rank 0 under torch.distributed);
    when checkpoints exist but none verifies, :class:`~piflow_kernels.files.DamagedFileError` (rather than
    a silent fresh start that would overwrite them).
    """
    root = Path(root)
    if not root.is_dir():
        return None
    folders = sorted(((it, p) for p in root.iterdir() if (it := _iteration_of(p)) is not None), reverse=True)
    candidates = [p for _, p in folders]
    skipped: list[str] = []

    def skip(message: str, reason: str) -> None:
        skipped.append(reason)
        if _is_main_process():
            warnings.warn(f"resume: {message}", stacklevel=3)

    marker = root / _LATEST
    if marker.is_file():
        try:
            name = read_text(marker, "checkpoint marker").strip()
        except (DamagedFileError, OSError) as err:
            skip(f"ignoring {marker}: {err}", f"{marker.name}: {err}")
        else:
            named = root / name
            if _CHECKPOINT_NAME.match(name) and named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
            else:
                problem = f"it names {name!r}, which is not a checkpoint folder under {root}"
                skip(f"ignoring {marker}: {problem}", f"{marker.name}: {problem}")
    for path in candidates:
        try:
            with_manifest = verify_checkpoint(path)
        except (DamagedFileError, OSError) as err:
            skip(f"skipping checkpoint {path}: {err}", f"{path.name}: {err}")
            continue
        _just_verified[str(path)] = (_signature(path), with_manifest)
        return path
    if candidates:
        raise DamagedFileError(root, "no checkpoint under it verifies", "; ".join(skipped))
    return None


def load_checkpoint(path: str | Path, rank: int = 0, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify and load a checkpoint directory; the torch files go through ``torch.load(..., weights_only=True)``.

    Raises :class:`~piflow_kernels.files.DamagedFileError` naming a file that fails the manifest or does
    not load, ``FileNotFoundError`` / ``NotADirectoryError`` for a bad ``path``. A checkpoint without a
    manifest loads with a warning (rank 0).
    """
    path = Path(path)
    _require_folder(path)
    checked = _just_verified.pop(str(path), None)
    with_manifest = checked[1] if checked is not None and checked[0] == _signature(path) else verify_checkpoint(path)
    if not with_manifest and rank == 0:
        warnings.warn(
            f"{path} has no {MANIFEST_NAME} (a checkpoint written before checkpoints carried one): its files pass the "
            "structural check and are loaded without sha256 verification",
            stacklevel=2,
        )
    state = torch_load(path / "state.pt", _what("state.pt"), map_location=map_location)
    if not isinstance(state, dict) or "iteration" not in state:
        raise DamagedFileError(path / "state.pt", f"{_what('state.pt')}: no 'iteration' key (not a training checkpoint's state)")
    rng_file = path / f"rng_rank{rank}.pt"
    rng = torch_load(rng_file, _what(rng_file.name)) if rng_file.is_file() else None
    device = str(map_location)
    return Checkpoint(
        path=path,
        iteration=int(state["iteration"]),
        student=load_safetensors(path / "student.safetensors", _what("student.safetensors"), device=device),
        ema=load_safetensors(path / "ema.safetensors", _what("ema.safetensors"), device=device),
        state=state,
        rng=rng,
    )


# ---------------------------------------------------------------------------------------------- training state


@dataclass
class TrainingState:
    """What a training checkpoint holds besides the iteration: the (possibly wrapped) student, the EMA,
    the optimizer, the LR schedule, and the run's description (config, world size, micro-batches per step).
    ``keys``: the names of the trained parameters when the student also has frozen ones (a LoRA student): only
    they (and the buffers) are saved, for the student and the EMA alike; None saves every weight."""

    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    config: dict[str, Any]
    num_shards: int
    keys: set[str] | None = None


def save_training_checkpoint(
    root: str | Path, iteration: int, train: TrainingState, ctx: DistContext, keep: int = 2
) -> Path | None:
    """Checkpoint ``train`` at ``iteration`` under ``root``; collective: call on every rank.

    Every rank writes its RNG states; rank 0 writes the full weights and the state and returns the
    checkpoint directory (the other ranks return None). Works for plain, DDP and FSDP2 models.
    """
    from piflow_kernels.distill.ddp import model_state_dict, optimizer_state_dict

    student_sd = model_state_dict(train.model, ctx, train.keys)
    ema_sd = model_state_dict(train.ema.module, ctx, train.keys)
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
    load_model_state_dict(train.model, loaded.student, ctx, train.keys)
    load_model_state_dict(train.ema.module, loaded.ema, ctx, train.keys)
    load_optimizer_state_dict(train.model, train.optimizer, loaded.state["optimizer"], ctx)
    train.lr_scheduler.load_state_dict(loaded.state["scheduler"])
    train.ema.load_meta_state(loaded.state["ema"])
    if loaded.rng is not None:
        set_rng_state(loaded.rng)
    return loaded
