"""The demo's evaluation: sampling, metrics averaged over independent draws, and the results table.

    >>> draws = eval_draws(data, n=2000, num_draws=4, seed=0)
    >>> row, spread, samples = evaluate_method("piflow-gm", 4, lambda d: sample_student(student, cfg, d.noise), draws)
    >>> print(format_table([row]))

Metrics (:mod:`piflow_kernels.distill.metrics`): the energy distance to held-out exact samples and
k-NN precision and recall (k = 10), plus the wall time of sampling.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from piflow_kernels.distill.evaluation import sample_with, scheduler_for
from piflow_kernels.distill.metrics import energy_distance, knn_precision_recall
from piflow_kernels.distill.mixture import GaussianMixtureData
from piflow_kernels.distill.piid_config import PiIDConfig

__all__ = [
    "DISTANCE_NAME",
    "KNN_K",
    "SAMPLE_SUBSTEPS",
    "sample_student",
    "evaluate_samples",
    "EvalDraw",
    "eval_draws",
    "evaluate_method",
    "format_table",
]

DISTANCE_NAME = "energy distance"
KNN_K = 10
SAMPLE_SUBSTEPS = 128


@torch.no_grad()
def sample_student(
    student: nn.Module, cfg: PiIDConfig, noise: torch.Tensor, temperature: float = 1.0, batch_size: int = 1000
) -> torch.Tensor:
    """Deterministic few-step sampling (h = 0) with the sampler of ``cfg`` at 128 substeps per unit time.

    Args:
        noise: (B, C, H, W). Returns (B, C, H, W).
        temperature: GM temperature of every step but the last (GMFlow only; 1 = none).
    """
    temperature = temperature if cfg.policy_type == "GMFlow" else 1.0
    scheduler = scheduler_for(cfg, total_substeps=SAMPLE_SUBSTEPS, temperature=temperature)
    return torch.cat([sample_with(student, chunk, cfg, scheduler=scheduler) for chunk in noise.split(batch_size)])


def evaluate_samples(samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """distance (energy distance), precision and recall (k-NN, k = 10) of (N, C, H, W) samples vs (M, C, H, W)."""
    precision, recall = knn_precision_recall(samples, reference, k=KNN_K)
    return {"distance": energy_distance(samples, reference), "precision": precision, "recall": recall}


@dataclass
class EvalDraw:
    """One evaluation draw: held-out exact reference samples (N, C, H, W) and the sampling noise (N, C, H, W)."""

    reference: torch.Tensor
    noise: torch.Tensor


def eval_draws(data: GaussianMixtureData, n: int, num_draws: int, seed: int) -> list[EvalDraw]:
    """``num_draws`` independent draws of n exact reference samples and n noises (CPU, seeded)."""
    g = torch.Generator().manual_seed(int(seed))
    return [EvalDraw(data.sample(n, generator=g), torch.randn((n, *data.shape), generator=g)) for _ in range(num_draws)]


def evaluate_method(
    method: str, nfe: int, sampler: Callable[[EvalDraw], torch.Tensor], draws: list[EvalDraw]
) -> tuple[dict, float, torch.Tensor]:
    """Sample every draw with ``sampler`` and average the metrics over the draws.

    Returns:
        (the results.json row, the standard deviation of the distance over the draws, the first draw's samples).
    """
    metrics, seconds, first = [], 0.0, None
    for draw in draws:
        t0 = time.perf_counter()
        x = sampler(draw)
        seconds += time.perf_counter() - t0
        metrics.append(evaluate_samples(x, draw.reference))
        first = x if first is None else first
    mean = {key: float(np.mean([m[key] for m in metrics])) for key in ("distance", "precision", "recall")}
    spread = float(np.std([m["distance"] for m in metrics], ddof=1)) if len(metrics) > 1 else float("nan")
    row = {"method": method, "nfe": int(nfe), **mean, "seconds": seconds / len(draws)}
    return row, spread, first


def format_table(
    rows: list[dict],
    train_seconds: dict[tuple[str, int], float] | None = None,
    spreads: dict[tuple[str, int], float] | None = None,
) -> str:
    """The results as a fixed-width text table (one line per row of ``results.json``).

    ``spreads``: the standard deviation of the distance over the evaluation draws, by (method, nfe).
    """
    train_seconds = train_seconds or {}
    spreads = spreads or {}
    head = (
        f"{'method':<14} {'NFE':>4} {DISTANCE_NAME + ' (lower=better)':>26} {'+-sd':>8} {'vs teacher-128':>15} "
        f"{'precision':>10} {'recall':>7} {'sample s':>9} {'train s':>8}"
    )
    ref = next((r["distance"] for r in rows if (r["method"], r["nfe"]) == ("teacher-euler", 128)), None)
    lines = [head, "-" * len(head)]
    for row in rows:
        key = (row["method"], row["nfe"])
        train = train_seconds.get(key)
        sd = spreads.get(key, float("nan"))
        sd_text = f"{sd:.5f}" if math.isfinite(sd) else "-"
        ratio = f"{row['distance'] / ref:.2f}x" if ref else ""
        lines.append(
            f"{row['method']:<14} {row['nfe']:>4} {row['distance']:>26.5f} {sd_text:>8} {ratio:>15} {row['precision']:>10.3f} "
            f"{row['recall']:>7.3f} {row['seconds']:>9.2f} {'' if train is None else f'{train:.1f}':>8}"
        )
    return "\n".join(lines)
