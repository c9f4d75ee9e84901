"""Sampling with a trained student as its pi-ID config trains it, and the sample metrics of an evaluation.

    >>> scheduler = scheduler_for(cfg.piid)                               # the sampler of what cfg trains
    >>> x = sample_with(ema_student, noise, cfg.piid)                    # (B, C, H, W), cfg.nfe steps
    >>> sample_metrics(x, exact_data.sample(len(x)))                     # energy distance, sliced W2
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from piflow_kernels.distill.metrics import energy_distance, sliced_w2
from piflow_kernels.distill.piid_config import PiIDConfig

if TYPE_CHECKING:
    from piflow_kernels.scheduler import PiFlowScheduler

__all__ = ["scheduler_for", "sample_with", "sample_metrics"]


def scheduler_for(cfg: PiIDConfig, **overrides: Any) -> PiFlowScheduler:
    """The :class:`~piflow_kernels.PiFlowScheduler` that samples what ``cfg`` trains.

    Every setting the scheduler shares with :class:`PiIDConfig` by name (the shift and its dynamic
    variant, the final step scale, the substeps, the policy type, the backend) comes from ``cfg``,
    the DX policy's settings as :meth:`PiIDConfig.dx_policy_kwargs` resolves them; ``overrides``
    (e.g. ``total_substeps=128``, ``temperature=0.8``) replace any of them.
    """
    from piflow_kernels.scheduler import PiFlowScheduler

    if cfg.num_train_timesteps != int(cfg.num_train_timesteps):
        raise ValueError(f"PiFlowScheduler takes an integer num_train_timesteps, the pi-ID config has {cfg.num_train_timesteps}")
    accepted = inspect.signature(PiFlowScheduler.__init__).parameters
    settings = {name: value for name, value in cfg.to_dict().items() if name in accepted}
    settings.update({f"dx_{name}": value for name, value in cfg.dx_policy_kwargs().items()})
    settings["num_train_timesteps"] = int(cfg.num_train_timesteps)
    return PiFlowScheduler(**{**settings, **overrides})


@torch.no_grad()
def sample_with(
    module: Any,
    noise: torch.Tensor,
    cfg: PiIDConfig,
    nfe: int | None = None,
    scheduler: PiFlowScheduler | None = None,
    **cond: Any,
) -> torch.Tensor:
    """Few-step sampling with ``module`` from ``noise`` (B, C, H, W) at sigma = 1; returns (B, C, H, W).

    ``nfe`` student calls (default ``cfg.nfe``) with ``scheduler`` (default :func:`scheduler_for` of
    ``cfg``: deterministic, h = 0); ``cond`` goes to every student call (e.g. ``class_labels``).
    """
    from piflow_kernels.sampling import sample

    scheduler = scheduler_for(cfg) if scheduler is None else scheduler
    n = cfg.nfe if nfe is None else nfe
    return sample(module, noise, n, scheduler=scheduler, progress=False, seq_len=cfg.seq_len_of(noise), **cond)


def sample_metrics(samples: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """``energy_distance`` and ``sliced_w2`` (directions seeded by ``seed``) of samples (N, ...) against
    as many reference samples (N, ...)."""
    return {"energy_distance": energy_distance(samples, reference), "sliced_w2": sliced_w2(samples, reference, seed=seed)}
