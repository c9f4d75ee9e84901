"""Run the benchmark cases on each backend, collect rows, check the targets, print and save them.

Backends (one row each per case):
    eager    the baseline. Rollouts: the official-style loop (:mod:`bench.official_style`); velocity
             forward+backward: autograd through ``reference.gm_velocity`` in float32.
    compile  ``torch.compile`` of the official-style substep, Python loop around it (GM rollouts).
    torch    the library's CPU path (``backend="torch"``).
    triton   the library's Triton kernels (``backend="triton"``).
Speed-ups are against the ``eager`` row of the same case.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import piflow_kernels as pk
from bench import official_style
from bench.cases import Case, cost, dx_inputs, gm_inputs
from bench.timing import (
    copy_bandwidth_gbps,
    device_name,
    fp32_peak_tflops,
    git_commit,
    peak_memory_mb,
    time_fn,
    versions,
)
from piflow_kernels import reference

BACKENDS = ("eager", "compile", "torch", "triton")


def default_backends(device: str, kind: str, quick: bool = False) -> tuple[str, ...]:
    """Backends benchmarked by default for a device and case kind.

    On CPU the Triton kernels only run in the interpreter (no timing value), and ``torch.compile``
    of each quick shape costs more than the quick run itself, so both are opt-in there.
    """
    if device == "cuda":
        return {"gm_rollout": ("eager", "compile", "triton"), "dx_rollout": ("eager", "triton")}.get(
            kind, ("eager", "torch", "triton")
        )
    if kind == "gm_rollout" and not quick:
        return ("eager", "compile", "torch")
    return ("eager", "torch")


def default_plan(cases: list[Case], device: str, quick: bool = False,
                 backends: tuple[str, ...] | None = None) -> list[tuple[Case, str]]:  # fmt: skip
    """(case, backend) pairs in table order; ``compile`` applies to GM rollouts only."""
    plan = []
    for case in cases:
        for backend in backends or default_backends(device, case.kind, quick):
            if backend == "compile" and case.kind != "gm_rollout":
                continue
            plan.append((case, backend))
    return plan


@dataclass
class MachineInfo:
    device: str
    name: str
    copy_gbps: float | None
    fp32_tflops: float | None
    versions: dict = field(default_factory=dict)
    commit: str | None = None

    @classmethod
    def measure(cls, device: str, commit: str | None = None, measure_bandwidth: bool = True) -> MachineInfo:
        bw = None
        if measure_bandwidth:
            try:
                bw = copy_bandwidth_gbps(device)
            except Exception:  # a figure we can live without
                bw = None
        return cls(device, device_name(device), bw, fp32_peak_tflops(device), versions(), commit or git_commit())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _first_call_seconds(fn: Callable[[], object], device: str) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def build_callable(case: Case, backend: str, device: str) -> tuple[Callable[[], object], Callable[[], float | None]]:
    """(fn, compile_seconds) for one case on one backend; fn runs the whole workload once.

    compile_seconds() reports a known compilation time after the first call (torch CPU path), else None.
    """
    b = case.batch
    no_compile = lambda: None  # noqa: E731
    if case.kind == "gm_rollout":
        p = gm_inputs(case, device)
        s_start, s_end = p["sigma_src"], torch.zeros(b, device=device)
        args = (p["means"], p["logweights"], p["logstds"], p["x_src"], p["sigma_src"])
        if backend in ("eager", "compile"):
            pol = official_style.OfficialStyleGMPolicy(*args)
            run = official_style.official_style_rollout
            if backend == "compile":
                official_style.reset_compiled()
                run = official_style.compiled_official_style_rollout
            return (lambda: run(pol, p["x_src"], s_start, s_end, case.substeps, case.shift)), no_compile
        pol = pk.GMFlowPolicy(*args, backend=backend)
        # the official-style baseline rounds its substep counts (LakonLab before v0.2.0): the same work on both sides
        fn = lambda: pol.rollout(p["x_src"], s_start, s_end, case.substeps, case.shift, substep_rule="round")  # noqa: E731
        if backend == "torch":
            from piflow_kernels.ops.gm import torch_twin

            return fn, torch_twin.last_compile_seconds
        return fn, no_compile

    if case.kind == "dx_rollout":
        p = dx_inputs(case, device)
        s_start, s_end = p["sigma_src"], torch.zeros(b, device=device)
        if backend == "eager":
            pol = official_style.OfficialStyleDXPolicy(p["grid"], p["x_src"], p["sigma_src"], 1.0, case.shift)
            return (lambda: official_style.official_style_rollout(pol, p["x_src"], s_start, s_end, case.substeps,
                                                                  case.shift)), no_compile  # fmt: skip
        pol = pk.DXPolicy(p["grid"], p["x_src"], p["sigma_src"], segment_size=1.0, shift=case.shift, backend=backend)
        return (lambda: pol.rollout(p["x_src"], s_start, s_end, case.substeps, case.shift, substep_rule="round")), no_compile

    if case.kind == "gm_velocity_fwd_bwd":
        p = gm_inputs(case, device)
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = p["x_src"] + 0.5 * torch.randn(p["x_src"].shape, generator=gen).to(device)
        sigma = (0.2 + 0.7 * torch.rand(b, generator=gen)).to(device)
        grad_u = torch.randn(p["x_src"].shape, generator=gen).to(device)
        leaves = [p[n].detach().clone().requires_grad_(True) for n in ("means", "logweights", "logstds")]
        if backend == "eager":

            def fn():
                u = reference.gm_velocity(x, sigma, leaves[0], leaves[1], leaves[2], p["x_src"], p["sigma_src"])
                return torch.autograd.grad(u, leaves, grad_u)

            return fn, no_compile
        pol = pk.GMFlowPolicy(leaves[0], leaves[1], leaves[2], p["x_src"], p["sigma_src"], backend=backend)

        def fn():
            return torch.autograd.grad(pol.velocity(x, sigma), leaves, grad_u)

        return fn, no_compile
    raise ValueError(f"unknown case kind {case.kind!r}")


def run_case(case: Case, backend: str, machine: MachineInfo, target_ms: float | None = None,
             measure_memory: bool = True) -> dict:  # fmt: skip
    """Benchmark one case on one backend; returns its row (``error`` set when it failed)."""
    device = machine.device
    row = dict(case=case.name, kind=case.kind, shape=case.shape, backend=backend, substeps=case.substeps,
               tags=list(case.tags), error=None)  # fmt: skip
    try:
        nbytes, flops = cost(case)
        row.update(bytes=nbytes, flops=flops)
        fn, compile_seconds = build_callable(case, backend, device)
        row["first_call_s"] = _first_call_seconds(fn, device)
        row["compile_s"] = compile_seconds()
        t = time_fn(fn, device, target_ms=target_ms)
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)
        row["peak_mem_mb"] = peak_memory_mb(fn, device) if measure_memory else None
        del fn
    except Exception as err:  # one failing backend must not stop the table
        row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        row["traceback"] = traceback.format_exc(limit=6)
        return row
    secs = row["median_ms"] * 1e-3
    row["substeps_per_s"] = case.substeps / secs
    row["gbps"] = nbytes / secs / 1e9
    t_mem = nbytes / (machine.copy_gbps * 1e9) if machine.copy_gbps else None
    t_flop = flops / (machine.fp32_tflops * 1e12) if machine.fp32_tflops else None
    if t_mem is not None and t_flop is not None:
        row["roofline_ms"] = max(t_mem, t_flop) * 1e3
        row["pct_roofline"] = 100.0 * row["roofline_ms"] / row["median_ms"]
        row["roofline_ratio"] = row["median_ms"] / row["roofline_ms"]
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup = eager median / row median and mem_ratio = peak memory / eager's, per case."""
    eager = {(r["case"], r["kind"], r["shape"]): r for r in rows if r["backend"] == "eager" and not r.get("error")}
    for r in rows:
        base = eager.get((r["case"], r["kind"], r["shape"]))
        if base is None or r.get("error"):
            continue
        r["speedup"] = base["median_ms"] / r["median_ms"]
        if r.get("peak_mem_mb") is not None and base.get("peak_mem_mb"):
            r["mem_ratio"] = r["peak_mem_mb"] / base["peak_mem_mb"]


