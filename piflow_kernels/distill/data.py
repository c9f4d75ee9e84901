"""Data sources of data-dependent pi-ID: where the x0 of a micro-batch comes from.

A source is any object with ``draw(n, generator, iteration, shard, num_shards) -> (x0, labels)``:
``x0`` (n, C, H, W) on the CPU, ``labels`` (n,) long or None. Sources are stateless in the step, so
a resumed run and any sharding draw exactly what an uninterrupted single-process run would.

    >>> source = ExactDataSource(GaussianMixtureData.random((4, 8, 8), 8))   # fresh exact samples
    >>> source = build_data_source(cfg, exact_data=None)                     # as [data] configures
    >>> x0, labels = source.draw(16, generator, iteration=0, shard=0, num_shards=1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from piflow_kernels.distill.config import ConfigError, TrainConfig
from piflow_kernels.distill.mixture import GaussianMixtureData
from piflow_kernels.distill.seeding import PURPOSE_DATA_EPOCH, seeded_generator, stream_seed
from piflow_kernels.files import load_safetensors, torch_load

__all__ = ["DataSource", "ExactDataSource", "TensorDataSource", "exact_mixture", "load_tensors", "build_data_source"]


class DataSource(Protocol):
    def draw(
        self, n: int, generator: torch.Generator, iteration: int, shard: int, num_shards: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class ExactDataSource:
    """x0 drawn from an exact mixture (:class:`GaussianMixtureData`), fresh samples from ``generator`` every draw."""

    def __init__(self, data: GaussianMixtureData) -> None:
        self.data = data

    def draw(
        self, n: int, generator: torch.Generator, iteration: int, shard: int, num_shards: int
    ) -> tuple[torch.Tensor, None]:
        """(n, *data.shape) float32 CPU samples, no labels."""
        return self.data.sample(n, generator=generator), None


class TensorDataSource:
    """x0 from a tensor (N, C, H, W), in epochs of seeded permutations, sharded like DistributedSampler.

    Global stream position p of shard ``shard`` at step ``iteration`` is
    ``(iteration * num_shards + shard) * n + i``; epoch ``p // N`` uses the permutation seeded by
    ``(seed, epoch)``. Stateless, so resume and any sharding see the same stream.
    """

    def __init__(self, x0: torch.Tensor, labels: torch.Tensor | None, seed: int) -> None:
        self.x0 = x0
        self.labels = labels
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # a step spans at most two epochs: keep a few, not all
                self._perms.clear()
            g = seeded_generator(stream_seed(self.seed, epoch, 0, PURPOSE_DATA_EPOCH))
            self._perms[epoch] = torch.randperm(self.x0.shape[0], generator=g)
        return self._perms[epoch]

    def draw(
        self, n: int, generator: torch.Generator | None, iteration: int, shard: int, num_shards: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, C, H, W) rows of x0 and their (n,) labels (or None); ``generator`` is not used."""
        size = self.x0.shape[0]
        start = (iteration * num_shards + shard) * n
        # positions as Python ints: the indices are read from no tensor
        idx = torch.stack([self._perm(p // size)[p % size] for p in range(start, start + n)])
        labels = None if self.labels is None else self.labels[idx]
        return self.x0[idx], labels


def exact_mixture(cfg: TrainConfig) -> GaussianMixtureData:
    """The mixture of ``[teacher]`` (num_modes, mode_scale, std, seed) over the latent shape of ``[data]``."""
    t, d = cfg.teacher, cfg.data
    return GaussianMixtureData.random(
        (d.channels, d.height, d.width),
        num_components=t.num_modes,
        spread=t.mode_scale,
        std=t.std,
        generator=seeded_generator(t.seed),
    )


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a .pt file holding a tensor (read as ``x0``) or a dict of them."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config key data.path: no file {path!r}")
    if p.suffix == ".safetensors":
        return load_safetensors(p, "data.path tensors")
    obj = torch_load(p, "data.path tensors")
    if isinstance(obj, torch.Tensor):
        return {"x0": obj}
    if isinstance(obj, dict):
        return obj
    raise ConfigError(f"config key data.path: {path!r} must hold a tensor or a dict with key 'x0'")


def build_data_source(cfg: TrainConfig, exact_data: Any = None) -> DataSource | None:
    """The x0 source of data-dependent pi-ID as ``[data]`` configures it (None in data-free mode).

    ``exact_data``: the exact teacher's mixture, reused for ``source = "exact"`` (built from the config when None).
    """
    d = cfg.data
    if d.mode == "data_free":
        return None
    if d.source == "exact":
        return ExactDataSource(exact_data if exact_data is not None else exact_mixture(cfg))
    tensors = load_tensors(d.path)
    if "x0" not in tensors:
        raise ConfigError(f"config key data.path: {d.path!r} has no tensor 'x0' (keys: {sorted(tensors)})")
    x0 = tensors["x0"].float()
    want = (d.channels, d.height, d.width)
    if x0.dim() != 4 or tuple(x0.shape[1:]) != want:
        raise ConfigError(f"config key data.path: x0 must have shape (N, {', '.join(map(str, want))}), got {tuple(x0.shape)}")
    labels = tensors.get("class_labels")
    if labels is not None:
        labels = labels.long()
        if labels.shape != (x0.shape[0],):
            raise ConfigError(f"config key data.path: class_labels must have shape ({x0.shape[0]},), got {tuple(labels.shape)}")
    return TensorDataSource(x0, labels, cfg.seed)
