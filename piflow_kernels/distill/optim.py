"""The optimizer of the trainer and the demo: AdamW, fused where the build and the parameters allow.

    >>> opt = make_adamw(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    >>> opt.defaults["fused"]      # True on CPU / CUDA float parameters
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # builds without torch.distributed
        return False
    return isinstance(p, DTensor)


def make_adamw(
    params: Iterable[torch.Tensor],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW with the single-kernel (fused) step where every parameter is a plain floating-point tensor on
    a device the build has fused kernels for, else the default multi-tensor step. The update is the
    same AdamW either way (to float32 rounding); fused is much cheaper per step for many small
    tensors: on a 2-core CPU, 0.7 ms against 26 ms for a ~0.6M-parameter toy student. Sharded (DTensor)
    parameters keep the default step."""
    params = list(params)
    kwargs = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
    if params and not any(_is_dtensor(p) for p in params) and all(p.is_floating_point() for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # no fused kernels for this device / dtype in this build
            pass
    return torch.optim.AdamW(params, **kwargs)
