"""The demo: distill few-step pi-Flow students from an exact teacher and compare them with the teacher's sampler.

    python -m piflow_kernels demo [--out DIR] [--quick] [--seed N]

Data: a Gaussian mixture over 8x8 single-channel images, one component per template picture (bars, a ring,
a cross, ...) with per-pixel noise, so its flow velocity is known in closed form (the exact teacher,
:class:`~piflow_kernels.distill.teachers.ExactGMTeacher`). Whether a sample is one template or another is
decided jointly by all pixels, while a GMFlow policy is a mixture per pixel: the students must learn to
make the pixels agree.

Students: pi-ID (data-dependent, :func:`~piflow_kernels.distill.piid.piid_loss_data_dependent`) at 4, 2
and 1 NFE, with the GMFlow and with the DX policy (:class:`SkipStudent` around the toy MLP students);
AdamW, gradient clipping and an EMA of the weights. Each policy's students are trained in the order
4, 2, 1 NFE, each starting from the previous one's weights.

Evaluation on held-out exact samples: the energy distance, k-NN precision and recall
(:mod:`piflow_kernels.demo_metrics`) and the wall time of sampling, for exact data, the teacher's Euler
sampler at 128, 4, 2 and 1 steps and every student. Prints a table, writes ``DIR/results.json`` and a
figure of samples ``DIR/samples.png``. CPU only, deterministic for a given ``--seed``.

    >>> from piflow_kernels.demo import main
    >>> main(["--quick", "--out", "demo_out"])
    0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from piflow_kernels.demo_metrics import energy_distance, knn_precision_recall
from piflow_kernels.distill.ema import EMA
from piflow_kernels.distill.optim import make_adamw
from piflow_kernels.distill.piid import PiIDConfig, piid_loss_data_dependent
from piflow_kernels.distill.teachers import ExactGMTeacher, GaussianMixtureData
from piflow_kernels.distill.toy import ToyDXStudent, ToyGMStudent
from piflow_kernels.outputs import DXOutput, GMFlowOutput

__all__ = [
    "DemoSettings",
    "StudentSettings",
    "FULL",
    "QUICK",
    "template_images",
    "demo_data",
    "teacher_euler",
    "SkipStudent",
    "distill_student",
    "sample_student",
    "evaluate_samples",
    "EvalDraw",
    "eval_draws",
    "evaluate_method",
    "format_table",
    "run_demo",
    "main",
]

METHODS = ("data", "teacher-euler", "piflow-gm", "piflow-dx")
TEACHER_STEPS = (128, 4, 2, 1)
STUDENT_NFES = (4, 2, 1)
DISTANCE_NAME = "energy distance"
KNN_K = 10


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
        window_substeps: pi-ID's window (DX: keeps the matched states away from sigma = 0, where the DX
            velocity ``(x - x0) / sigma`` amplifies any error of the grid).
        gm_dropout: GM dropout of pi-ID (GMFlow only).
    """

    iters: dict[int, int]
    batch_size: int
    lr: float
    size: int
    train_substeps: int
    window_substeps: int = 0
    gm_dropout: float = 0.0


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes:
        gm, dx: the GMFlow and the DX students.
        hidden: MLP width of the students.
        warmup, grad_clip, ema_decay: linear learning-rate warm-up (then cosine decay to 10%),
            gradient-norm clip and EMA decay (the EMA weights are evaluated).
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
    num_eval: int
    num_draws: int
    gm_temperature: float

    def student(self, policy_type: str) -> StudentSettings:
        return self.gm if policy_type == "GMFlow" else self.dx


FULL = DemoSettings(
    gm=StudentSettings(iters={4: 1500, 2: 500, 1: 500}, batch_size=256, lr=5e-3, size=8, train_substeps=32),
    dx=StudentSettings(iters={4: 1000, 2: 500, 1: 500}, batch_size=256, lr=3e-3, size=6, train_substeps=64, window_substeps=1),
    hidden=256,
    warmup=50,
    grad_clip=1.0,
    ema_decay=0.99,
    num_eval=2000,
    num_draws=4,
    gm_temperature=0.8,
)

