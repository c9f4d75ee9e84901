"""The one place that decides which implementation runs a policy op.

``resolve_backend`` turns a policy's ``backend=`` argument into a backend name: ``None`` (auto) picks
``"triton"`` for CUDA tensors when Triton imports and ``"torch"`` otherwise; ``PIFLOW_BACKEND`` overrides
the auto choice (not an explicit argument). ``select`` then maps (op, backend, device, shape) to the
function that runs it:

| op | backend | implementation |
| --- | --- | --- |
| gm_velocity, dx_velocity | reference | the literal reference in float32 (``ops.<gm,dx>.oracle``) |
| gm_velocity, dx_velocity | torch | the restructured twin (``ops.<gm,dx>.torch_twin``) |
| gm_velocity, dx_velocity | triton | the fused kernels, when the inputs are in their range; else the twin (auto choice) |
| gm_rollout | torch | CPU tensors: the native loop (``ops.gm.native``) when it builds, else the twin (compiled substep) |
| gm_rollout | triton | the fused kernel in range; else as ``torch`` |
| dx_rollout | torch, triton | as the velocity (the twin is closed-form) |
| gm_rollout, dx_rollout | reference | the reference's literal loop over the reference velocity |

Every fallback logs its reason once per (op, reason); a backend passed explicitly to a policy that cannot run
its inputs is an error instead (``require_runnable``). Nothing here writes to ``os.environ``: settings
(``PIFLOW_COMPILE``, ``PIFLOW_NATIVE``, ``TRITON_INTERPRET``) are read, never changed.
Triton modules are imported only when the Triton backend is asked for.

    >>> dispatch.select("gm_rollout", "torch", x_start, policy).name
    'gm_rollout_native'
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from piflow_kernels.ops.dx import oracle as dx_oracle
from piflow_kernels.ops.dx import torch_twin as dx_twin
from piflow_kernels.ops.gm import native as gm_native
from piflow_kernels.ops.gm import oracle as gm_oracle
from piflow_kernels.ops.gm import torch_twin as gm_twin
from piflow_kernels.ops.records import DXTensors, GMTensors

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "triton", "reference")
ENV_BACKEND = "PIFLOW_BACKEND"
OPS = ("gm_velocity", "gm_rollout", "dx_velocity", "dx_rollout")
# op -> the module holding its Triton implementation (imported on first use)
_TRITON_MODULES = {
    "gm_velocity": "piflow_kernels.ops.gm.triton_velocity",
    "gm_rollout": "piflow_kernels.ops.gm.triton_rollout",
    "dx_velocity": "piflow_kernels.ops.dx.triton_velocity",
    "dx_rollout": "piflow_kernels.ops.dx.triton_rollout",
}


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports (Linux x86_64 CUDA builds of torch bring it)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return the backend to use for tensors on ``device``.

    Args:
        backend: None for auto, or one of ``"torch"``, ``"triton"``, ``"reference"``.
        device: the device of the policy tensors.
    """
    if backend is None:
        backend = os.environ.get(ENV_BACKEND) or None
        if backend is not None:
            backend = backend.strip().lower()
    if backend is None:
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which failed to import")
    return backend


def _module(name: str):
    """A module, imported on first use. Looked up in sys.modules first: torch.compile traces a dict lookup,
    whereas importlib.import_module is a graph break under fullgraph=True."""
    module = sys.modules.get(name)
    if module is None:
        module = importlib.import_module(name)
    return module


def load_triton_ops() -> None:
    """Import every Triton op module now (the policies call this when they pick the Triton backend), so a
    policy whose first use is inside ``torch.compile(fullgraph=True)`` finds them already loaded."""
    for name in _TRITON_MODULES.values():
        _module(name)


class Choice(NamedTuple):
    """What runs an op: the implementation's name (e.g. ``"gm_rollout_native"``) and the function."""

    name: str
    fn: Callable[..., torch.Tensor]


_logged: set[str] = set()


def _fall_back(op: str, reason: str) -> None:
    key = f"{op}: {reason}"
    if key not in _logged:
        _logged.add(key)
        logger.warning("piflow_kernels: %s falls back to the torch path (%s)", op, reason)


def _triton_problem(op: str, x: torch.Tensor, policy: GMTensors | DXTensors) -> str | None:
    """Why the Triton kernels cannot run these inputs (None when they can). Shapes and devices only."""
    if x.device.type not in ("cpu", "cuda"):
        return f"device {x.device.type!r} has no Triton backend here"
    if op.startswith("gm"):
        common = _module("piflow_kernels.ops.gm.triton_common")
        return common.range_problem(policy.means.shape[1], policy.means.shape[2], x.device)
    common = _module("piflow_kernels.ops.dx.triton_common")
    return common.range_problem(policy.grid.shape[1], policy.grid.device, policy.grid.numel())


def require_runnable(backend: str, op: str, x: torch.Tensor, policy: GMTensors | DXTensors) -> None:
    """A ``ValueError`` naming the backend and the reason when ``backend`` cannot run ``op`` on these inputs.

    For a backend passed explicitly to a policy (``backend="triton"``): asked for by name, the Triton kernels
    either run or refuse (K or C > 64, N > 64, CPU tensors without ``TRITON_INTERPRET=1``, another device).
    The automatic choice never calls this and falls back to the torch path (:func:`select`, logged).
    """
    if backend != "triton":
        return  # "torch" and "reference" run everywhere
    reason = _triton_problem(op, x, policy)
    if reason is not None:
        raise ValueError(
            f"backend='triton' cannot run {op} on these inputs: {reason}; pass backend='torch', or backend=None to "
            "let the automatic choice fall back to the torch path"
        )


def _torch_choice(op: str, x: torch.Tensor) -> Choice:
    if op == "gm_rollout":
        # the native loop is plain host code: not traced by torch.compile, CPU tensors only
        if x.device.type == "cpu" and not torch.compiler.is_compiling() and gm_native.available():
            return Choice("gm_rollout_native", gm_native.gm_rollout_native)
        return Choice("gm_rollout_torch", gm_twin.gm_rollout_torch)
    twin = gm_twin if op.startswith("gm") else dx_twin
    return Choice(f"{op}_torch", getattr(twin, f"{op}_torch"))


def select(op: str, backend: str, x: torch.Tensor, policy: GMTensors | DXTensors) -> Choice:
    """The implementation of ``op`` for a resolved ``backend`` and these inputs.

    Args:
        op: one of :data:`OPS`.
        backend: a resolved backend (:func:`resolve_backend`).
        x: the latent the op is called with ((B, C, L)); its device decides with the backend.
        policy: the flat policy record (its shape decides the Triton range).
    """
    if backend == "reference":
        oracle = gm_oracle if op.startswith("gm") else dx_oracle
        return Choice(f"{op}_reference", getattr(oracle, f"{op}_reference"))
    if backend == "triton":
        reason = _triton_problem(op, x, policy)
        if reason is None:
            return Choice(f"{op}_triton", getattr(_module(_TRITON_MODULES[op]), f"{op}_triton"))
        _fall_back(op, reason)
    return _torch_choice(op, x)


__all__ = ["BACKENDS", "OPS", "Choice", "load_triton_ops", "require_runnable", "resolve_backend", "select", "triton_available"]
