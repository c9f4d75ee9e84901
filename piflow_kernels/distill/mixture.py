"""Gaussian-mixture data with its exact flow velocity: the ground truth of the exact teacher, the tests and the demo.

    >>> data = GaussianMixtureData.random((3, 8, 8), num_components=4, std=0.1)
    >>> x0 = data.sample(16)                           # (16, 3, 8, 8) exact samples
    >>> u = data.velocity(x_t, 0.5)                    # (16, 3, 8, 8) E[eps - x0 | x_t] at sigma = 0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from piflow_kernels.checks import per_sample, positive_int

__all__ = ["GaussianMixtureData"]

# the per-component variance of x_t, a^2 std^2 + sigma^2, is floored at VAR_MIN: the formula is exact and
# finite at sigma = 0 for components with std > 0, the floor only matters for point masses (std = 0) at sigma = 0
VAR_MIN = 1e-12


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
        s = per_sample("sigma", sigma, n, dtype=torch.float64).to(x_t.device).clamp(0.0, 1.0)[:, None]  # (n, 1)
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
        s = per_sample("sigma", sigma, n, dtype=torch.float64).to(x_t.device).clamp(0.0, 1.0)[:, None]
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
        s = per_sample("sigma", sigma, n, dtype=torch.float64).to(x_t.device).clamp(0.0, 1.0)
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
        n = positive_int("n", n)
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
