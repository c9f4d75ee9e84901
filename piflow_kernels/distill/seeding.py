"""Seeds of the trainer: one independent random stream per (seed, iteration, shard, purpose).

    >>> g = seeded_generator(stream_seed(cfg.seed, iteration, shard))   # the draws of one micro-batch

No RNG state is carried from one step to the next: a resumed run, or one sharded differently, derives
the same streams from the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["stream_seed", "seeded_generator", "seed_global_rngs"]

# ``purpose`` values of the streams the trainer draws (0, the default, is a micro-batch's stream)
PURPOSE_GLOBAL_RNGS = 1
PURPOSE_EVAL_BATCH = 3
PURPOSE_DATA_EPOCH = 7


def stream_seed(seed: int, iteration: int, shard: int, purpose: int = 0) -> int:
    """A 63-bit seed for the random stream of (seed, iteration, shard, purpose) (non-negative ints), via SeedSequence."""
    words = np.random.SeedSequence([int(seed), int(iteration), int(shard), int(purpose)]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def seed_global_rngs(seed: int, rank: int) -> None:
    """Seed torch's and numpy's global RNGs for this rank: they only serve modules that draw from them
    (e.g. dropout layers); the trainer's own draws come from :func:`stream_seed` generators."""
    value = stream_seed(seed, 0, rank, purpose=PURPOSE_GLOBAL_RNGS)
    torch.manual_seed(value)
    np.random.seed(value % (2**32))
