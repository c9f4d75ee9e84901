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

__all__ = [
    "DataSource",
    "ExactDataSource",
    "TensorDataSource",
    "PromptSource",
    "LatentDataSource",
    "exact_mixture",
    "load_tensors",
    "build_data_source",
    "build_prompt_source",
]


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
    if d.source == "latents":
        return _latent_source(cfg)
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


class PromptSource:
    """The conditioning of a micro-batch from a prompt cache: the cached embeddings under the teacher's argument names.

    ``draw(n, iteration, shard, num_shards)`` -> {argument: (n, ...) tensor} on the CPU. The stream is stateless,
    as :class:`TensorDataSource`'s: global position ``p = (iteration * num_shards + shard) * n + i`` is prompt
    ``order(epoch)[p % N]`` of epoch ``p // N``, ``order`` the cache's seeded shard-group permutation
    (:meth:`~piflow_kernels.distill.prompt_cache.PromptCache.order`), so consecutive micro-batches read the same few
    shards and at most ``max_open_shards`` are in memory. Cached names map to arguments by ``names``
    (:data:`piflow_kernels.layouts.TEXT_ARGS`; ``negative_<name>`` to ``negative_<argument>``). Ragged tensors
    (Qwen-Image's per-prompt lengths) are padded at the end with zeros, as the pipeline pads a batch.
    """

    def __init__(self, cache: Any, names: dict[str, str], seed: int) -> None:
        self.cache = cache
        self.seed = int(seed)
        self.names = dict(names)
        self._orders: dict[int, list[int]] = {}
        have = set(cache.names)
        self.arguments: dict[str, str] = {}
        for name in sorted(have):
            base = name[len("negative_") :] if name.startswith("negative_") else name
            if base not in self.names:
                raise ConfigError(
                    f"config key data.prompt_cache: {cache.root} holds {name!r}, which this teacher takes no argument for "
                    f"(it takes {sorted(self.names)}): the cache was made for another pipeline"
                )
            self.arguments[name] = ("negative_" if base != name else "") + self.names[base]
        missing = sorted(set(self.names) - have)
        if missing:
            raise ConfigError(f"config key data.prompt_cache: {cache.root} has no {missing} (the teacher needs them)")

    @property
    def has_negatives(self) -> bool:
        return any(name.startswith("negative_") for name in self.arguments)

    def indices(self, n: int, iteration: int, shard: int, num_shards: int) -> list[int]:
        """The prompt indices of one micro-batch (Python ints, read from no tensor)."""
        return _stream_indices(self.cache, self.seed, self._orders, n, iteration, shard, num_shards)

    def draw(self, n: int, iteration: int, shard: int, num_shards: int, indices: list[int] | None = None
             ) -> dict[str, torch.Tensor]:  # fmt: skip
        """{teacher argument: (n, ...) CPU tensor} for the micro-batch's prompts (or for prompts ``indices``)."""
        from piflow_kernels.distill.prompt_cache import _stack

        idx = self.indices(n, iteration, shard, num_shards) if indices is None else indices
        rows = [self.cache[i] for i in idx]
        return {arg: _stack([r[name] for r in rows]) for name, arg in self.arguments.items()}


def _stream_indices(cache: Any, seed: int, orders: dict[int, list[int]], n: int, iteration: int, shard: int,
                    num_shards: int) -> list[int]:  # fmt: skip
    """Items of one micro-batch of the stateless stream over ``cache``: position p is ``order(p // N)[p % N]``."""
    size = len(cache)
    start = (iteration * num_shards + shard) * n
    out = []
    for p in range(start, start + n):
        epoch = p // size
        if epoch not in orders:
            if len(orders) > 4:  # a step spans at most two epochs: keep a few, not all
                orders.clear()
            orders[epoch] = cache.order(seed, epoch)
        out.append(orders[epoch][p % size])
    return out


class LatentDataSource:
    """x0 from a latent cache (``python -m piflow_kernels encode-images``), by the stateless stream of
    :class:`PromptSource` over the latent cache's own order; :meth:`indices` says which images a micro-batch holds,
    so that the prompt cache (aligned by index, :meth:`LatentCache.check_aligned`) gives their captions."""

    def __init__(self, cache: Any, seed: int) -> None:
        self.cache = cache
        self.seed = int(seed)
        self._orders: dict[int, list[int]] = {}

    def indices(self, n: int, iteration: int, shard: int, num_shards: int) -> list[int]:
        return _stream_indices(self.cache, self.seed, self._orders, n, iteration, shard, num_shards)

    def draw(
        self, n: int, generator: torch.Generator | None, iteration: int, shard: int, num_shards: int
    ) -> tuple[torch.Tensor, None]:
        """(n, C, H, W) float32 latents of the micro-batch's images, no labels; ``generator`` is not used."""
        idx = self.indices(n, iteration, shard, num_shards)
        return torch.stack([self.cache[i]["latents"] for i in idx]).float(), None


def _latent_source(cfg: TrainConfig) -> LatentDataSource:
    from piflow_kernels.distill.latent_cache import LatentCache

    d = cfg.data
    if not Path(d.path).is_dir():
        what = "a latent cache folder (python -m piflow_kernels encode-images)"
        raise ConfigError(f"config key data.path: {d.path!r} is not {what}")
    cache = LatentCache(d.path)
    want = (d.channels, d.height, d.width)
    if tuple(cache.latent_shape) != want:
        raise ConfigError(
            f"config keys data.channels, data.height, data.width = {want} but the latent cache {d.path} holds latents "
            f"of shape {tuple(cache.latent_shape)}"
        )
    if d.prompt_cache:
        try:
            cache.check_aligned(d.prompt_cache)
        except ValueError as err:
            raise ConfigError(f"config key data.prompt_cache: {err}") from None
    return LatentDataSource(cache, cfg.seed)


def build_prompt_source(cfg: TrainConfig, teacher_class: str) -> PromptSource | None:
    """The :class:`PromptSource` of ``data.prompt_cache`` for a teacher of class ``teacher_class`` (None without one)."""
    if not cfg.data.prompt_cache:
        return None
    from piflow_kernels.distill.prompt_cache import PromptCache
    from piflow_kernels.layouts import TEXT_ARGS

    if teacher_class not in TEXT_ARGS:
        raise ConfigError(
            f"config key data.prompt_cache: a {teacher_class} teacher takes no text embeddings "
            f"(text teachers: {', '.join(TEXT_ARGS)})"
        )
    if not Path(cfg.data.prompt_cache).is_dir():
        raise ConfigError(f"config key data.prompt_cache: {cfg.data.prompt_cache!r} is not a folder")
    # beside a latent cache, prompts are read in the latent cache's order: keep more of their (smaller) shards open
    shards = 8 if cfg.data.mode == "data_dependent" and cfg.data.source == "latents" else 2
    cache = PromptCache(cfg.data.prompt_cache, max_open_shards=shards)
    source = PromptSource(cache, TEXT_ARGS[teacher_class], cfg.seed)
    if cfg.teacher.guidance_scale != 1.0 and not source.has_negatives:
        raise ConfigError(
            f"config key teacher.guidance_scale = {cfg.teacher.guidance_scale}: classifier-free guidance needs negative "
            f"prompt embeddings, and {cfg.data.prompt_cache} has none (encode the prompts from a source with a "
            "negative_prompt column; SD3 caches always hold them)"
        )
    return source
