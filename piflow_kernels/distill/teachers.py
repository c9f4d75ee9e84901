"""Teachers for pi-ID: an exact Gaussian-mixture teacher, a classifier-free-guidance wrapper and a
generic adapter for diffusers models (the mixture itself, :class:`GaussianMixtureData`, lives in
:mod:`.mixture` and is re-exported here).

A teacher is any callable ``teacher(x_t, timestep, **cond) -> velocity`` with ``x_t`` of shape
``(B, C, *S)``, ``timestep = sigma * num_train_timesteps`` of shape ``(B,)`` and the velocity
``u = eps - x0`` of the shape of ``x_t`` (rectified flow, ``x_t = (1 - sigma) x0 + sigma eps``).

    >>> data = GaussianMixtureData.random((3, 8, 8), num_components=4, std=0.1)
    >>> teacher = ExactGMTeacher(data)                 # the exact flow velocity of that data
    >>> x0 = data.sample(16)                           # (16, 3, 8, 8) exact samples
    >>> u = teacher(x_t, sigma * 1000)                 # (16, 3, 8, 8)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from piflow_kernels.checks import per_sample
from piflow_kernels.distill.mixture import GaussianMixtureData

__all__ = [
    "GaussianMixtureData",
    "ExactGMTeacher",
    "CFGTeacher",
    "DiffusersTeacher",
    "TiedTeacher",
    "as_velocity",
    "prediction_to_velocity",
]

def as_velocity(output: Any) -> torch.Tensor:
    """The velocity tensor of a model output: a tensor, an object with ``.sample`` (diffusers), or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("sample"), torch.Tensor):
        return output["sample"]
    raise TypeError(
        f"a teacher must return a velocity tensor, an object with a .sample tensor or a tuple whose first item is "
        f"the velocity; got {type(output).__name__}"
    )


