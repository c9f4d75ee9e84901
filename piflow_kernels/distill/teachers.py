"""Teachers for pi-ID: an exact Gaussian-mixture teacher, a classifier-free-guidance wrapper and a
generic adapter for diffusers models.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["GaussianMixtureData", "ExactGMTeacher", "CFGTeacher", "DiffusersTeacher", "as_velocity"]

# the per-component variance of x_t, a^2 std^2 + sigma^2, is floored at VAR_MIN: the formula is exact and
# finite at sigma = 0 for components with std > 0, the floor only matters for point masses (std = 0) at sigma = 0
VAR_MIN = 1e-12


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


def _per_sample(value: float | torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """A float, 0-d, (B,) or (B, 1, ..., 1) tensor as a (B,) float64 CPU-or-device tensor."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got bool")
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() == 0:
        return t.expand(batch)
    if t.numel() == batch and t.shape[0] == batch:
        return t.reshape(batch)
    raise ValueError(f"{name} must be a float, a 0-d tensor or a ({batch},) tensor, got shape {tuple(t.shape)}")


class GaussianMixtureData:
    """A mixture of isotropic Gaussians over whole samples (vectors or images), with its exact flow velocity.

    ``x0 ~ sum_m w_m N(means_m, stds_m^2 I)``. Under ``x_t = (1 - s) x0 + s eps`` each component gives
    ``x_t | m ~ N(a mu_m, v_m I)`` with ``a = 1 - s``, ``v_m = a^2 std_m^2 + s^2``, and the velocity
    ``E[eps - x0 | x_t, m] = (x_t (s - a std_m^2) - s mu_m) / v_m`` (finite at s = 0 and s = 1). The
    exact velocity is its average under the posterior over components. All math runs in float64.

    Args:
        means: (M, *shape) component means; shape is (D,) for vectors or (C, H, W) / (C, T, H, W) for images.
        stds: a float or (M,) per-component standard deviations (>= 0).
        weights: (M,) positive mixture weights (normalised here); None for uniform.
        labels: (M,) int class of each component, for class-conditional velocities; None gives each
            component its own class (label m = component m).

    Example:
        >>> data = GaussianMixtureData(torch.randn(3, 2), 0.2)
        >>> x0 = data.sample(1000, generator=torch.Generator().manual_seed(0))   # (1000, 2)
        >>> u = data.velocity(0.5 * x0 + 0.5 * torch.randn_like(x0), 0.5)       # (1000, 2)
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: float | torch.Tensor,
        weights: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(means, torch.Tensor) or not means.is_floating_point():
            raise TypeError(f"means must be a floating-point tensor of shape (M, *shape), got {type(means).__name__}")
        if means.dim() < 2 or means.shape[0] < 1 or means.numel() == 0:
            raise ValueError(f"means must have shape (M, *shape) with M >= 1, got {tuple(means.shape)}")
        m = means.shape[0]
        means = means.detach().to("cpu", torch.float64)
        stds_t = torch.as_tensor(stds, dtype=torch.float64).detach().cpu()
        if stds_t.dim() == 0:
            stds_t = stds_t.expand(m).clone()
        if stds_t.shape != (m,):
            raise ValueError(f"stds must be a float or a ({m},) tensor, got shape {tuple(stds_t.shape)}")
        if not bool(torch.isfinite(stds_t).all()) or bool((stds_t < 0).any()):
            raise ValueError(f"stds must be finite and >= 0, got {stds_t.tolist()[:8]}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        if weights is None:
            weights_t = torch.full((m,), 1.0 / m, dtype=torch.float64)
        else:
            weights_t = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
            if weights_t.shape != (m,):
                raise ValueError(f"weights must have shape ({m},), got {tuple(weights_t.shape)}")
            if not bool(torch.isfinite(weights_t).all()) or bool((weights_t <= 0).any()):
                raise ValueError(f"weights must be finite and > 0, got {weights_t.tolist()[:8]}")
            weights_t = weights_t / weights_t.sum()
        if labels is None:
            labels_t = torch.arange(m)
        else:
            labels_t = torch.as_tensor(labels).detach().cpu()
            if labels_t.shape != (m,) or labels_t.is_floating_point():
                raise ValueError(
                    f"labels must be an integer tensor of shape ({m},), got {labels_t.dtype} {tuple(labels_t.shape)}"
                )
            labels_t = labels_t.long()
        self.means = means
        self.stds = stds_t
        self.weights = weights_t
        self.labels = labels_t
        self._cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def random(
        cls,
        shape: Sequence[int],
        num_components: int = 4,
        spread: float = 1.0,
        std: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> GaussianMixtureData:
        """A mixture with ``num_components`` means drawn from N(0, spread^2 I), equal stds and uniform weights."""
        shape = tuple(int(d) for d in shape)
        means = spread * torch.randn((num_components, *shape), generator=generator, dtype=torch.float64)
        return cls(means, std)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample (without the batch dimension)."""
        return tuple(self.means.shape[1:])

    @property
    def dim(self) -> int:
        """D, the number of entries of one sample."""
        return math.prod(self.shape)

    def mean(self) -> torch.Tensor:
        """E[x0], shape ``self.shape``, float64."""
        return torch.einsum("m,m...->...", self.weights, self.means)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._cache:
            mu = self.means.reshape(self.num_components, -1).to(device)
            self._cache[device] = (
                mu,
                (mu * mu).sum(1),
                self.stds.to(device) ** 2,
                self.weights.log().to(device),
                self.labels.to(device),
            )
        return self._cache[device]

    def _check_x(self, x: torch.Tensor, name: str = "x_t") -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{name} must have shape (n, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")

    def posterior_logits(
        self, x_t: torch.Tensor, sigma: float | torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unnormalised log posterior over components, (n, M) float64 (``-inf`` for other classes when ``labels``)."""
        self._check_x(x_t)
        n = x_t.shape[0]
        mu, mu_sq, var, logw, comp_labels = self._on(x_t.device)
        s = _per_sample(sigma, n, "sigma").to(x_t.device).clamp(0.0, 1.0)[:, None]  # (n, 1)
        a = 1.0 - s
        x = x_t.reshape(n, -1).to(torch.float64)
        v = (a**2 * var[None] + s**2).clamp(min=VAR_MIN)  # (n, M)
        # ||x - a mu||^2 = ||x||^2 - 2 a x.mu + a^2 ||mu||^2 (float64 keeps the cancellation harmless)
        dist2 = ((x * x).sum(1, keepdim=True) - 2 * a * (x @ mu.T) + a**2 * mu_sq[None]).clamp(min=0.0)
        logits = logw[None] - 0.5 * self.dim * torch.log(v) - 0.5 * dist2 / v
        if labels is not None:
            labels = torch.as_tensor(labels, device=x_t.device).reshape(-1)
            if labels.shape[0] != n:
                raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
            match = comp_labels[None] == labels[:, None].long()
            if not bool(match.any(1).all()):
                classes = comp_labels.unique().tolist()
                raise ValueError(f"labels {labels.tolist()[:8]} name a class with no component (classes: {classes})")
            logits = logits.masked_fill(~match, float("-inf"))
        return logits

    def velocity(self, x_t: torch.Tensor, sigma: float | torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact flow velocity E[eps - x0 | x_t] at noise level ``sigma`` (float, 0-d or (n,)).

        Args:
            x_t: (n, *shape) noisy samples.
            sigma: noise level, clamped to [0, 1].
            labels: optional (n,) class labels: the velocity of the data conditioned on that class.
        Returns:
            (n, *shape) in the dtype of ``x_t``.
        """
        logits = self.posterior_logits(x_t, sigma, labels)
        n = x_t.shape[0]
        mu, _, var, _, _ = self._on(x_t.device)
        s = _per_sample(sigma, n, "sigma").to(x_t.device).clamp(0.0, 1.0)[:, None]
        a = 1.0 - s
        x = x_t.reshape(n, -1).to(torch.float64)
        post = torch.softmax(logits, dim=1)  # (n, M)
        v = (a**2 * var[None] + s**2).clamp(min=VAR_MIN)
        # u = sum_m p_m (x (s - a std_m^2) - s mu_m) / v_m
        u = x * (post * (s - a * var[None]) / v).sum(1, keepdim=True) - s * ((post / v) @ mu)
        return u.reshape(x_t.shape).to(x_t.dtype)

    def posterior_mean(self, x_t: torch.Tensor, sigma: float | torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t] = x_t - sigma * u, (n, *shape) in the dtype of ``x_t``."""
        n = x_t.shape[0]
        s = _per_sample(sigma, n, "sigma").to(x_t.device).clamp(0.0, 1.0)
        u = self.velocity(x_t.to(torch.float64), sigma, labels)
        x0 = x_t.to(torch.float64) - s.reshape(n, *([1] * (x_t.dim() - 1))) * u
        return x0.to(x_t.dtype)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        return_components: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Exact samples, (n, *shape). Draws on the CPU (from ``generator``), then moves to ``device``.

        Args:
            labels: optional (n,) classes: sample i is drawn from the components of class labels[i].
            return_components: also return the (n,) component index of each sample.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("GaussianMixtureData.sample draws on the CPU: pass a CPU torch.Generator")
        if labels is None:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            labels = torch.as_tensor(labels).reshape(-1).cpu().long()
            if labels.shape[0] != n:
                raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
            probs = self.weights[None] * (self.labels[None] == labels[:, None])
            if not bool((probs.sum(1) > 0).all()):
                raise ValueError("labels name a class with no component")
            comp = torch.multinomial(probs, 1, replacement=True, generator=generator)[:, 0]
        eps = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        x0 = self.means[comp] + self.stds[comp].reshape(n, *([1] * len(self.shape))) * eps
        x0 = x0.to(device=device, dtype=dtype)
        return (x0, comp) if return_components else x0

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The defining tensors (float64, CPU), e.g. to save with safetensors."""
        return {"means": self.means, "stds": self.stds, "weights": self.weights, "labels": self.labels}

    def __repr__(self) -> str:
        lo, hi = float(self.stds.min()), float(self.stds.max())
        return f"GaussianMixtureData(M={self.num_components}, shape={self.shape}, stds in [{lo:.3g}, {hi:.3g}])"


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
        sigma = _per_sample(timestep, x_t.shape[0], "timestep") / self.num_train_timesteps
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

    def guidance_active(self, timestep: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) bool: whether guidance applies to each sample at ``timestep``."""
        t = torch.as_tensor(timestep, dtype=torch.float64, device=device)
        t = t.expand(batch) if t.dim() == 0 else t.reshape(batch)
        if self.guidance_interval is None:
            return torch.ones(batch, dtype=torch.bool, device=device)
        value = t / self.num_train_timesteps if self.interval_unit == "sigma" else t
        lo, hi = self.guidance_interval
        return (value >= lo) & (value <= hi)

    def forward(self, x_t: torch.Tensor, timestep: float | torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """x_t (B, C, *S), timestep float/0-d/(B,) -> guided velocity (B, C, *S)."""
        v_cond = as_velocity(self.model(x_t, timestep, **{**kwargs, **self.cond_kwargs}))
        if self.guidance_scale == 1.0:
            return v_cond
        active = self.guidance_active(timestep, x_t.shape[0], x_t.device)
        if not bool(active.any()):
            return v_cond
        v_uncond = as_velocity(self.model(x_t, timestep, **{**kwargs, **self.uncond_kwargs}))
        g = torch.where(active, self.guidance_scale, 1.0).to(v_cond.dtype)
        g = g.reshape(x_t.shape[0], *([1] * (v_cond.dim() - 1)))
        return v_uncond + g * (v_cond - v_uncond)

    def extra_repr(self) -> str:
        return f"guidance_scale={self.guidance_scale}, guidance_interval={self.guidance_interval}, unit={self.interval_unit!r}"


_PARAMETERIZATIONS = ("velocity", "neg_velocity", "x0", "eps")


class DiffusersTeacher(nn.Module):
    """Adapter turning a diffusers-style model into a pi-ID teacher ``teacher(x_t, timestep, **cond) -> u``.

    Calls ``model(x_t, model_timestep, **model_kwargs, **cond)`` and reads ``.sample`` (or ``[0]``, or a
    bare tensor), then converts the prediction to the velocity ``u = eps - x0``:

    - ``"velocity"``: the model predicts ``eps - x0`` (SD3, FLUX, Wan flow-matching transformers);
    - ``"neg_velocity"``: the model predicts ``x0 - eps``;
    - ``"x0"``: ``u = (x_t - x0) / sigma``; ``"eps"``: ``u = (eps - x_t) / (1 - sigma)``.

    ``model_timestep = (num_train_timesteps - timestep if flip_timesteps else timestep) * timestep_scale``;
    e.g. FLUX transformers take sigma (``timestep_scale = 1 / num_train_timesteps``), DiT takes
    ``sigma * 1000``. ``dtype`` casts the model's input (e.g. bfloat16); the velocity comes back in
    the dtype of ``x_t``.

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

    def forward(self, x_t: torch.Tensor, timestep: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        """x_t (B, C, *S), timestep float/0-d/(B,) in [0, num_train_timesteps] -> velocity (B, C, *S)."""
        b = x_t.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=x_t.device)
        t = t.expand(b) if t.dim() == 0 else t.reshape(b)
        t_model = (self.num_train_timesteps - t if self.flip_timesteps else t) * self.timestep_scale
        x_in = x_t if self.dtype is None else x_t.to(self.dtype)
        if self.dtype is not None:
            t_model = t_model.to(self.dtype)
        pred = as_velocity(self.model(x_in, t_model, **{**self.model_kwargs, **cond})).float()
        if self.parameterization == "velocity":
            u = pred
        elif self.parameterization == "neg_velocity":
            u = -pred
        else:
            sigma = (t / self.num_train_timesteps).reshape(b, *([1] * (x_t.dim() - 1)))
            if self.parameterization == "x0":
                u = (x_t.float() - pred) / sigma.clamp(min=self.eps)
            else:
                u = (pred - x_t.float()) / (1 - sigma).clamp(min=self.eps)
        return u.to(x_t.dtype)

    def extra_repr(self) -> str:
        return (
            f"parameterization={self.parameterization!r}, timestep_scale={self.timestep_scale:g}, "
            f"flip_timesteps={self.flip_timesteps}"
        )
