"""The one place that decides which implementation runs a policy op.

``backend=None`` (auto) picks ``"triton"`` for CUDA tensors when Triton imports, and the fast CPU
path ``"torch"`` otherwise. The environment variable ``PIFLOW_BACKEND`` overrides the auto choice
(not an explicit argument). ``"triton"`` on CPU tensors runs the kernels in Triton's interpreter,
which needs ``TRITON_INTERPRET=1`` set before the first kernel module is imported.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "triton", "reference")
ENV_BACKEND = "PIFLOW_BACKEND"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports (Linux x86_64 installs bring it)."""
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