def _find(rows, tag, backend):
    for r in rows:
        if tag in r.get("tags", ()) and r["backend"] == backend:
            return r
    return None


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets that the rows allow to judge; each {name, value, threshold, met}."""
    out = []

    def add(name, row, key, threshold, better="higher", scale=1.0):
        if row is None:
            return
        value = row.get(key)
        if row.get("error") or value is None:
            out.append(dict(name=name, value=None, threshold=threshold, met=False, note=row.get("error") or f"no {key}"))
            return
        value = value * scale
        met = value >= threshold if better == "higher" else value <= threshold
        out.append(dict(name=name, value=value, threshold=threshold, met=bool(met)))

    train = _find(rows, "target-train", "triton")
    add("GM rollout B512-K32-C4-32x32-128: speed-up vs eager >= 100x", train, "speedup", 100.0)
    add("GM rollout B512-K32-C4-32x32-128: time / roofline <= 1.5", train, "roofline_ratio", 1.5, better="lower")
    add("FLUX-1024 step (32 substeps): speed-up vs eager >= 20x", _find(rows, "target-flux", "triton"), "speedup", 20.0)
    vel = _find(rows, "target-velocity", "triton")
    add("GM velocity fwd+bwd B512-K32-C4-32x32: speed-up vs reference autograd >= 10x", vel, "speedup", 10.0)
    add("GM velocity fwd+bwd B512-K32-C4-32x32: peak memory / reference's <= 0.25", vel, "mem_ratio", 0.25, better="lower")
    add("CPU path B16-K32-C4-32x32-128: speed-up vs official-style eager >= 10x", _find(rows, "target-cpu", "torch"),
        "speedup", 10.0)  # fmt: skip
    return out


def run_table(plan: list[tuple[Case, str]], machine: MachineInfo, deadline: float | None = None,
              log: Callable[[str], None] = print, target_ms: float | None = None) -> list[dict]:  # fmt: skip
    """Rows for every (case, backend) of ``plan``. Past ``deadline`` (time.monotonic) rows are skipped."""
    rows = []
    for case, backend in plan:
        if deadline is not None and time.monotonic() > deadline:
            rows.append(dict(case=case.name, kind=case.kind, shape=case.shape, backend=backend, substeps=case.substeps,
                             tags=list(case.tags), error="skipped: time budget spent"))  # fmt: skip
            log(f"  {case.name:<18} {case.kind:<20} {backend:<8} skipped (time budget)")
            continue
        t0 = time.monotonic()
        row = run_case(case, backend, machine, target_ms=target_ms)
        row["wall_s"] = time.monotonic() - t0
        result = f"{row['median_ms']:10.3f} ms" if not row.get("error") else f"ERROR {row['error']}"
        log(f"  {case.name:<18} {case.kind:<20} {backend:<8} {result}  ({row['wall_s']:.1f} s)")
        rows.append(row)
        if machine.device == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows)
    return rows


def _fmt(v, spec, missing="-"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    return format(v, spec)


def format_table(rows: list[dict]) -> str:
    """One table: backend, case, shape, substeps, median and p20/p80 ms, substeps/s, GB/s, % roofline, speed-up."""
    head = (f"{'case':<18} {'kind':<19} {'shape':<24} {'backend':<8} {'subst':>5} {'median ms':>10} {'p20-p80 ms':>19} "
            f"{'subst/s':>9} {'GB/s':>8} {'%roof':>6} {'speedup':>8} {'peakMiB':>8} {'1st call s':>10}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lead = f"{r['case']:<18} {r['kind']:<19} {r['shape']:<24} {r['backend']:<8} {r['substeps']:>5}"
            lines.append(f"{lead} {r['error'][:70]}")
            continue
        q = f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}"
        first = r.get("compile_s") or r.get("first_call_s")
        lines.append(
            f"{r['case']:<18} {r['kind']:<19} {r['shape']:<24} {r['backend']:<8} {r['substeps']:>5} "
            f"{_fmt(r['median_ms'], '10.3f')} {q:>19} {_fmt(r.get('substeps_per_s'), '9.1f')} {_fmt(r.get('gbps'), '8.2f')} "
            f"{_fmt(r.get('pct_roofline'), '6.1f')} {_fmt(r.get('speedup'), '7.1f') + 'x' if r.get('speedup') else '-':>8} "
            f"{_fmt(r.get('peak_mem_mb'), '8.1f')} {_fmt(first, '10.2f')}"
        )
    return "\n".join(lines)


def format_targets(targets: list[dict]) -> str:
    lines = []
    for t in targets:
        status = "MET" if t["met"] else "MISSED"
        value = _fmt(t["value"], ".3g", missing="n/a")
        note = f"  ({t['note']})" if t.get("note") else ""
        lines.append(f"  [{status:>6}] {t['name']}: {value} (threshold {t['threshold']}){note}")
    return "\n".join(lines)


def report(rows: list[dict], machine: MachineInfo, extra: dict | None = None) -> dict:
    """The JSON document: machine, versions, commit, rows and targets."""
    return dict(
        device=machine.device,
        device_name=machine.name,
        versions=machine.versions,
        git_commit=machine.commit,
        copy_bandwidth_gbps=machine.copy_gbps,
        fp32_peak_tflops=machine.fp32_tflops,
        official_style_posterior_scripted=official_style.posterior_is_scripted(),
        torch_threads=torch.get_num_threads(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        rows=[{k: v for k, v in r.items() if k != "traceback"} for r in rows],
        errors={f"{r['case']}/{r['kind']}/{r['backend']}": r["traceback"] for r in rows if r.get("traceback")},
        targets=check_targets(rows),
        **(extra or {}),
    )


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
