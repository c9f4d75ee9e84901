"""FlowMapSDE sampler schedule and re-noising step (docs/design.md#flowmapsde-sampler)."""

import numpy as np
import torch

from .timesteps import warp


def flowmap_sde_sigmas(num_steps, shift=1.0, final_step_size_scale=1.0, min_raw_t=0.0, max_raw_t=1.0, raw_sigmas=None):
    """sigmas (num_steps + 1,) float64: warp of the raw grid, then 0.

    The raw grid: ``raw_sigmas`` if given (num_steps is then ignored), else n points from max_raw_t spaced
    (max_raw_t - min_raw_t) / (n - 1 + f), i.e. linspace(1, (f-1)/(n+f-1), n, endpoint=False) for the range [0, 1].
    Implements [eq:flowmap-sigmas] (docs/design.md#flowmapsde-sampler).
    """
    if raw_sigmas is not None:
        raw = np.asarray(raw_sigmas, dtype=np.float64)
    else:
        f = final_step_size_scale
        step = (max_raw_t - min_raw_t) / (num_steps - 1 + f)
        raw = (max_raw_t - step * np.arange(num_steps)).clip(min=0)
    sigmas = warp(torch.from_numpy(raw), shift)
    return torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)])


def flowmap_sde_dst(sigma_src, sigma_to, h, eps=1e-6):
    """(sigma_dst, m): where the policy rollout stops, and the re-noising factor m.

    h = 0: m = 1 (deterministic, sigma_dst = sigma_to); h = 'inf': m = 0;
    else m = (sigma_to * a_src / (sigma_src * a_to)) ** (h^2).
    Implements the m and sigma_dst lines of [eq:flowmap-sde] (docs/design.md#flowmapsde-sampler).
    """
    a_src, a_to = 1 - sigma_src, 1 - sigma_to
    if h == "inf":
        m = 0.0 * sigma_to
    elif h == 0:
        m = 1.0 + 0.0 * sigma_to
    else:
        m = (sigma_to * a_src / max(sigma_src * a_to, eps)) ** (h * h)
    sigma_dst = sigma_to * m / max(a_to + sigma_to * m, eps)
    return sigma_dst, m


def flowmap_sde_step(x_dst, sigma_to, m, noise):
    """x_next = (a_to + s_to * m) * x_dst + s_to * sqrt(1 - m^2) * noise.

    Implements the x_next line of [eq:flowmap-sde] (docs/design.md#flowmapsde-sampler).
    """
    a_to = 1 - sigma_to
    return (a_to + sigma_to * m) * x_dst + sigma_to * max(1 - m * m, 0.0) ** 0.5 * noise
