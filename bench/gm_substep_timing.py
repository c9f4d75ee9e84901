"""``python -m bench.gm_substep_timing [--b 16 --k 32 --c 4 --side 32] [--threads 1] [--json PATH]``: one GM rollout
substep of the torch twin, per call, eager and ``torch.compile``'d as the rollout compiles it.

Rows: ``centred`` is the torch twin's substep (``ops/gm/torch_twin.py`` ``_gm_substep`` on the precomputed
``rollout_source``: x_src-centred, exact at tiny sigma_src); ``uncentred`` is the x0-space substep it replaced,
kept here as the baseline (``mu_k = x_src - s_src means_k``, ``x0`` formed, ``u = (x - x0) / s``), with its own
precomputed terms; ``velocity`` is :func:`gm_velocity_centred` itself as the substep (nothing precomputed). Each
for one std per sample and per-component stds. Compiled: ``torch.compile(fn, dynamic=False)`` with the batch
dimension marked dynamic, as ``torch_twin._call_substep`` does. Timing: ``time.perf_counter`` around each call
after warm-up, median and p20/p80 in ms, the substep at sigma 0.5 -> 0.49 of a policy built at sigma_src 0.9. The
variants of one (std, mode) are called in turn, one call each per round (a change of load on a shared machine
falls on all of them alike); the CPU column is ``time.process_time`` of the same calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from piflow_kernels.constants import GM_EPS
from piflow_kernels.ops.gm import torch_twin
from piflow_kernels.ops.records import GMTensors


def uncentred_terms(policy: GMTensors) -> tuple:
    """The baseline's rollout-constant terms: mu (B,K,C,L), ||mu||^2 (B,K,L), var (B,K), lw, nu_src, c_src."""
    s_src = policy.sigma_src.float().clamp(min=GM_EPS)
    a_src = 1.0 - s_src
    mu = policy.x_src.float()[:, None] - policy.sigma_src.float()[:, None, None, None] * policy.means.float()
    var = torch_twin.variances(policy.logstds, policy.sigma_src).expand(policy.means.shape[:2])
    nu_src = (a_src / s_src**2)[:, None, None] * policy.x_src.float()
    return mu, (mu * mu).sum(2), var, policy.logweights.float(), nu_src, (a_src / s_src) ** 2


def uncentred_substep(x, s, s_next, mu, mu_sq, var, lw, nu_src, c_src):
    """The x0-space substep ([eq:gm-restructured]) the torch twin used before its centred one."""
    s_c = s.clamp(min=GM_EPS)
    a = 1.0 - s_c
    zeta = (a / s_c) ** 2 - c_src
    nu = (a / s_c**2)[:, None, None] * x - nu_src
    d = (var * zeta[:, None] + 1.0).clamp(min=GM_EPS)
    mu_nu = (mu * nu[:, None]).sum(2)
    w = torch.softmax(lw + (mu_nu - 0.5 * zeta[:, None, None] * mu_sq) / d[:, :, None], dim=1)
    c = w / d[:, :, None]
    x0 = (c[:, :, None] * mu).sum(1) + nu * (c * var[:, :, None]).sum(1, keepdim=True)
    return x + (x - x0) / s_c[:, None, None] * (s_next - s)[:, None, None]


def velocity_substep(x, s, s_next, means, lw, ls, x_src, sigma_src):
    """gm_velocity_centred as the substep: everything recomputed from the policy every call."""
    u = torch_twin.gm_velocity_centred(x, s, GMTensors(means, lw, ls, x_src, sigma_src), torch.float32)
    return x + u * (s_next - s)[:, None, None]


