"""The demo's DX 4-NFE student trained alone: its loss and gradient-norm curve through trajectory mixing, and its samples.

    PYTHONPATH=. python -m bench.dx_stability                                  # the three recipes below, ~5 min on 2 cores
    PYTHONPATH=. python -m bench.dx_stability --recipes after --iters 300      # one recipe, shorter
    PYTHONPATH=. python -m bench.dx_stability --json bench/results/dx_stability_cpu_2core_epyc.json

Each run is the demo's own DX 4-NFE training (``piflow_kernels.demo.training``: its TrainConfig, its student,
the exact teacher, the Trainer's ``train_step``) with a teacher-ratio decay that reaches 0 halfway through
(``--decay-iters``, default ``iters // 2``), so the curve crosses the end of trajectory mixing. Every
``--log-every`` iterations it logs the mean and max of the training loss and of the gradient norm (before
clipping) over the window, the teacher ratio, and the EMA student's pi-ID loss on a fixed batch at ratio 0.
At the end: the EMA student's per-sigma squared velocity error against the teacher (along its own 4-step
sampling trajectories), the largest per-state squared error of the loss at ratio 0, and energy distance,
precision and recall (k = 10) of its samples against held-out exact samples, as the demo reports them.

Recipes (``--recipes``):

    window0    a DX window of 0 substeps (``PiIDConfig``'s DX default before ``DX_WINDOW_SUBSTEPS``), no time skip
    before     the demo's DX recipe before (a window of 1 substep), no time skip
    after      the demo's DX recipe now (1 substep, the sigma-dependent skip of ``SkipStudent``)
    after-w3   3 substeps (``DX_WINDOW_SUBSTEPS``, the official DX recipes' value) and the time skip
    w3-noskip  3 substeps, no time skip (what the window alone does)

A logged point's teacher ratio is that of its window's last iteration; the summary's "mixing" windows are those
that end with a ratio above 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time

import torch

from bench.timing import device_name, git_commit, versions
from piflow_kernels.demo.data import demo_data
from piflow_kernels.demo.evaluation import eval_draws, evaluate_samples, sample_student
from piflow_kernels.demo.settings import FULL, DemoSettings
from piflow_kernels.demo.training import build_student, train_config
from piflow_kernels.distill import ExactDataSource, ExactGMTeacher, Trainer
from piflow_kernels.distill.piid import draw_segment, policy_mean_velocity, sample_segment_start, segment_window, student_policy

NFE = 4
RECIPES = {
    "window0": dict(window_substeps=0, time_skip=False),
    "before": dict(window_substeps=1, time_skip=False),
    "after": dict(window_substeps=1, time_skip=True),
    "after-w3": dict(window_substeps=3, time_skip=True),
    "w3-noskip": dict(window_substeps=3, time_skip=False),
}
# sigma bins of the per-sigma diagnostics: the last segment split finely, where the DX velocity divides by sigma
SIGMA_EDGES = (0.0, 1 / 64, 0.0625, 0.125, 0.25, 0.5, 0.75, 1.0)


def recipe_settings(recipe: str, iters: int) -> DemoSettings:
    """The demo's FULL settings with the DX 4-NFE student of ``recipe`` trained for ``iters`` iterations."""
    dx = dataclasses.replace(FULL.dx, iters={**FULL.dx.iters, NFE: iters}, **RECIPES[recipe])
    return dataclasses.replace(FULL, dx=dx)


def _bin(sigma: float) -> int:
    return next(i for i in range(len(SIGMA_EDGES) - 1) if sigma <= SIGMA_EDGES[i + 1])


