"""Input checks, in one place: clear errors naming the argument (or config key) and what it must be.

The policies, the scheduler, the students, the trainer and the benchmarks all validate through these, so a
rule (what counts as an int, a positive number, a per-sample value) is written once. numpy scalars count
as Python numbers wherever a number is accepted.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch

SigmaLike = float | int | torch.Tensor


def is_int(value: object) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite Python or numpy real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def as_float(name: str, value: object, positive: bool = False) -> float:
    """``value`` (a Python or numpy real, or a 0-d tensor, read with ``float()``: a host sync on CUDA) as a finite
    float: a ``TypeError`` naming ``name`` for anything that is not a number, a ``ValueError`` for inf or NaN
    (and, with ``positive``, for a value <= 0)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = float(value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite number, got {value}")
    return float(value)


def positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1, else a ``ValueError`` naming ``name``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def positive_float(name: str, value: object) -> float:
    """``value`` as a positive finite float, else a ``ValueError`` naming ``name``. 0-d tensors are read
    with ``float()`` (a host sync on CUDA: for settings, not for the hot path)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = float(value)
    if not is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def per_sample(
    name: str,
    value: float | torch.Tensor,
    batch: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A number, a 0-d, (B,) or (B, 1, ..., 1) tensor as a (B,) tensor of ``dtype`` (on ``device`` if given).

    A number becomes a fill on the device (``torch.as_tensor`` of a Python number on a GPU is a host-to-device
    copy that waits for the device); a 0-d tensor is expanded (a view); any other shape raises a ``ValueError``
    naming ``name``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got bool")
    if is_real(value):
        return torch.full((batch,), float(value), dtype=dtype, device=device)
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(batch)
    if t.numel() == batch and t.shape[0] == batch:
        return t.reshape(batch)
    raise ValueError(f"{name} must be a float, a 0-d tensor or a ({batch},) tensor, got shape {tuple(t.shape)}")


def check_float_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {t.dtype}")
    return t


def check_latent(name: str, x: object) -> torch.Tensor:
    x = check_float_tensor(name, x)
    if x.dim() not in (4, 5):
        raise ValueError(f"{name} must have shape (B, C, H, W) or (B, C, T, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{name} has no elements (shape {tuple(x.shape)})")
    return x


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None], what: str) -> None:
    """``expected`` may hold None for a free dimension; ``what`` spells the expected shape for the message."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def as_sigma(name: str, sigma: SigmaLike, batch: int, device: torch.device) -> torch.Tensor:
    """A Python float, 0-d or (B,) tensor as a (B,) float32 tensor on ``device``.

    Values must lie in [0, 1]; the range is checked for floats and CPU tensors (checking a CUDA
    tensor would synchronise the host, which the sampling path never does).
    """
    if isinstance(sigma, bool):
        raise TypeError(f"{name} must be a float or a tensor, got bool")
    if isinstance(sigma, numbers.Real):
        value = float(sigma)
        if not (0.0 <= value <= 1.0) or math.isnan(value):
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
        return torch.full((batch,), value, dtype=torch.float32, device=device)
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"{name} must be a float, a 0-d tensor or a (B,) tensor, got {type(sigma).__name__}")
    if sigma.dim() == 0:
        sigma = sigma.expand(batch)
    elif sigma.dim() != 1 or sigma.shape[0] != batch:
        # also accept (B, 1, ..., 1), the official code's habit
        if sigma.shape[0] == batch and sigma.numel() == batch:
            sigma = sigma.reshape(batch)
        else:
            raise ValueError(f"{name} must be a float, a 0-d tensor or a ({batch},) tensor, got shape {tuple(sigma.shape)}")
    if sigma.device != device:
        if sigma.device.type == "cpu" and sigma.numel() == batch:
            sigma = sigma.to(device, non_blocking=True)
        else:
            raise ValueError(f"{name} is on {sigma.device} but the policy is on {device}")
    if sigma.device.type == "cpu" and not torch.compiler.is_compiling():
        check_unit_interval(name, sigma)
    return sigma.to(torch.float32)


def check_unit_interval(name: str, sigma: torch.Tensor) -> None:
    """A ``ValueError`` naming ``name`` unless every entry lies in [0, 1] (NaN does not)."""
    bad = ~((sigma >= 0) & (sigma <= 1))
    if bool(bad.any()):
        raise ValueError(f"{name} must lie in [0, 1], got {sigma[bad][:4].tolist()}")


def count(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``: a ``TypeError`` naming ``name`` for a non-integer, else a ``ValueError``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_total_substeps(total_substeps: object) -> int:
    """Substeps per unit raw time of a rollout, an int >= 1."""
    return count("total_substeps", total_substeps)


# ----------------------------------------------------------------------------------------------
# data checks: values of tensors, not their shapes (each reads a device value on the host)
# ----------------------------------------------------------------------------------------------

ENV_VALIDATE = "PIFLOW_VALIDATE"


def validation_on(validate: bool | None, device: torch.device) -> bool:
    """Whether the data checks below run for tensors on ``device``.

    ``PIFLOW_VALIDATE=1`` forces them on and ``0`` off everywhere; otherwise ``validate`` decides, and None
    means on for CPU tensors and off elsewhere (on CUDA each check is a host sync). Always off while
    ``torch.compile`` traces: a data-dependent branch would break the graph.
    """
    if torch.compiler.is_compiling():
        return False
    env = os.environ.get(ENV_VALIDATE, "").strip()
    if env == "1":
        return True
    if env == "0":
        return False
    if env:
        raise ValueError(f"{ENV_VALIDATE} must be 0 or 1 (or unset), got {env!r}")
    if validate is None:
        return device.type == "cpu"
    return validate


def check_validate(validate: object) -> bool | None:
    """The ``validate=`` switch: None (auto), True or False."""
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"validate must be None, True or False, got {type(validate).__name__}")
    return validate


def _examples(t: torch.Tensor, bad: torch.Tensor) -> str:
    return f"{int(bad.sum())} of {t.numel()} entries, e.g. {t[bad][:4].tolist()}"


def check_finite(name: str, t: torch.Tensor) -> None:
    """A ``ValueError`` naming ``name`` when ``t`` holds NaN or +-inf."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite, got {_examples(t, bad)}")


def check_logweights(name: str, t: torch.Tensor, dim: int = 1) -> None:
    """Log-weights: each entry finite or -inf, and at least one finite entry along ``dim`` (the components)
    everywhere else; a ``ValueError`` naming ``name`` otherwise (an all--inf mixture has no softmax)."""
    bad = torch.isnan(t) | (t == math.inf)
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite or -inf, got {_examples(t, bad)}")
    empty = ~torch.isfinite(t).any(dim)
    if bool(empty.any()):
        raise ValueError(
            f"{name} must have a finite entry along dim {dim} (a component) at every position, but "
            f"{int(empty.sum())} of {empty.numel()} positions have every component at -inf"
        )


def check_sigma_at_most(name: str, sigma: torch.Tensor, bound_name: str, bound: torch.Tensor, rtol: float = 0.0) -> None:
    """(B,) ``sigma <= bound * (1 + rtol)`` per sample, else a ``ValueError`` naming both."""
    bad = sigma > bound * (1.0 + rtol)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} must not exceed {bound_name}, got {name} = {float(sigma[i])} > {bound_name} = {float(bound[i])} "
            f"(sample {i}; {int(bad.sum())} of {bad.numel()} samples)"
        )
