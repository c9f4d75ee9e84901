"""The demo's driver: distill every student, evaluate every method, print the table, write results.json and samples.png.

    python -m piflow_kernels demo [--out DIR] [--quick] [--seed N]

    >>> from piflow_kernels.demo import main
    >>> main(["--quick", "--out", "demo_out"])
    0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from piflow_kernels.demo.data import demo_data, teacher_euler
from piflow_kernels.demo.evaluation import (
    DISTANCE_NAME,
    KNN_K,
    SAMPLE_SUBSTEPS,
    EvalDraw,
    eval_draws,
    evaluate_method,
    format_table,
    sample_student,
)
from piflow_kernels.demo.settings import FULL, QUICK, DemoSettings
from piflow_kernels.demo.training import distill_student

__all__ = ["METHODS", "TEACHER_STEPS", "STUDENT_NFES", "DEFAULT_OUT", "run_demo", "build_parser", "main"]

METHODS = ("data", "teacher-euler", "piflow-gm", "piflow-dx")
TEACHER_STEPS = (128, 4, 2, 1)
STUDENT_NFES = (4, 2, 1)
DEFAULT_OUT = "piflow_demo"


def run_demo(out_dir: str | Path, settings: DemoSettings, seed: int = 0, progress: bool = True, plot: bool = True) -> dict:
    """Run the whole benchmark; writes ``results.json`` (and ``samples.png``) under ``out_dir``, the
    students' training logs under ``out_dir/train/<student>/log.jsonl``.

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
            train_dir = out / "train" / f"{method}-{nfe}nfe"
            student, cfg, seconds = distill_student(
                policy_type, nfe, data, settings, seed, progress, init=student, out_dir=train_dir
            )
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
        from piflow_kernels.demo.plot import plot_samples

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
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default: {DEFAULT_OUT})")
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