@torch.no_grad()
def trajectory_velocity_error(student, cfg, data, n: int = 512, substeps_per_segment: int = 64, seed: int = 5) -> list[dict]:
    """Mean squared velocity error of ``student``'s policy against the exact teacher, binned by sigma, along its own
    4-step trajectories from noise (each segment rolled out with Euler substeps of its own policy)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *data.shape), generator=g)
    sums = [[0.0, 0] for _ in SIGMA_EDGES[1:]]
    size = cfg.base_segment_size
    for seg in range(cfg.nfe):
        r_src = 1.0 - seg * size  # shift 1: raw time is sigma
        sig = torch.full((n,), r_src)
        policy = student_policy(student(x, sig * cfg.num_train_timesteps), x, sig, cfg)
        for k in range(substeps_per_segment):
            s, s_next = r_src - size * k / substeps_per_segment, r_src - size * (k + 1) / substeps_per_segment
            u = policy.velocity(x, s)
            err = float((u - data.velocity(x.double(), s).float()).square().mean())
            b = sums[_bin(s)]
            b[0], b[1] = b[0] + err, b[1] + 1
            x = x + u * (s_next - s)
    return [
        {"sigma_lo": lo, "sigma_hi": hi, "velocity_mse": total / count}
        for (lo, hi), (total, count) in zip(zip(SIGMA_EDGES[:-1], SIGMA_EDGES[1:]), sums)
        if count
    ]


def state_errors(student, teacher, cfg, data, batch: int = 1024, seed: int = 1) -> dict:
    """Per-state squared errors of the pi-ID loss at teacher ratio 0 (one data-dependent batch): the largest, and
    the gradient norm of each sigma bin's share of the loss (how much of the gradient the states near 0 carry)."""
    g = torch.Generator().manual_seed(seed)
    x0 = data.sample(batch, generator=g).float()
    raw_src, size = sample_segment_start(cfg, batch, g)
    s = raw_src[:, None, None, None]  # shift 1
    x_src = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    policy = student_policy(student(x_src, raw_src * cfg.num_train_timesteps), x_src, raw_src, cfg)
    draws = draw_segment(cfg, size, 0.0, None, g)
    window = segment_window(size, cfg)
    detached, x_last, r_last = policy.detach(), x_src, raw_src
    errors, sigmas = [], []
    for i in range(cfg.num_intermediate_states):
        r_a = (r_last - draws.student_intervals[:, i]).clamp(min=0.0)
        with torch.no_grad():
            x_a = detached.rollout(x_last, r_last, r_a, total_substeps=cfg.total_substeps)
            target = teacher(x_a, r_a * cfg.num_train_timesteps)
        pred = policy_mean_velocity(policy, x_a, r_a, r_a, r_a - window, 1.0, cfg.total_substeps, cfg.eps)
        errors.append((pred - target).square().flatten(1).mean(1))
        sigmas.append(r_a)
        x_last, r_last = x_a, r_a
    e, sig = torch.cat(errors), torch.cat(sigmas)
    params = [p for p in student.parameters() if p.requires_grad]
    bins = []
    for lo, hi in zip(SIGMA_EDGES[:-1], SIGMA_EDGES[1:]):
        m = (sig > lo) & (sig <= hi) if lo > 0 else sig <= hi
        if not bool(m.any()):
            continue
        share = 0.5 * cfg.loss_scale * (e * m).sum() / e.numel()
        grads = torch.autograd.grad(share, params, retain_graph=True, allow_unused=True)
        norm = math.sqrt(sum(float(gr.square().sum()) for gr in grads if gr is not None))
        bins.append({"sigma_lo": lo, "sigma_hi": hi, "states": int(m.sum()), "mean_sq_error": float(e[m].detach().mean()),
                     "max_sq_error": float(e[m].detach().max()), "loss_share_grad_norm": norm})  # fmt: skip
    return {"min_sigma": float(sig.min()), "max_sq_error": float(e.detach().max()), "bins": bins}


def _curve_point(recipe: str, iteration: int, window: list[tuple[float, float, float]], ema_loss: float) -> dict:
    """One logged point: mean and max of the window's (loss, grad norm, teacher ratio) triples; printed."""
    loss, grad = [w[0] for w in window], [w[1] for w in window]
    point = {
        "iteration": iteration,
        "teacher_ratio": window[-1][2],
        "loss_mean": sum(loss) / len(loss),
        "loss_max": max(loss),
        "grad_norm_mean": sum(grad) / len(grad),
        "grad_norm_max": max(grad),
        "ema_loss_q0": ema_loss,
    }
    print(
        f"[{recipe}] it {iteration:5d}  q {point['teacher_ratio']:.2f}  loss mean {point['loss_mean']:.4f} "
        f"max {point['loss_max']:.4f}  grad norm mean {point['grad_norm_mean']:.3f} max {point['grad_norm_max']:.3f}  "
        f"EMA loss (q=0) {ema_loss:.4f}",
        flush=True,
    )
    return point