def policy_of(b: int, k: int, c: int, length: int, per_component: bool, seed: int = 0) -> tuple[GMTensors, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(b, k, c, length, generator=gen)
    lw = torch.randn(b, k, length, generator=gen).log_softmax(1)
    ls = torch.randn(b, k if per_component else 1, generator=gen) * 0.3 - 0.7
    x_src = torch.randn(b, c, length, generator=gen)
    x = x_src + 0.5 * torch.randn(b, c, length, generator=gen)
    return GMTensors(means, lw, ls, x_src, torch.full((b,), 0.9)), x


def _compiled(fn):
    compiled = torch.compile(fn, dynamic=False)

    def call(*args):
        for a in args:
            if isinstance(a, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(*args)

    return call


def _round_robin(calls: dict, target_ms: float, min_reps: int = 10, max_reps: int = 400) -> dict:
    """{name: (wall ms list, CPU ms list)}: one call of each in turn per round, so that a change of load on a shared
    machine falls on every variant alike."""
    times = {name: ([], []) for name in calls}
    t_end = time.perf_counter() + target_ms * len(calls) / 1e3
    while True:
        for name, call in calls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            call()
            times[name][0].append((time.perf_counter() - t0) * 1e3)
            times[name][1].append((time.process_time() - c0) * 1e3)
        reps = len(times[name][0])
        if reps >= max_reps or (reps >= min_reps and time.perf_counter() >= t_end):
            return times


def measure(b: int, k: int, c: int, side: int, target_ms: float) -> list[dict]:
    from bench.timing import _quantiles

    rows = []
    s, s_next = torch.full((b,), 0.5), torch.full((b,), 0.49)
    for per_component in (False, True):
        policy, x = policy_of(b, k, c, side * side, per_component)
        variants = {
            "uncentred": (uncentred_substep, uncentred_terms(policy)),
            "centred": (torch_twin._gm_substep, tuple(torch_twin.rollout_source(policy))),
            "velocity": (velocity_substep, tuple(policy)),
        }
        for mode in ("eager", "compiled"):
            calls = {}
            for name, (fn, terms) in variants.items():
                call = _compiled(fn) if mode == "compiled" else fn
                calls[name] = lambda call=call, x=x, terms=terms: call(x, s, s_next, *terms)
            with torch.no_grad():
                for call in calls.values():  # compile and warm up outside the timing
                    for _ in range(3):
                        call()
                times = _round_robin(calls, target_ms)
            for name, (wall, cpu) in times.items():
                t, tc = _quantiles(wall), _quantiles(cpu)
                rows.append({"substep": name, "std": "per-comp" if per_component else "per-sample", "mode": mode,
                             "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "cpu_median_ms": tc.median_ms,
                             "reps": t.reps})  # fmt: skip
                print(f"{name:>10} {rows[-1]['std']:>10} {mode:>8}  {t.median_ms:8.2f} ms  (p20 {t.p20_ms:.2f}, "
                      f"p80 {t.p80_ms:.2f}; CPU {tc.median_ms:.2f} ms; {t.reps} reps)", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gm_substep_timing", description=__doc__.splitlines()[0])
    parser.add_argument("--b", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--c", type=int, default=4)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target-ms", type=float, default=1500.0, help="measured time per row")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench.timing import device_name, git_commit, versions

    print(f"B={args.b} K={args.k} C={args.c} {args.side}x{args.side}, {args.threads} thread(s), load {os.getloadavg()}")
    rows = measure(args.b, args.k, args.c, args.side, args.target_ms)
    by = {(r["substep"], r["std"], r["mode"]): r["median_ms"] for r in rows}
    cpu = {(r["substep"], r["std"], r["mode"]): r["cpu_median_ms"] for r in rows}
    for std in ("per-sample", "per-comp"):
        for mode in ("eager", "compiled"):
            key, base = ("centred", std, mode), ("uncentred", std, mode)
            print(f"centred / uncentred, std {std}, {mode}: {by[key] / by[base]:.2f}x wall, {cpu[key] / cpu[base]:.2f}x CPU")
    if args.json:
        doc = {"config": vars(args), "device": device_name("cpu"), "versions": versions(), "commit": git_commit(),
               "load_before": os.getloadavg(), "rows": rows}  # fmt: skip
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
