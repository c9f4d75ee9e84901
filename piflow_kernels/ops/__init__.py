"""Policy ops with backend dispatch. Each op has a CPU twin (``*_torch``), a Triton kernel
(``*_triton``, loaded lazily) and the literal reference (``reference`` package).

All ops take the flat layout documented in :mod:`piflow_kernels.ops.gm_torch` and
:mod:`piflow_kernels.ops.dx_torch`.
"""

from __future__ import annotations

import torch

from piflow_kernels.ops.dx_torch import dx_rollout_torch, dx_velocity_torch
from piflow_kernels.ops.gm_torch import gm_rollout_torch, gm_velocity_torch


def _triton_module(name: str):
    """The Triton op module, imported on first use. Looked up in sys.modules first: torch.compile traces
    a dict lookup, whereas importlib.import_module is a graph break under fullgraph=True."""
    import sys

    full = f"piflow_kernels.ops.{name}"
    module = sys.modules.get(full)
    if module is None:
        import importlib

        module = importlib.import_module(full)
    return module


def load_triton_ops() -> None:
    """Import both Triton op modules now (the policies call this when they pick the Triton backend), so a
    policy whose first use is inside ``torch.compile(fullgraph=True)`` finds them already loaded."""
    _triton_module("gm_triton")
    _triton_module("dx_triton")


def gm_velocity(backend: str, *args) -> torch.Tensor:
    """Dispatch of the GM velocity (args as :func:`gm_velocity_torch`)."""
    if backend == "triton":
        return _triton_module("gm_triton").gm_velocity_triton(*args)
    return gm_velocity_torch(*args)


def gm_rollout(backend: str, *args) -> torch.Tensor:
    """Dispatch of the GM rollout (args as :func:`gm_rollout_torch`)."""
    if backend == "triton":
        return _triton_module("gm_triton").gm_rollout_triton(*args)
    return gm_rollout_torch(*args)


def dx_velocity(backend: str, *args) -> torch.Tensor:
    if backend == "triton":
        return _triton_module("dx_triton").dx_velocity_triton(*args)
    return dx_velocity_torch(*args)


def dx_rollout(backend: str, *args) -> torch.Tensor:
    if backend == "triton":
        return _triton_module("dx_triton").dx_rollout_triton(*args)
    return dx_rollout_torch(*args)


__all__ = [
    "gm_velocity",
    "gm_rollout",
    "dx_velocity",
    "dx_rollout",
    "gm_velocity_torch",
    "gm_rollout_torch",
    "dx_velocity_torch",
    "dx_rollout_torch",
]