QUICK = DemoSettings(
    gm=StudentSettings(iters={4: 150, 2: 60, 1: 60}, batch_size=128, lr=5e-3, size=8, train_substeps=32),
    dx=StudentSettings(iters={4: 150, 2: 60, 1: 60}, batch_size=128, lr=3e-3, size=6, train_substeps=64, window_substeps=1),
    hidden=256,
    warmup=20,
    grad_clip=1.0,
    ema_decay=0.95,
    num_eval=500,
    num_draws=1,
    gm_temperature=0.8,
)

SAMPLE_SUBSTEPS = 128
# the mixture: template pictures in [-0.9, 0.9], per-pixel noise std, unequal weights
TEMPLATE_WEIGHTS = (3.0, 3.0, 2.0, 2.0, 1.5, 1.5, 1.0, 1.0)
PIXEL_STD = 0.2


# ---------------------------------------------------------------------------------------------- data


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
                          [0.2, 1.0, 1.0], [1.0, 0.3, 1.0], [1.0, 1.0, 1.0], [1.0, 0.6, 0.1]], dtype=torch.float64)
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


# ---------------------------------------------------------------------------------------------- students


class SkipStudent(nn.Module):
    """A toy student plus a zero-initialised linear map from ``x_t`` to its policy (a residual shortcut).

    Much of an exact Gaussian-mixture teacher's policy is linear in ``x_t`` (the posterior means, and the
    component log-weights up to a softmax); the shortcut lets the MLP learn only the rest, which cuts the
    iterations the demo needs several-fold.

    Args:
        inner: a :class:`ToyGMStudent` or :class:`ToyDXStudent`.
    Returns from forward: the inner student's output with ``means``/``logweights`` (GMFlow) or ``grid`` (DX) shifted.
    """

    def __init__(self, inner: ToyGMStudent | ToyDXStudent) -> None:
        super().__init__()
        self.inner = inner
        dim = inner.channels * inner.height * inner.width
        if isinstance(inner, ToyGMStudent):
            k = inner.num_components
            self.skip = nn.Linear(dim, k * dim + k * inner.height * inner.width)
        else:
            self.skip = nn.Linear(dim, inner.num_points * dim)
        nn.init.zeros_(self.skip.weight)
        nn.init.zeros_(self.skip.bias)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor | float) -> GMFlowOutput | DXOutput:
        """x_t (B, C, H, W), timestep (B,) -> GMFlowOutput or DXOutput of the inner student's shapes."""
        out = self.inner(x_t, timestep)
        lin = self.skip(x_t.reshape(x_t.shape[0], -1))
        if isinstance(out, GMFlowOutput):
            n_means = out.means[0].numel()
            means = out.means + lin[:, :n_means].reshape(out.means.shape)
            logits = out.logweights + lin[:, n_means:].reshape(out.logweights.shape)
            return GMFlowOutput(means=means, logweights=torch.log_softmax(logits, dim=1), logstds=out.logstds)
        return DXOutput(grid=out.grid + lin.reshape(out.grid.shape))


