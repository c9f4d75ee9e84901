"""The demo's students and their distillation: one :class:`~piflow_kernels.distill.TrainConfig` per student, run by the Trainer.

    >>> student, piid_cfg, seconds = distill_student("GMFlow", 4, demo_data(), FULL, seed=0)
    >>> student, _, _ = distill_student("GMFlow", 2, demo_data(), FULL, seed=0, init=student)   # warm start

Data-dependent pi-ID against the exact teacher (:class:`~piflow_kernels.distill.ExactGMTeacher` of the
demo's mixture, which also feeds the x0 stream), AdamW with a linear warm-up and a cosine decay,
gradient clipping and an EMA of the weights; the EMA student is returned.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from piflow_kernels.demo.settings import DemoSettings, StudentSettings
from piflow_kernels.distill import ExactDataSource, ExactGMTeacher, GaussianMixtureData, PiIDConfig, Trainer
from piflow_kernels.distill.config import TrainConfig
from piflow_kernels.distill.config_sections import DataConfig, EMAConfig, OptimConfig
from piflow_kernels.distill.toy import ToyDXStudent, ToyGMStudent, sinusoidal_embedding
from piflow_kernels.outputs import DXOutput, GMFlowOutput

__all__ = ["SkipStudent", "student_name", "build_student", "piid_config", "train_config", "distill_student"]


class SkipStudent(nn.Module):
    """A toy student plus a zero-initialised linear map from ``x_t`` to its policy (a residual shortcut).

    Much of an exact Gaussian-mixture teacher's policy is linear in ``x_t`` (the posterior means, and the
    component log-weights up to a softmax); the shortcut lets the MLP learn only the rest, which cuts the
    iterations the demo needs several-fold.

    A DX student may add ``a_n(sigma) * x_t`` to grid point n, with ``a`` a zero-initialised linear map of the
    time embedding (``time_skip``). Within one mixture component the teacher's flow is linear, so the exact
    DX grid is ``a_n(sigma_src) x_t`` plus a function of the component: the coefficient of ``x_t`` changes with
    sigma (about 1.0 at sigma 1, 2.6 at sigma 0.25 on the demo's data), which a fixed linear map cannot follow
    and an MLP that adds its time embedding to its input can only approximate. A GM policy needs no such term:
    it recomputes its posterior from ``x`` at every substep, while a DX grid is fixed at the segment start.

    Args:
        inner: a :class:`ToyGMStudent` or :class:`ToyDXStudent`.
        time_skip: the sigma-dependent skip (DX only).
    Returns from forward: the inner student's output with ``means``/``logweights`` (GMFlow) or ``grid`` (DX) shifted.
    """

    def __init__(self, inner: ToyGMStudent | ToyDXStudent, time_skip: bool = False) -> None:
        super().__init__()
        self.inner = inner
        dim = inner.channels * inner.height * inner.width
        if isinstance(inner, ToyGMStudent):
            if time_skip:
                raise ValueError("time_skip applies to DX students only")
            k = inner.num_components
            self.skip = nn.Linear(dim, k * dim + k * inner.height * inner.width)
        else:
            self.skip = nn.Linear(dim, inner.num_points * dim)
        nn.init.zeros_(self.skip.weight)
        nn.init.zeros_(self.skip.bias)
        self.time_skip = None
        if time_skip:
            self.time_skip = nn.Linear(inner.time_dim, inner.num_points)
            nn.init.zeros_(self.time_skip.weight)
            nn.init.zeros_(self.time_skip.bias)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor | float) -> GMFlowOutput | DXOutput:
        """x_t (B, C, H, W), timestep (B,) -> GMFlowOutput or DXOutput of the inner student's shapes."""
        out = self.inner(x_t, timestep)
        b = x_t.shape[0]
        lin = self.skip(x_t.reshape(b, -1))
        if isinstance(out, GMFlowOutput):
            n_means = out.means[0].numel()
            means = out.means + lin[:, :n_means].reshape(out.means.shape)
            logits = out.logweights + lin[:, n_means:].reshape(out.logweights.shape)
            return GMFlowOutput(means=means, logweights=torch.log_softmax(logits, dim=1), logstds=out.logstds)
        grid = out.grid + lin.reshape(out.grid.shape)
        if self.time_skip is not None:
            t = torch.as_tensor(timestep, dtype=torch.float32, device=x_t.device)
            t = t.expand(b) if t.dim() == 0 else t.reshape(b)
            temb = sinusoidal_embedding(t * (1000.0 / self.inner.num_train_timesteps), self.inner.time_dim)
            coef = self.time_skip(temb.to(x_t.dtype))  # (B, N)
            grid = grid + coef[:, :, None, None, None] * x_t[:, None]
        return DXOutput(grid=grid)


def student_name(policy_type: str, nfe: int) -> str:
    """``"pi-ID GM 4-NFE"``: the run name in the progress bar and the trainer's lines."""
    return f"pi-ID {'GM' if policy_type == 'GMFlow' else 'DX'} {nfe}-NFE"


def _student_seed(seed: int, nfe: int, policy_type: str) -> int:
    """One seed per (demo seed, student): its initialisation and the trainer's random streams."""
    return int(seed) * 1000 + nfe * 10 + int(policy_type == "DX")


def build_student(policy_type: str, nfe: int, data: GaussianMixtureData, settings: DemoSettings, seed: int) -> SkipStudent:
    """A freshly initialised student of ``policy_type`` for the ``nfe`` run (seeded like its Trainer run)."""
    sub = settings.student(policy_type)
    c, h, w = data.shape
    torch.manual_seed(_student_seed(seed, nfe, policy_type))
    if policy_type == "GMFlow":
        return SkipStudent(ToyGMStudent(c, h, w, num_components=sub.size, hidden=settings.hidden))
    return SkipStudent(ToyDXStudent(c, h, w, num_points=sub.size, hidden=settings.hidden), time_skip=sub.time_skip)


def piid_config(policy_type: str, nfe: int, settings: StudentSettings) -> PiIDConfig:
    """The pi-ID settings of one student (shift 1, 2 intermediate states, DX segment = the NFE segment).

    The demo's students were trained and measured with the ``round`` substep rule (LakonLab before v0.2.0): it
    keeps it, and :func:`~piflow_kernels.distill.evaluation.scheduler_for` samples with the same rule.
    """
    return PiIDConfig(
        nfe=nfe,
        policy_type=policy_type,
        total_substeps=settings.train_substeps,
        num_intermediate_states=2,
        window_substeps=settings.window_substeps,
        gm_dropout=settings.gm_dropout if policy_type == "GMFlow" else 0.0,
        backend="torch",
        substep_rule="round",
    )


def train_config(
    policy_type: str,
    nfe: int,
    data: GaussianMixtureData,
    settings: DemoSettings,
    seed: int,
    out_dir: str | Path,
    progress: bool = True,
) -> TrainConfig:
    """The training run of one student: data-dependent pi-ID on the CPU, no checkpoints (the demo keeps
    the EMA student in memory), the log in ``out_dir/log.jsonl``."""
    sub = settings.student(policy_type)
    channels, height, width = data.shape
    return TrainConfig(
        name=student_name(policy_type, nfe),
        seed=_student_seed(seed, nfe, policy_type),
        max_iters=sub.iters[nfe],
        out_dir=str(out_dir),
        device="cpu",
        mixed_precision="no",
        log_every=settings.log_every,
        final_checkpoint=False,
        progress=progress,
        tensorboard=False,
        data=DataConfig(
            mode="data_dependent", source="exact", batch_size=sub.batch_size, channels=channels, height=height, width=width
        ),
        optim=OptimConfig(
            lr=sub.lr,
            betas=[0.9, 0.99],
            warmup_iters=settings.warmup,
            warmup_ratio=1.0 / max(settings.warmup, 1),  # the first step at lr / warmup, as a ramp from 0 would
            lr_decay="cosine",
            lr_min_ratio=0.1,
            grad_clip=settings.grad_clip,
        ),
        ema=EMAConfig(decay=settings.ema_decay),
        piid=piid_config(policy_type, nfe, sub),
    )


def distill_student(
    policy_type: str,
    nfe: int,
    data: GaussianMixtureData,
    settings: DemoSettings,
    seed: int,
    progress: bool = True,
    init: nn.Module | None = None,
    out_dir: str | Path | None = None,
) -> tuple[nn.Module, PiIDConfig, float]:
    """Distill one student from the exact teacher of ``data`` with the :class:`~piflow_kernels.distill.Trainer`.

    Args:
        init: a student of the same policy type whose weights start the training (e.g. the student of
            the next larger NFE); None starts from a fresh initialisation.
        out_dir: where the trainer writes its log (None: a temporary directory, removed afterwards).
    Returns:
        (EMA student in eval mode, its PiIDConfig, training wall seconds).
    """
    if out_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return distill_student(policy_type, nfe, data, settings, seed, progress, init, tmp)
    cfg = train_config(policy_type, nfe, data, settings, seed, out_dir, progress)
    student = build_student(policy_type, nfe, data, settings, seed)
    if init is not None:
        student.load_state_dict(init.state_dict())
    teacher = ExactGMTeacher(data, num_train_timesteps=cfg.piid.num_train_timesteps)
    with Trainer(cfg, student=student, teacher=teacher, data=ExactDataSource(data), exact_data=data) as trainer:
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        ema = trainer.ema.module.eval()
    return ema, cfg.piid, seconds