def run_recipe(recipe: str, iters: int, decay_iters: int, log_every: int, eval_n: int, seed: int = 0) -> dict:
    """Train the DX 4-NFE student of ``recipe`` and measure it; returns the JSON record of the run."""
    data = demo_data()
    settings = recipe_settings(recipe, iters)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train_config("DX", NFE, data, settings, seed, tmp, progress=False)
        cfg = dataclasses.replace(cfg, piid=dataclasses.replace(cfg.piid, num_decay_iters=decay_iters))
        student = build_student("DX", NFE, data, settings, seed)
        teacher = ExactGMTeacher(data, num_train_timesteps=cfg.piid.num_train_timesteps)
        curve, window = [], []
        t0 = time.perf_counter()
        with Trainer(cfg, student=student, teacher=teacher, data=ExactDataSource(data), exact_data=data) as trainer:
            for it in range(iters):
                logs = trainer.train_step()
                window.append((float(logs["loss"]), float(logs["grad_norm"]), float(logs.get("teacher_ratio", 0.0))))
                if (it + 1) % log_every == 0 or it + 1 == iters:
                    curve.append(_curve_point(recipe, it + 1, window, trainer.imitation_loss()))
                    window = []
            train_seconds = time.perf_counter() - t0
            ema = trainer.ema.module.eval()
            states = state_errors(trainer.student, teacher, cfg.piid, data)  # the live weights the gradient acts on
            velocity = trajectory_velocity_error(ema, cfg.piid, data)
            draw = eval_draws(data, eval_n, 1, seed)[0]
            metrics = evaluate_samples(sample_student(ema, cfg.piid, draw.noise), draw.reference)
    after = [p for p in curve if p["teacher_ratio"] == 0.0]
    mixing = [p for p in curve if p["teacher_ratio"] > 0.0]
    summary = {
        "loss_mean_last_mixing_window": mixing[-1]["loss_mean"] if mixing else None,
        "loss_max_after_mixing": max(p["loss_max"] for p in after) if after else None,
        "grad_norm_max_during_mixing": max(p["grad_norm_max"] for p in mixing) if mixing else None,
        "grad_norm_max_after_mixing": max(p["grad_norm_max"] for p in after) if after else None,
        "loss_mean_final": curve[-1]["loss_mean"],
        "ema_loss_q0_final": curve[-1]["ema_loss_q0"],
    }
    print(f"[{recipe}] {json.dumps(summary)}")
    print(f"[{recipe}] EMA student: energy distance {metrics['distance']:.5f}  precision {metrics['precision']:.3f}  "
          f"recall {metrics['recall']:.3f}  ({eval_n} samples, train {train_seconds:.0f} s)")  # fmt: skip
    print(f"[{recipe}] pi-ID states at q=0: min sigma {states['min_sigma']:.2e}, max squared error {states['max_sq_error']:.3g}")
    for b in velocity:
        print(f"[{recipe}]   sigma ({b['sigma_lo']:.4f}, {b['sigma_hi']:.4f}]  velocity mse {b['velocity_mse']:.4f}")
    return {
        "recipe": recipe,
        "settings": RECIPES[recipe],
        "iters": iters,
        "decay_iters": decay_iters,
        "train_seconds": train_seconds,
        "curve": curve,
        "summary": summary,
        "metrics": metrics,
        "eval_samples": eval_n,
        "piid_states_q0": states,
        "trajectory_velocity_mse": velocity,
    }


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo), None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.dx_stability", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--iters", type=int, default=600, help="training iterations (default 600)")
    p.add_argument("--decay-iters", type=int, default=None, help="teacher-ratio decay length (default iters // 2)")
    p.add_argument("--log-every", type=int, default=25, help="iterations per logged window (default 25)")
    p.add_argument("--eval-n", type=int, default=2000, help="samples for the final metrics (default 2000)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the runs as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    decay = args.iters // 2 if args.decay_iters is None else args.decay_iters
    runs = [run_recipe(r, args.iters, decay, args.log_every, args.eval_n) for r in args.recipes]
    if args.json:
        doc = {"device": device_name("cpu"), "cpu": cpu_model(), "versions": versions(), "git_commit": git_commit(), "runs": runs}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