def _lr_factor(it: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay from 1 to 0.1."""
    ramp = min(1.0, (it + 1) / max(warmup, 1))
    return ramp * (0.1 + 0.45 * (1.0 + math.cos(math.pi * it / max(total, 1))))


def piid_config(policy_type: str, nfe: int, settings: StudentSettings) -> PiIDConfig:
    """The pi-ID settings of one student (shift 1, 2 intermediate states, DX segment = the NFE segment)."""
    return PiIDConfig(
        nfe=nfe,
        policy_type=policy_type,
        total_substeps=settings.train_substeps,
        num_intermediate_states=2,
        window_substeps=settings.window_substeps,
        gm_dropout=settings.gm_dropout if policy_type == "GMFlow" else 0.0,
        backend="torch",
    )


def distill_student(
    policy_type: str,
    nfe: int,
    data: GaussianMixtureData,
    settings: DemoSettings,
    seed: int,
    progress: bool = True,
    init: nn.Module | None = None,
) -> tuple[nn.Module, PiIDConfig, float]:
    """Distill one student from the exact teacher by data-dependent pi-ID.

    Args:
        init: a student of the same policy type whose weights start the training (e.g. the student of
            the next larger NFE); None starts from a fresh initialisation.
    Returns:
        (EMA student in eval mode, its PiIDConfig, training wall seconds).
    """
    from tqdm.auto import tqdm

    c, h, w = data.shape
    sub = settings.student(policy_type)
    cfg = piid_config(policy_type, nfe, sub)
    teacher = ExactGMTeacher(data, num_train_timesteps=cfg.num_train_timesteps)
    torch.manual_seed(seed * 1000 + nfe * 10 + (policy_type == "DX"))
    if policy_type == "GMFlow":
        inner: ToyGMStudent | ToyDXStudent = ToyGMStudent(c, h, w, num_components=sub.size, hidden=settings.hidden)
    else:
        inner = ToyDXStudent(c, h, w, num_points=sub.size, hidden=settings.hidden)
    student = SkipStudent(inner)
    if init is not None:
        student.load_state_dict(init.state_dict())
    opt = make_adamw(student.parameters(), lr=sub.lr, betas=(0.9, 0.99))
    ema = EMA(student, decay=settings.ema_decay)
    iters = sub.iters[nfe]
    name = f"pi-ID {'GM' if policy_type == 'GMFlow' else 'DX'} {nfe}-NFE"
    t0 = time.perf_counter()
    with tqdm(range(iters), desc=name, disable=not progress, leave=True, dynamic_ncols=True, mininterval=0.5) as bar:
        for it in bar:
            g = torch.Generator().manual_seed(_stream(seed, nfe, policy_type, it))
            x0 = data.sample(sub.batch_size, generator=g)
            loss, logs = piid_loss_data_dependent(student, teacher, x0, cfg, iteration=it, generator=g)
            for group in opt.param_groups:
                group["lr"] = sub.lr * _lr_factor(it, iters, settings.warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), settings.grad_clip, foreach=False)
            opt.step()
            ema.update(student, it)
            if it % 20 == 0 or it == iters - 1:
                bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
    return ema.module, cfg, time.perf_counter() - t0


def _stream(seed: int, nfe: int, policy_type: str, it: int) -> int:
    words = np.random.SeedSequence([int(seed), int(nfe), int(policy_type == "DX"), int(it)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


@torch.no_grad()
def sample_student(
    student: nn.Module, cfg: PiIDConfig, noise: torch.Tensor, temperature: float = 1.0, batch_size: int = 1000
) -> torch.Tensor:
    """Deterministic few-step sampling (h = 0) with :func:`piflow_kernels.sample` and 128 substeps per unit time.

    Args:
        noise: (B, C, H, W). Returns (B, C, H, W).
        temperature: GM temperature of every step but the last (GMFlow only; 1 = none).
    """
    from piflow_kernels.sampling import sample
    from piflow_kernels.scheduler import PiFlowScheduler

    dx = cfg.dx_policy_kwargs()
    scheduler = PiFlowScheduler(
        num_train_timesteps=int(cfg.num_train_timesteps),
        shift=cfg.shift,
        total_substeps=SAMPLE_SUBSTEPS,
        policy_type=cfg.policy_type,
        dx_segment_size=dx["segment_size"],
        dx_shift=dx["shift"],
        dx_mode=dx["mode"],
        temperature=temperature if cfg.policy_type == "GMFlow" else 1.0,
        backend=cfg.backend,
    )
    chunks = [sample(student, chunk, cfg.nfe, scheduler=scheduler, progress=False) for chunk in noise.split(batch_size)]
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_samples(samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """distance (energy distance), precision and recall (k-NN, k = 10) of (N, C, H, W) samples vs (M, C, H, W)."""
    x = samples.reshape(samples.shape[0], -1)
    y = reference.reshape(reference.shape[0], -1)
    precision, recall = knn_precision_recall(x, y, k=KNN_K)
    return {"distance": energy_distance(x, y), "precision": precision, "recall": recall}


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


# ---------------------------------------------------------------------------------------------- driver


def run_demo(out_dir: str | Path, settings: DemoSettings, seed: int = 0, progress: bool = True, plot: bool = True) -> dict:
    """Run the whole benchmark; writes ``results.json`` (and ``samples.png``) under ``out_dir``.

    Returns:
        ``{"rows": [...]}`` as written to results.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = demo_data()
    n, num_draws = settings.num_eval, settings.num_draws
    draws = eval_draws(data, n, num_draws, seed)

    rows: list[dict] = []
    samples: dict[tuple[str, int], torch.Tensor] = {}
    spreads: dict[tuple[str, int], float] = {}
    train_seconds: dict[tuple[str, int], float] = {}

    def add(method: str, nfe: int, sampler: Callable[[EvalDraw], torch.Tensor]) -> None:
        row, spreads[(method, nfe)], samples[(method, nfe)] = evaluate_method(method, nfe, sampler, draws)
        rows.append(row)

    g_data = torch.Generator().manual_seed(int(seed) + 1)  # a second exact set per draw: the floor of the metrics
    add("data", 0, lambda d: data.sample(n, generator=g_data))
    for steps in TEACHER_STEPS:
        add("teacher-euler", steps, lambda d, steps=steps: teacher_euler(data, d.noise, steps))

    for policy_type, method in (("GMFlow", "piflow-gm"), ("DX", "piflow-dx")):
        student = None
        for nfe in STUDENT_NFES:  # 4, 2, 1: each student starts from the previous one
            student, cfg, seconds = distill_student(policy_type, nfe, data, settings, seed, progress, init=student)
            train_seconds[(method, nfe)] = seconds
            temp = settings.gm_temperature
            add(method, nfe, lambda d, student=student, cfg=cfg, temp=temp: sample_student(student, cfg, d.noise, temp))

    result = {"rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(rows, train_seconds, spreads))
    print(
        f"\n{DISTANCE_NAME}: between the empirical distributions of {n} samples and {n} held-out exact samples "
        f"(a V-statistic, >= 0), averaged over {num_draws} independent draws of noise and reference (+-sd: its standard "
        "deviation over the draws); the 'data' row (two exact sets) is the floor. precision/recall: k-NN manifolds, "
        f"k={KNN_K}, same draws. sample s: wall time to draw {n} samples. Students sample with {SAMPLE_SUBSTEPS} policy "
        f"substeps per unit time (GM temperature {settings.gm_temperature} on all but the last step); each starts "
        "training from the weights of the one with the next larger NFE (4 -> 2 -> 1)."
    )
    if plot:
        from piflow_kernels.demo_plot import plot_samples

        path = plot_samples(samples, rows, out / "samples.png", templates=data.means.float())
        print(f"figure: {path}" if path is not None else "figure: skipped (matplotlib is not installed: pip install matplotlib)")
    print(f"results: {out / 'results.json'}   total wall time {time.perf_counter() - t_start:.1f} s")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m piflow_kernels demo",
        description="Distill 1/2/4-NFE pi-Flow students (GMFlow and DX policies) from an exact Gaussian-mixture teacher "
        "on 8x8 images and compare them with the teacher's Euler sampler (CPU, a few minutes).",
    )
    parser.add_argument("--out", default="piflow_demo", metavar="DIR", help="output directory (default: piflow_demo)")
    parser.add_argument("--quick", action="store_true", help="a small run (under a minute): fewer iterations and samples")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0); a seed gives the same numbers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plot", action="store_true", help="do not draw samples.png")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m piflow_kernels demo [--out DIR] [--quick] [--seed N]``; returns the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = QUICK if args.quick else FULL
    run_demo(args.out, settings, seed=args.seed, progress=not args.no_progress, plot=not args.no_plot)
    return 0
