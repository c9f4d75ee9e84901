"""Start-up checks of a training run, made before any process group, model or data is built.

:func:`check_device` and :func:`check_backend` turn a ``device`` or an explicit ``piid.backend`` that cannot
run here into a :class:`~.config.ConfigError` naming the key; :func:`rollout_compile_pending` says whether the
run's first GM rollout will ``torch.compile`` its substep (the trainer prints one line before it);
:func:`check_resumed_config` refuses a checkpoint saved with other values of keys that change the run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from piflow_kernels.distill.config import RESUME_FREE_KEYS, ConfigError, TrainConfig, run_changes
from piflow_kernels.ops import dispatch
from piflow_kernels.ops.gm import native as gm_native
from piflow_kernels.ops.gm import torch_twin as gm_twin

__all__ = ["device_type", "check_device", "check_backend", "check_resumed_config", "rollout_compile_pending"]


def device_type(device: str) -> torch.device:
    """The kind of device the config's ``device`` resolves to ("auto": CUDA when available), without touching CUDA."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def check_device(device: str) -> None:
    """A ConfigError naming ``device`` when it asks for CUDA that this machine lacks (or a GPU index beyond the
    visible ones; "cuda" means cuda:LOCAL_RANK). The string's form is checked by the config itself."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"config key device = {device!r}, but CUDA is not available on this machine (torch.cuda.is_available() is "
            "False: no GPU, no driver, or a CPU-only build of torch); use device = 'cpu' or 'auto'"
        )
    index = int(device.split(":", 1)[1]) if ":" in device else int(os.environ.get("LOCAL_RANK", "0"))
    visible = torch.cuda.device_count()
    if index >= visible:
        raise ConfigError(f"config key device = {device!r} means GPU {index}, but {visible} GPU(s) are visible here")


def _triton_problem(cfg: TrainConfig, device: torch.device) -> str | None:
    """Why the Triton kernels cannot run this run's policies on ``device`` (None when they can); shapes only."""
    s = cfg.student
    extra = s.kwargs if s.kind == "diffusers" else {}
    if cfg.piid.policy_type == "GMFlow":
        from piflow_kernels.ops.gm import triton_common as gm_triton

        return gm_triton.range_problem(int(extra.get("num_components", s.num_components)), cfg.data.channels, device)
    from piflow_kernels.ops.dx import triton_common as dx_triton

    return dx_triton.range_problem(int(extra.get("num_points", s.num_points)), device, 1)


def check_backend(cfg: TrainConfig, device: torch.device) -> None:
    """A ConfigError naming ``piid.backend`` when it is "triton" and the Triton kernels cannot run the run's
    policies on ``device``: asked for by name, a backend runs or refuses (the automatic choice falls back)."""
    if cfg.piid.backend != "triton":
        return
    if not dispatch.triton_available():
        raise ConfigError(
            "config key piid.backend = 'triton' needs the triton package, which does not import here (the "
            "piflow_kernels[triton] extra); use piid.backend = 'torch', or leave it unset for the automatic choice"
        )
    problem = _triton_problem(cfg, device)
    if problem is not None:
        raise ConfigError(
            f"config key piid.backend = 'triton' cannot run this run's policies on {device.type}: {problem}; use "
            "piid.backend = 'torch', or leave it unset (the automatic choice falls back to the torch path)"
        )


def rollout_compile_pending(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the run's first GM rollout will ``torch.compile`` the substep in this process: a GMFlow policy on the
    torch path (CUDA without the Triton kernels, or the CPU without the native loop) with compilation enabled
    (``PIFLOW_COMPILE``) and no substep compiled yet."""
    if cfg.piid.policy_type != "GMFlow" or not gm_twin.compile_enabled() or gm_twin.last_compile_seconds() is not None:
        return False
    try:
        backend = dispatch.resolve_backend(cfg.piid.backend, device)
    except (RuntimeError, ValueError):  # a PIFLOW_BACKEND that cannot run: the first rollout says so
        return False
    if backend == "reference" or (backend == "triton" and _triton_problem(cfg, device) is None):
        return False
    return device.type != "cpu" or not gm_native.available()


def check_resumed_config(
    saved: Any, cfg: TrainConfig, path: Path, saved_shards: int | None = None, shards: int | None = None
) -> list[tuple[str, Any, Any]]:
    """The keys that change the run whose values differ between a checkpoint's saved config and ``cfg``, as
    (key, saved, new); a ConfigError when there are any and ``cfg.allow_config_change`` is off. Checkpoints
    without a saved config are not compared. ``optim.grad_accum`` may change with the world size when the
    micro-batches per step (``saved_shards``, ``shards``: world size x grad_accum) stay the same: the global batch
    and the data stream are then the same."""
    if not isinstance(saved, Mapping):
        return []
    piid = saved.get("piid")
    if isinstance(piid, Mapping) and "substep_rule" not in piid:
        # saved before the key existed, when every rollout rounded its substep count: compare as such, so that
        # the new default (ceil) does not change a resumed run without a word
        saved = {**saved, "piid": {**piid, "substep_rule": "round"}}
    changes = run_changes(saved, cfg.to_dict())
    if saved_shards is not None and saved_shards == shards:
        changes = [c for c in changes if c[0] != "optim.grad_accum"]
    if changes and not cfg.allow_config_change:
        listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
        free = ", ".join(key.rstrip(".") + ("[...]" if key.endswith(".") else "") for key in RESUME_FREE_KEYS)
        raise ConfigError(
            f"{path} was saved with other values of keys that change the run: {listing}. Resume with the saved "
            f"values, or pass --force-resume (config key allow_config_change = true) to go on with the new ones "
            f"(these may change freely: {free})"
        )
    return changes


def check_token_size(cfg: TrainConfig, teacher_model: Any) -> None:
    """A dynamic shift for a FLUX / Qwen-Image teacher must count its pipeline's packed tokens (``piid.token_size``
    = the packing, 2): their pipelines compute the shift from ``H * W / 4``, and a student trained on another count
    would be sampled at another shift than it learned."""
    from piflow_kernels.layouts import ARCHS, geometry

    name = type(teacher_model).__name__
    arch = ARCHS.get(name)
    if teacher_model is None or arch is None or arch.layout != "tokens" or not cfg.piid.use_dynamic_shifting:
        return
    p = geometry(name, teacher_model.config)[2]
    if cfg.piid.token_size != p:
        raise ConfigError(
            f"config key piid.token_size must be {p} for a {name} teacher with piid.use_dynamic_shifting: its pipeline "
            f"counts packed {p}x{p} tokens for the shift, got {cfg.piid.token_size}"
        )