class ExactGMTeacher(nn.Module):
    """The exact flow velocity of a :class:`GaussianMixtureData` as a teacher ``teacher(x_t, timestep, labels=None)``.

    ``sigma = timestep / num_train_timesteps``. With ``labels`` the velocity is that of the data
    conditioned on the class (the components carrying that label), without it the unconditional one.
    Has no parameters; computes in float64 and returns the dtype of ``x_t``.

    Example:
        >>> teacher = ExactGMTeacher(GaussianMixtureData.random((4, 8, 8), 8))
        >>> u = teacher(x_t, torch.full((B,), 700.0))
    """

    def __init__(self, data: GaussianMixtureData, num_train_timesteps: float = 1000) -> None:
        super().__init__()
        if not isinstance(data, GaussianMixtureData):
            raise TypeError(f"data must be a GaussianMixtureData, got {type(data).__name__}")
        if not num_train_timesteps > 0:
            raise ValueError(f"num_train_timesteps must be > 0, got {num_train_timesteps}")
        self.data = data
        self.num_train_timesteps = float(num_train_timesteps)

    def forward(self, x_t: torch.Tensor, timestep: float | torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, *shape), timestep float/0-d/(B,) -> velocity (B, *shape)."""
        sigma = per_sample("timestep", timestep, x_t.shape[0], dtype=torch.float64) / self.num_train_timesteps
        return self.data.velocity(x_t, sigma, labels)

    def extra_repr(self) -> str:
        return f"{self.data!r}, num_train_timesteps={self.num_train_timesteps:g}"


class CFGTeacher(nn.Module):
    """Classifier-free guidance around a teacher: ``v = v_uncond + g (v_cond - v_uncond)`` inside the interval.

    Outside ``guidance_interval`` the conditional velocity is returned unchanged (as the official
    code's ``guidance_interval`` does). With ``guidance_scale == 1`` or no sample inside the interval
    the unconditional branch is skipped.

    Args:
        model: a teacher ``model(x_t, timestep, **kwargs) -> velocity`` (or an output with ``.sample``).
        guidance_scale: g.
        guidance_interval: ``(lo, hi)``, inclusive, or None for everywhere. In noise-level units
            (sigma in [0, 1]) when ``interval_unit="sigma"`` (default), in the teacher's timestep units
            (``sigma * num_train_timesteps``) when ``interval_unit="timestep"``; e.g. the official ImageNet
            setting ``[0, 600]`` timesteps is ``(0.0, 0.6)`` in sigma.
        interval_unit: "sigma" or "timestep".
        num_train_timesteps: converts timesteps to sigma for ``interval_unit="sigma"``.
        cond_kwargs, uncond_kwargs: keyword arguments merged over the call's for the conditional and
            the unconditional branch (e.g. ``uncond_kwargs={"labels": None}`` for :class:`ExactGMTeacher`).
        negative_prefix: if set (e.g. "negative_"), call keywords starting with it are the unconditional
            branch's: the conditional branch gets the others, the unconditional one gets ``name`` from
            ``negative_name`` where given (text teachers: ``negative_encoder_hidden_states``).
        orthogonal_guidance: o in [0, 1]: the guidance term ``b = (g - 1)(v_cond - v_uncond)`` loses ``o`` times its
            projection on the conditional x0 prediction ``x0 = x_t - sigma v_cond``, per sample (the official
            ``orthogonal_guidance``: ``b -= o <b, x0> / max(<x0, x0>, 1e-6) x0`` with means over all but the batch).

    Example:
        >>> teacher = CFGTeacher(ExactGMTeacher(data), 3.0, (0.0, 0.6), uncond_kwargs={"labels": None})
        >>> u = teacher(x_t, t, labels=y)
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guidance_scale: float,
        guidance_interval: tuple[float, float] | None = None,
        interval_unit: str = "sigma",
        num_train_timesteps: float = 1000,
        cond_kwargs: Mapping[str, Any] | None = None,
        uncond_kwargs: Mapping[str, Any] | None = None,
        negative_prefix: str | None = None,
        orthogonal_guidance: float = 0.0,
    ) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        guidance_scale = float(guidance_scale)
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if interval_unit not in ("sigma", "timestep"):
            raise ValueError(f"interval_unit must be 'sigma' or 'timestep', got {interval_unit!r}")
        if not num_train_timesteps > 0:
            raise ValueError(f"num_train_timesteps must be > 0, got {num_train_timesteps}")
        if guidance_interval is not None:
            if len(guidance_interval) != 2:
                raise ValueError(f"guidance_interval must be (lo, hi), got {guidance_interval!r}")
            lo, hi = (float(v) for v in guidance_interval)
            if not lo <= hi:
                raise ValueError(f"guidance_interval must have lo <= hi, got {guidance_interval!r}")
            guidance_interval = (lo, hi)
        self.model = model
        self.guidance_scale = guidance_scale
        self.guidance_interval = guidance_interval
        self.interval_unit = interval_unit
        self.num_train_timesteps = float(num_train_timesteps)
        self.cond_kwargs = dict(cond_kwargs or {})
        self.uncond_kwargs = dict(uncond_kwargs or {})
        if negative_prefix is not None and (not isinstance(negative_prefix, str) or not negative_prefix):
            raise ValueError(f"negative_prefix must be a non-empty string or None, got {negative_prefix!r}")
        self.negative_prefix = negative_prefix
        orthogonal_guidance = float(orthogonal_guidance)
        if not 0.0 <= orthogonal_guidance <= 1.0:
            raise ValueError(f"orthogonal_guidance must lie in [0, 1], got {orthogonal_guidance}")
        self.orthogonal_guidance = orthogonal_guidance

    def guidance_active(self, timestep: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) bool: whether guidance applies to each sample at ``timestep``."""
        t = torch.as_tensor(timestep, dtype=torch.float64, device=device)
        t = t.expand(batch) if t.dim() == 0 else t.reshape(batch)
        if self.guidance_interval is None:
            return torch.ones(batch, dtype=torch.bool, device=device)
        value = t / self.num_train_timesteps if self.interval_unit == "sigma" else t
        lo, hi = self.guidance_interval
        return (value >= lo) & (value <= hi)

    def _branch_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        prefix = self.negative_prefix
        if prefix is None:
            return {**kwargs, **self.cond_kwargs}, {**kwargs, **self.uncond_kwargs}
        cond = {k: v for k, v in kwargs.items() if not k.startswith(prefix)}
        uncond = {**cond, **{k[len(prefix) :]: v for k, v in kwargs.items() if k.startswith(prefix)}}
        return {**cond, **self.cond_kwargs}, {**uncond, **self.uncond_kwargs}

    def forward(self, x_t: torch.Tensor, timestep: float | torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """x_t (B, C, *S), timestep float/0-d/(B,) -> guided velocity (B, C, *S)."""
        cond_kwargs, uncond_kwargs = self._branch_kwargs(kwargs)
        v_cond = as_velocity(self.model(x_t, timestep, **cond_kwargs))
        if self.guidance_scale == 1.0:
            return v_cond
        active = self.guidance_active(timestep, x_t.shape[0], x_t.device)
        if not bool(active.any()):
            return v_cond
        v_uncond = as_velocity(self.model(x_t, timestep, **uncond_kwargs))
        shape = (x_t.shape[0], *([1] * (v_cond.dim() - 1)))
        g = torch.where(active, self.guidance_scale, 1.0).to(v_cond.dtype).reshape(shape)
        if not self.orthogonal_guidance:
            return v_uncond + g * (v_cond - v_uncond)
        bias = (v_cond - v_uncond) * (g - 1)
        sigma = per_sample("timestep", timestep, x_t.shape[0], x_t.device, v_cond.dtype) / self.num_train_timesteps
        x0 = x_t.to(v_cond.dtype) - sigma.reshape(shape) * v_cond
        dims = tuple(range(1, v_cond.dim()))
        along = (bias * x0).mean(dims, keepdim=True) / (x0 * x0).mean(dims, keepdim=True).clamp(min=1e-6)
        return v_cond + bias - self.orthogonal_guidance * along * x0

    def extra_repr(self) -> str:
        return (
            f"guidance_scale={self.guidance_scale}, guidance_interval={self.guidance_interval}, unit={self.interval_unit!r}"
            + (f", orthogonal_guidance={self.orthogonal_guidance}" if self.orthogonal_guidance else "")
        )


_PARAMETERIZATIONS = ("velocity", "neg_velocity", "x0", "eps")


def prediction_to_velocity(
    pred: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, parameterization: str, eps: float = 1e-4
) -> torch.Tensor:
    """A model's prediction (B, C, *S) at ``x_t = (1 - sigma) x0 + sigma eps`` as the velocity ``u = eps - x0``.

    "velocity": ``pred`` is u; "neg_velocity": ``x0 - eps``; "x0": ``u = (x_t - x0) / sigma``; "eps":
    ``u = (eps - x_t) / (1 - sigma)``; ``sigma`` (B,), clamped at ``eps`` away from 0 / 1 where it divides.
    """
    if parameterization == "velocity":
        return pred
    if parameterization == "neg_velocity":
        return -pred
    if parameterization not in _PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {_PARAMETERIZATIONS}, got {parameterization!r}")
    sigma = sigma.to(pred.dtype).reshape(pred.shape[0], *([1] * (pred.dim() - 1)))
    if parameterization == "x0":
        return (x_t - pred) / sigma.clamp(min=eps)
    return (pred - x_t) / (1 - sigma).clamp(min=eps)


class DiffusersTeacher(nn.Module):
    """Adapter turning a diffusers-style model into a pi-ID teacher ``teacher(x_t, timestep, **cond) -> u``.

    Calls ``model(x_t, model_timestep, **model_kwargs, **cond)`` and reads ``.sample`` (or ``[0]``, or a
    bare tensor), then converts the prediction to the velocity ``u = eps - x0``:

    - ``"velocity"``: the model predicts ``eps - x0`` (SD3, FLUX, Wan flow-matching transformers);
    - ``"neg_velocity"``: the model predicts ``x0 - eps``;
    - ``"x0"``: ``u = (x_t - x0) / sigma``; ``"eps"``: ``u = (eps - x_t) / (1 - sigma)``.

    ``model_timestep = (num_train_timesteps - timestep if flip_timesteps else timestep) * timestep_scale /
    timestep_divisor``; e.g. FLUX transformers take sigma (``timestep_divisor = num_train_timesteps``, the
    division a FLUX student's trunk makes too, so the two agree bit for bit), DiT takes ``sigma * 1000``.
    ``dtype`` casts the model's input (e.g. bfloat16); the velocity comes back in the dtype of ``x_t``.

    ``teacher_class`` (a class of :data:`piflow_kernels.layouts.ARCHS`, e.g. "FluxTransformer2DModel") calls the
    model as its pipeline does, from image-layout ``x_t`` (B, C, H, W): FLUX / Qwen-Image get packed latents and
    their ids / shapes, by keyword (:func:`~piflow_kernels.layouts.native_inputs`), and the prediction comes back
    in image layout (a learned variance dropped). Without it, ``model(x_t, model_timestep, **cond)``.

    Example:
        >>> teacher = DiffusersTeacher(transformer, timestep_scale=1e-3, model_kwargs={"guidance": g})
    """

    def __init__(
        self,
        model: nn.Module | Callable[..., Any],
        parameterization: str = "velocity",
        num_train_timesteps: float = 1000,
        timestep_scale: float = 1.0,
        flip_timesteps: bool = False,
        dtype: torch.dtype | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        eps: float = 1e-4,
        teacher_class: str | None = None,
        timestep_divisor: float = 1.0,
    ) -> None:
        super().__init__()
        if parameterization not in _PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {_PARAMETERIZATIONS}, got {parameterization!r}")
        if not num_train_timesteps > 0:
            raise ValueError(f"num_train_timesteps must be > 0, got {num_train_timesteps}")
        self.model = model
        self.parameterization = parameterization
        self.num_train_timesteps = float(num_train_timesteps)
        self.timestep_scale = float(timestep_scale)
        self.flip_timesteps = bool(flip_timesteps)
        self.dtype = dtype
        self.model_kwargs = dict(model_kwargs or {})
        self.eps = float(eps)
        if not timestep_divisor > 0:
            raise ValueError(f"timestep_divisor must be > 0, got {timestep_divisor}")
        self.timestep_divisor = float(timestep_divisor)
        self.teacher_class = teacher_class
        self._geometry: tuple[int, int, int] | None = None
        if teacher_class is not None:
            from piflow_kernels.layouts import arch_for, geometry

            arch_for(teacher_class)  # a TypeError naming the supported classes
            self._geometry = geometry(teacher_class, model.config)

    def forward(self, x_t: torch.Tensor, timestep: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        """x_t (B, C, *S), timestep float/0-d/(B,) in [0, num_train_timesteps] -> velocity (B, C, *S)."""
        b = x_t.shape[0]
        t = per_sample("timestep", timestep, b, x_t.device)
        t_model = self.num_train_timesteps - t if self.flip_timesteps else t
        if self.timestep_scale != 1.0:
            t_model = t_model * self.timestep_scale
        if self.timestep_divisor != 1.0:
            t_model = t_model / self.timestep_divisor
        x_in = x_t if self.dtype is None else x_t.to(self.dtype)
        if self.dtype is not None:
            t_model = t_model.to(self.dtype)
        kwargs = {**self.model_kwargs, **cond}
        if self._geometry is None:
            pred = as_velocity(self.model(x_in, t_model, **kwargs))
        else:
            from piflow_kernels.layouts import native_inputs, native_prediction_to_image

            c, _, p = self._geometry
            call, hw = native_inputs(self.teacher_class, x_in, t_model, kwargs, p)
            raw = as_velocity(self.model(**call, return_dict=False))
            pred = native_prediction_to_image(self.teacher_class, raw, hw, p, c)
        sigma = t / self.num_train_timesteps
        return prediction_to_velocity(pred.float(), x_t.float(), sigma, self.parameterization, self.eps).to(x_t.dtype)

    def extra_repr(self) -> str:
        return (
            f"parameterization={self.parameterization!r}, timestep_scale={self.timestep_scale:g}, "
            f"flip_timesteps={self.flip_timesteps}"
        )


class TiedTeacher:
    """The teacher that a LoRA student carries: ``student(x_t, timestep, as_teacher=True, **cond)``.

    Not an ``nn.Module`` on purpose: it holds the (wrapped) student, and a teacher module's ``eval()`` /
    ``requires_grad_(False)`` must not reach the student. ``student`` may be the DDP / FSDP2 wrapper, so that the
    teacher runs on the weights that wrapper gathers. The prediction is converted to the velocity by
    ``parameterization`` (see :func:`prediction_to_velocity`); the student's trunk applies its own timestep
    convention.

        >>> teacher = TiedTeacher(ddp_student)
        >>> u = teacher(x_t, sigma * 1000, encoder_hidden_states=emb, pooled_projections=pooled)   # (B, C, H, W)
    """

    def __init__(self, student: Callable[..., Any], parameterization: str = "velocity", num_train_timesteps: float = 1000,
                 eps: float = 1e-4) -> None:  # fmt: skip
        if parameterization not in _PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {_PARAMETERIZATIONS}, got {parameterization!r}")
        self.student = student
        self.parameterization = parameterization
        self.num_train_timesteps = float(num_train_timesteps)
        self.eps = float(eps)

    def __call__(self, x_t: torch.Tensor, timestep: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        """x_t (B, C, H, W), timestep float/0-d/(B,) (sigma * num_train_timesteps) -> velocity (B, C, H, W)."""
        t = per_sample("timestep", timestep, x_t.shape[0], x_t.device)
        pred = self.student(x_t, t, as_teacher=True, **cond).float()
        sigma = t / self.num_train_timesteps
        return prediction_to_velocity(pred, x_t.float(), sigma, self.parameterization, self.eps).to(x_t.dtype)

    def __repr__(self) -> str:
        return f"TiedTeacher(parameterization={self.parameterization!r})"
