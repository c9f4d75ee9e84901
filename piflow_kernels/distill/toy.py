"""Tiny pi-Flow students for tests and demos: MLPs over the flattened latent with a sinusoidal time embedding.

``student(x_t, timestep) -> GMFlowOutput | DXOutput`` with ``x_t`` of shape (B, C, H, W) and
``timestep = sigma * num_train_timesteps`` of shape (B,). Fast on a CPU at small shapes.

    >>> student = ToyGMStudent(channels=3, height=8, width=8, num_components=4)
    >>> out = student(x_t, torch.full((B,), 800.0))      # GMFlowOutput
    >>> out.means.shape                                  # (B, 4, 3, 8, 8)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from piflow_kernels.checks import positive_float, positive_int
from piflow_kernels.outputs import DXOutput, GMFlowOutput

__all__ = ["sinusoidal_embedding", "ToyGMStudent", "ToyDXStudent"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style embedding of (B,) times in [0, 1000]: (B, dim) = [cos(t f_i), sin(t f_i)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class _ToyBackbone(nn.Module):
    def __init__(self, channels: int, height: int, width: int, hidden: int, time_dim: int, num_train_timesteps: float) -> None:
        super().__init__()
        channels, height, width = (positive_int(n, v) for n, v in (("channels", channels), ("height", height), ("width", width)))
        hidden, time_dim = positive_int("hidden", hidden), positive_int("time_dim", time_dim)
        self.channels, self.height, self.width = channels, height, width
        self.time_dim = time_dim
        self.num_train_timesteps = positive_float("num_train_timesteps", num_train_timesteps)
        dim = channels * height * width
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())

    def features(self, x_t: torch.Tensor, timestep: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden features (B, hidden), time embedding (B, time_dim))."""
        shape = (self.channels, self.height, self.width)
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != shape:
            raise ValueError(f"x_t must have shape (B, {', '.join(map(str, shape))}), got {tuple(x_t.shape)}")
        b = x_t.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=x_t.device)
        t = t.expand(b) if t.dim() == 0 else t.reshape(b)
        temb = sinusoidal_embedding(t * (1000.0 / self.num_train_timesteps), self.time_dim)
        h = self.body(self.inp(x_t.reshape(b, -1).to(self.inp.weight.dtype)) + self.time_mlp(temb.to(self.inp.weight.dtype)))
        return h, temb.to(h.dtype)


class ToyGMStudent(_ToyBackbone):
    """A GMFlow student: K velocity means per pixel, per-pixel log-weights, one log-std per sample.

    ``logstds`` come from a small MLP on the time embedding whose last bias is ``log(0.05)`` (the
    official GM heads' initial std); ``logweights`` are log-softmaxed over K.

    Args:
        channels, height, width: latent shape (C, H, W).
        num_components: K.
        hidden: width of the MLP.
        num_train_timesteps: timesteps are sigma * num_train_timesteps.
    """

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        num_components: int = 4,
        hidden: int = 128,
        time_dim: int = 64,
        num_train_timesteps: float = 1000,
        init_std: float = 0.05,
    ) -> None:
        super().__init__(channels, height, width, hidden, time_dim, num_train_timesteps)
        self.num_components = num_components = positive_int("num_components", num_components)
        pixels = height * width
        self.means_head = nn.Linear(hidden, num_components * channels * pixels)
        self.logweights_head = nn.Linear(hidden, num_components * pixels)
        self.logstd_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.logstd_mlp[-1].weight.mul_(0.1)
            self.logstd_mlp[-1].bias.fill_(math.log(init_std))

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor | float) -> GMFlowOutput:
        """x_t (B, C, H, W), timestep (B,) -> GMFlowOutput(means (B,K,C,H,W), logweights (B,K,1,H,W), logstds (B,1,1,1,1))."""
        h, temb = self.features(x_t, timestep)
        b, k, c, hh, ww = x_t.shape[0], self.num_components, self.channels, self.height, self.width
        means = self.means_head(h).reshape(b, k, c, hh, ww)
        logweights = torch.log_softmax(self.logweights_head(h).reshape(b, k, 1, hh, ww), dim=1)
        logstds = self.logstd_mlp(temb).reshape(b, 1, 1, 1, 1)
        return GMFlowOutput(means=means, logweights=logweights, logstds=logstds)


class ToyDXStudent(_ToyBackbone):
    """A DX student: velocities at N grid points over the segment, ``DXOutput(grid (B, N, C, H, W))``."""

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        num_points: int = 4,
        hidden: int = 128,
        time_dim: int = 64,
        num_train_timesteps: float = 1000,
    ) -> None:
        super().__init__(channels, height, width, hidden, time_dim, num_train_timesteps)
        self.num_points = num_points = positive_int("num_points", num_points)
        self.grid_head = nn.Linear(hidden, num_points * channels * height * width)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor | float) -> DXOutput:
        """x_t (B, C, H, W), timestep (B,) -> DXOutput(grid (B, N, C, H, W))."""
        h, _ = self.features(x_t, timestep)
        grid = self.grid_head(h).reshape(x_t.shape[0], self.num_points, self.channels, self.height, self.width)
        return DXOutput(grid=grid)
