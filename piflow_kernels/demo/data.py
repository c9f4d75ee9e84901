"""The demo's problem: a Gaussian mixture over 8x8 template pictures, and the exact teacher's Euler sampler.

    >>> data = demo_data()                               # GaussianMixtureData over (1, 8, 8)
    >>> x = teacher_euler(data, noise, steps=128)        # the teacher's own sampler, the baseline

Whether a sample is one template or another is decided jointly by all pixels, while a GMFlow policy
is a mixture per pixel: the students must learn to make the pixels agree.
"""

from __future__ import annotations

import torch

from piflow_kernels.distill.mixture import GaussianMixtureData

__all__ = ["TEMPLATE_WEIGHTS", "PIXEL_STD", "template_images", "demo_data", "teacher_euler"]

# the mixture: template pictures in [-0.9, 0.9], per-pixel noise std, unequal weights
TEMPLATE_WEIGHTS = (3.0, 3.0, 2.0, 2.0, 1.5, 1.5, 1.0, 1.0)
PIXEL_STD = 0.2


def template_images(channels: int = 1, size: int = 8) -> torch.Tensor:
    """Eight template pictures: bars, a diagonal, a ring, a square, a cross, a checkerboard, a dot.

    Foreground pixels are +0.9 (per-channel tints for ``channels`` > 1), background -0.9.

    Returns:
        (8, channels, size, size) float64.
    """
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    c = (size - 1) / 2
    r = ((yy - c) ** 2 + (xx - c) ** 2).sqrt()
    half = size / 8  # bar half-width 1 at size 8
    masks = [
        (yy - c).abs() < half + 0.1,  # horizontal bar
        (xx - c).abs() < half + 0.1,  # vertical bar
        (yy - xx).abs() < half + 0.1,  # diagonal
        (r - 0.33 * size).abs() < 0.1 * size,  # ring
        ((yy - c).abs() < 0.33 * size) & ((xx - c).abs() < 0.33 * size),  # square
        ((yy - xx).abs() < 0.6) | ((yy + xx - (size - 1)).abs() < 0.6),  # cross
        ((yy // (size // 4) + xx // (size // 4)) % 2 == 0),  # checkerboard
        r < 0.23 * size,  # dot
    ]
    tints = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.4, 1.0], [1.0, 1.0, 0.2],
                          [0.2, 1.0, 1.0], [1.0, 0.3, 1.0], [1.0, 1.0, 1.0], [1.0, 0.6, 0.1]], dtype=torch.float64)  # fmt: skip
    out = []
    for k, mask in enumerate(masks):
        fg = torch.ones(channels, dtype=torch.float64) if channels == 1 else tints[k, :channels] * 2 - 1
        img = torch.where(mask[None], 0.9 * fg[:, None, None], torch.full((channels, size, size), -0.9, dtype=torch.float64))
        out.append(img)
    return torch.stack(out)


def demo_data(channels: int = 1, size: int = 8) -> GaussianMixtureData:
    """The demo's data: the eight templates, per-pixel std 0.2, weights 3:3:2:2:1.5:1.5:1:1."""
    return GaussianMixtureData(template_images(channels, size), PIXEL_STD, torch.tensor(TEMPLATE_WEIGHTS, dtype=torch.float64))


@torch.no_grad()
def teacher_euler(data: GaussianMixtureData, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The teacher's Euler sampler: ``steps`` uniform steps in sigma from 1 to 0 of the exact velocity.

    Args:
        noise: (B, C, H, W) at sigma = 1. Returns (B, C, H, W) float32.
    """
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x = noise.double()
    for i in range(steps):
        x = x + data.velocity(x, float(sigmas[i])) * float(sigmas[i + 1] - sigmas[i])
    return x.float()
