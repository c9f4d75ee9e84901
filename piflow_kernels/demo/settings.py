"""Sizes of a demo run: how each policy's students are distilled (:class:`StudentSettings`) and evaluated (:class:`DemoSettings`).

    >>> FULL.student("GMFlow").iters        # {4: 1500, 2: 500, 1: 500}
    >>> dataclasses.replace(QUICK, hidden=32)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["StudentSettings", "DemoSettings", "FULL", "QUICK"]


@dataclass(frozen=True)
class StudentSettings:
    """How the students of one policy type are distilled.

    Attributes:
        iters: pi-ID iterations by NFE. Students are trained in the order 4, 2, 1 NFE and each one
            starts from the weights of the previous one (a curriculum: a 1-NFE GM student trained from
            scratch collapses onto one template).
        batch_size: training batch.
        lr: AdamW peak learning rate.
        size: K, the GM components (GMFlow), or N, the grid points (DX).
        train_substeps: policy substeps per unit time in training rollouts (sampling always uses 128).
        window_substeps: pi-ID's window (DX: 3, the official DX recipes' value, keeps the matched states away
            from sigma = 0, where the DX velocity ``(x - x0) / sigma`` amplifies any error of the grid;
            docs/design.md#pi-id-loss).
        gm_dropout: GM dropout of pi-ID (GMFlow only).
        time_skip: a sigma-dependent skip from ``x_t`` to the grid (DX only, see
            :class:`~piflow_kernels.demo.training.SkipStudent`).
    """

    iters: dict[int, int]
    batch_size: int
    lr: float
    size: int
    train_substeps: int
    window_substeps: int = 0
    gm_dropout: float = 0.0
    time_skip: bool = False


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes:
        gm, dx: the GMFlow and the DX students.
        hidden: MLP width of the students.
        warmup, grad_clip, ema_decay: linear learning-rate warm-up (then cosine decay to 10%),
            gradient-norm clip and EMA decay (the EMA weights are evaluated).
        log_every: the trainer's log line (and progress-bar loss) period, in iterations.
        num_eval: samples per method and evaluation draw (and held-out exact reference samples).
        num_draws: independent evaluation draws the metrics are averaged over.
        gm_temperature: GM temperature at sampling, on every step but the last (sharper per-pixel
            weights: fewer pixels flip to another template's value, at some cost in diversity).
    """

    gm: StudentSettings
    dx: StudentSettings
    hidden: int
    warmup: int
    grad_clip: float
    ema_decay: float
    log_every: int
    num_eval: int
    num_draws: int
    gm_temperature: float

    def student(self, policy_type: str) -> StudentSettings:
        return self.gm if policy_type == "GMFlow" else self.dx


FULL = DemoSettings(
    gm=StudentSettings(iters={4: 1500, 2: 500, 1: 500}, batch_size=256, lr=5e-3, size=8, train_substeps=32),
    dx=StudentSettings(
        iters={4: 1000, 2: 500, 1: 500}, batch_size=256, lr=3e-3, size=6, train_substeps=64, window_substeps=3, time_skip=True
    ),
    hidden=256,
    warmup=50,
    grad_clip=1.0,
    ema_decay=0.99,
    log_every=500,
    num_eval=2000,
    num_draws=4,
    gm_temperature=0.8,
)

# FULL with fewer iterations, half the batch, a shorter warm-up, a faster EMA and one smaller evaluation draw
QUICK = replace(
    FULL,
    gm=replace(FULL.gm, iters={4: 150, 2: 60, 1: 60}, batch_size=128),
    dx=replace(FULL.dx, iters={4: 150, 2: 60, 1: 60}, batch_size=128),
    warmup=20,
    ema_decay=0.95,
    log_every=50,
    num_eval=500,
    num_draws=1,
)
