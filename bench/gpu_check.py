"""The prepared GPU check: one run on a fresh CUDA machine, at most about five minutes.

    cd repo && PYTHONPATH=. python -m bench.gpu_check --out OUT_DIR [--commit SHA]
    PYTHONPATH=. python -m bench.gpu_check --device cpu --quick --out /tmp/check   # dry run (interpreter)

Parts, each under its own time budget and try/except (a failing part is recorded, the rest go on):
    1. environment   device, versions, measured copy bandwidth, fp32 peak from the table
    2. correctness   every Triton kernel (GM velocity forward/backward, GM rollout, DX velocity
                     forward/backward, DX rollout) against the float64 reference on the device, at
                     several shapes (the benchmark shapes included) and dtypes (fp32, bf16); max
                     relative errors and PASS/FAIL against the test tolerances
    3. pytest        the CUDA-marked tests of the kernel test files, in a subprocess with a timeout
    4. benchmark     the table (official-style eager, torch.compile of it, Triton) and the issue's
                     targets, MET/MISSED
    5. sweep         each GM kernel alone at the training shape for several chunk budgets and warp
                     counts (the launch defaults' evidence), GB/s and % of the copy bandwidth
Writes ``gpu_check.json`` and ``gpu_check.log`` into ``--out`` and prints a short summary last.
A watchdog thread writes what it has and exits if the whole run overstays its budget.
Imports nothing from diffusers; needs only torch and triton (pytest for part 3, skipped without it).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

# tolerances of the test suite (tests/conftest.py TOL): max |out - ref| / max |ref|
TOL = {
    "velocity": {"float32": 2e-5, "bfloat16": 1e-2},
    "rollout": {"float32": 1e-4, "bfloat16": 1e-2},
    "grad": {"float32": 1e-4, "bfloat16": 1e-2},
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Log:
    """print() to stdout and to the log file, flushed line by line."""

    def __init__(self, path: str):
        self.fh = open(path, "a", buffering=1)

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.fh.write(line + "\n")


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (checked between Python bytecodes)."""
    if seconds <= 0:
        raise TimeoutError("no time left in the budget")
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError(f"part exceeded its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------ correctness


@dataclass(frozen=True)
class Check:
    """One correctness configuration. ``components`` is K (GM) or N (DX)."""

    op: str  # "gm" or "dx"
    batch: int
    components: int
    channels: int
    spatial: tuple[int, ...]
    dtype: str = "float32"
    substeps: int = 128
    shift: float = 1.0
    per_component_std: bool = False
    neg_inf: bool = False
    non_contiguous: bool = False
    polynomial: bool = False
    rollout: bool = True

    @property
    def label(self) -> str:
        letter = "K" if self.op == "gm" else "N"
        extra = [self.dtype]
        if self.shift != 1.0:
            extra.append(f"shift{self.shift}")
        for flag, name in ((self.per_component_std, "std/k"), (self.neg_inf, "-inf"), (self.non_contiguous, "strided"),
                           (self.polynomial, "poly")):  # fmt: skip
            if flag:
                extra.append(name)
        sp = "x".join(map(str, self.spatial))
        return f"{self.op}-B{self.batch}-{letter}{self.components}-C{self.channels}-{sp}-" + "-".join(extra)


def correctness_checks(device: str, quick: bool) -> list[Check]:
    if quick:
        return [
            Check("gm", 2, 3, 5, (7, 9), substeps=16, shift=3.2, neg_inf=True),
            Check("gm", 2, 4, 4, (2, 3, 5), "bfloat16", substeps=8, per_component_std=True, non_contiguous=True),
            Check("dx", 2, 5, 5, (7, 9), substeps=16, shift=3.2),
            Check("dx", 2, 3, 4, (2, 3, 5), "bfloat16", substeps=8, polynomial=True, non_contiguous=True),
        ]
    return [
        # odd shapes and the edges of the range (cheap: first)
        Check("gm", 3, 3, 5, (7, 9), substeps=128, shift=3.2, neg_inf=True, per_component_std=True),
        Check("gm", 3, 8, 16, (3, 7, 9), "bfloat16", substeps=64, non_contiguous=True),
        Check("gm", 2, 64, 64, (9, 7), substeps=32, per_component_std=True, neg_inf=True),
        Check("gm", 2, 1, 1, (7, 9), substeps=16),
        Check("gm", 2, 65, 4, (8, 8), substeps=8),  # outside the range: must fall back, still right
        Check("dx", 3, 5, 5, (7, 9), substeps=128, shift=3.2, non_contiguous=True),
        Check("dx", 3, 4, 16, (3, 7, 9), "bfloat16", substeps=64, polynomial=True),
        Check("dx", 2, 64, 8, (9, 7), substeps=32),
        # the benchmark shapes
        Check("gm", 512, 32, 4, (32, 32), substeps=128),
        Check("gm", 1, 8, 16, (128, 128), substeps=32, shift=3.0),
        Check("dx", 512, 10, 4, (32, 32), substeps=128),
        Check("gm", 512, 32, 4, (32, 32), "bfloat16", substeps=128, rollout=False),
        Check("gm", 1, 8, 16, (8, 40, 40), "bfloat16", substeps=32, shift=3.0),
        Check("dx", 1, 10, 16, (128, 128), "bfloat16", substeps=32, shift=3.0),
    ]


def _rel_err(out, ref) -> float:
    import torch

    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _record(records, log, check, quantity, err, tol_kind, torch_err=None):
    """One error figure. PASS within the test tolerance, or (as flash-attention bounds its kernels) within
    twice the error of the library's own float32 torch path on the same inputs, when the fixed tolerance
    is beyond float32 for those inputs."""
    tol = TOL[tol_kind][check.dtype]
    ok = err <= tol
    verdict = "PASS" if ok else "FAIL"
    if not ok and torch_err is not None and err <= 2.0 * torch_err:
        ok, verdict = True, "PASS (<= 2x torch fp32 error)"
    records.append(dict(check=check.label, op=check.op, quantity=quantity, dtype=check.dtype, rel_err=err, tol=tol,
                        torch_rel_err=torch_err, passed=ok))  # fmt: skip
    extra = f"  torch {torch_err:9.2e}" if torch_err is not None else ""
    log(f"    {check.label:<52} {quantity:<18} rel err {err:9.2e}  tol {tol:.0e}{extra}  {verdict}")


@contextmanager
def _eager_torch_path():
    """The torch path without torch.compile (its compile would cost tens of seconds of the budget)."""
    old = os.environ.get("PIFLOW_COMPILE")
    os.environ["PIFLOW_COMPILE"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PIFLOW_COMPILE", None)
        else:
            os.environ["PIFLOW_COMPILE"] = old


def check_and_record(check: Check, device: str, log, records: list) -> None:
    """Run one check on the Triton backend; for figures over tolerance, also measure the torch path."""
    run = run_gm_check if check.op == "gm" else run_dx_check
    results = run(check, device, "triton")
    over = [q for q, err, kind in results if not err <= TOL[kind][check.dtype]]
    torch_errs: dict[str, float] = {}
    if over:
        try:
            with _eager_torch_path():
                torch_errs = {q: err for q, err, _ in run(check, device, "torch")}
        except Exception as err:  # the comparison is a courtesy: the fixed-tolerance verdict stands
            log(f"    {check.label:<52} torch-path comparison failed: {type(err).__name__}: {err}"[:300])
    for quantity, err, kind in results:
        _record(records, log, check, quantity, err, kind, torch_errs.get(quantity) if quantity in over else None)


def _sigmas(batch, gen, lo, hi):
    import torch

    return lo + (hi - lo) * torch.rand(batch, generator=gen)


def run_gm_check(check: Check, device: str, backend: str = "triton") -> list[tuple[str, float, str]]:
    """(quantity, max rel err vs float64, tolerance kind) of the GM velocity, its gradients and a rollout."""
    import torch

    import piflow_kernels as pk
    from piflow_kernels import reference

    dt = getattr(torch, check.dtype)
    results: list[tuple[str, float, str]] = []
    gen = torch.Generator().manual_seed(zlib.crc32(check.label.encode()))
    b, k, c, sp = check.batch, check.components, check.channels, check.spatial
    ones = (1,) * len(sp)

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen)

    if check.non_contiguous:  # channels-last storage: the flat (.., C, L) views have stride_c = 1
        means = rnd(b, k, *sp, c).movedim(-1, 2)
        x_src = rnd(b, *sp, c).movedim(-1, 1)
    else:
        means, x_src = rnd(b, k, c, *sp), rnd(b, c, *sp)
    logweights = torch.log_softmax(rnd(b, k, 1, *sp, scale=2.0), dim=1)
    if check.neg_inf and k > 1:
        drop = torch.rand(b, k, generator=gen) < 0.3
        drop[:, 0] = False  # never all of a sample's components
        logweights = logweights.masked_fill(drop.reshape(b, k, 1, *ones), float("-inf"))
    logstds = rnd(b, k if check.per_component_std else 1, 1, *ones, scale=0.3) - 1.0
    sigma_src = _sigmas(b, gen, 0.6, 1.0)
    sigma = _sigmas(b, gen, 0.05, 0.95)
    x = x_src + 0.5 * rnd(*x_src.shape)

    to_dev = lambda t: t.to(device=device, dtype=dt)  # noqa: E731 (keeps strides of the non-contiguous views)
    means_d, lw_d, ls_d, xs_d, x_d = map(to_dev, (means, logweights, logstds, x_src, x))
    ss_d, s_d = sigma_src.to(device), sigma.to(device)
    leaves = [t.detach().requires_grad_(True) for t in (means_d, lw_d, ls_d, x_d, xs_d)]
    pol = pk.GMFlowPolicy(leaves[0], leaves[1], leaves[2], leaves[4], ss_d, backend=backend)
    u = pol.velocity(leaves[3], s_d)
    grad_u = rnd(*x.shape).to(device)
    grads = torch.autograd.grad(u, leaves, grad_u.to(dt))

    leaves64 = [t.detach().double().requires_grad_(True) for t in (means_d, lw_d, ls_d, x_d, xs_d)]
    u64 = reference.gm_velocity(leaves64[3], s_d.double(), leaves64[0], leaves64[1], leaves64[2], leaves64[4], ss_d.double())
    grads64 = torch.autograd.grad(u64, leaves64, grad_u.double())
    results.append(("velocity", _rel_err(u, u64), "velocity"))
    for name, g, g64 in zip(("grad means", "grad logweights", "grad logstds", "grad x", "grad x_src"), grads, grads64):
        finite = torch.isfinite(g64)  # -inf logweights: reference gradients there may be NaN
        results.append((name, _rel_err(g[finite], g64[finite]), "grad"))
    del u, grads, u64, grads64, leaves64

    if check.rollout:
        with torch.no_grad():
            s_end = (ss_d * torch.rand(b, generator=gen).to(device) * 0.8).clamp(0.0, 1.0)
            s_end[0] = 0.0  # one full-length rollout; the others stop at different sigmas
            pol_r = pk.GMFlowPolicy(means_d, lw_d, ls_d, xs_d, ss_d, backend=backend)
            x_end = pol_r.rollout(xs_d, ss_d, s_end, total_substeps=check.substeps, shift=check.shift)
            m64, lw64, ls64, xs64, ss64 = means_d.double(), lw_d.double(), ls_d.double(), xs_d.double(), ss_d.double()
            vel = lambda xx, s: reference.gm_velocity(xx, s, m64, lw64, ls64, xs64, ss64)  # noqa: E731
            x_ref = reference.rollout(vel, xs64, ss64, s_end.double(), check.substeps, check.shift)
            results.append((f"rollout({check.substeps})", _rel_err(x_end, x_ref), "rollout"))
    return results


def run_dx_check(check: Check, device: str, backend: str = "triton") -> list[tuple[str, float, str]]:
    """(quantity, max rel err vs float64, tolerance kind) of the DX velocity, its gradients and a rollout."""
    import torch

    import piflow_kernels as pk
    from piflow_kernels import reference

    dt = getattr(torch, check.dtype)
    results: list[tuple[str, float, str]] = []
    gen = torch.Generator().manual_seed(zlib.crc32(check.label.encode()))
    b, n, c, sp = check.batch, check.components, check.channels, check.spatial
    if check.non_contiguous:
        grid = torch.randn(b, n, *sp, c, generator=gen).movedim(-1, 2)
        x_src = torch.randn(b, *sp, c, generator=gen).movedim(-1, 1)
    else:
        grid = torch.randn(b, n, c, *sp, generator=gen)
        x_src = torch.randn(b, c, *sp, generator=gen)
    x = x_src + 0.5 * torch.randn(x_src.shape, generator=gen)
    sigma_src, sigma = _sigmas(b, gen, 0.6, 1.0), _sigmas(b, gen, 0.05, 0.95)
    mode = "polynomial" if check.polynomial else "grid"
    seg_size = 0.6

    to_dev = lambda t: t.to(device=device, dtype=dt)  # noqa: E731
    grid_d, xs_d, x_d = map(to_dev, (grid, x_src, x))
    ss_d, s_d = sigma_src.to(device), sigma.to(device)
    leaves = [t.detach().requires_grad_(True) for t in (grid_d, x_d, xs_d)]
    pol = pk.DXPolicy(leaves[0], leaves[2], ss_d, segment_size=seg_size, shift=check.shift, mode=mode, backend=backend)
    u = pol.velocity(leaves[1], s_d)
    grad_u = torch.randn(x.shape, generator=gen).to(device)
    grads = torch.autograd.grad(u, leaves, grad_u.to(dt))
    leaves64 = [t.detach().double().requires_grad_(True) for t in (grid_d, x_d, xs_d)]
    u64 = reference.dx_velocity(leaves64[1], s_d.double(), leaves64[0], leaves64[2], ss_d.double(), seg_size, check.shift, mode)
    grads64 = torch.autograd.grad(u64, leaves64, grad_u.double())
    results.append(("velocity", _rel_err(u, u64), "velocity"))
    for name, g, g64 in zip(("grad grid", "grad x", "grad x_src"), grads, grads64):
        results.append((name, _rel_err(g, g64), "grad"))
    del u, grads, u64, grads64, leaves64

    if check.rollout:
        with torch.no_grad():
            s_end = (ss_d * torch.rand(b, generator=gen).to(device) * 0.8).clamp(0.0, 1.0)
            s_end[0] = 0.0
            pol_r = pk.DXPolicy(grid_d, xs_d, ss_d, segment_size=seg_size, shift=check.shift, mode=mode, backend=backend)
            x_end = pol_r.rollout(xs_d, ss_d, s_end, total_substeps=check.substeps, shift=check.shift)
            g64, xs64, ss64 = grid_d.double(), xs_d.double(), ss_d.double()
            vel = lambda xx, s: reference.dx_velocity(xx, s, g64, xs64, ss64, seg_size, check.shift, mode)  # noqa: E731
            x_ref = reference.rollout(vel, xs64, ss64, s_end.double(), check.substeps, check.shift)
            results.append((f"rollout({check.substeps})", _rel_err(x_end, x_ref), "rollout"))
    return results


def part_correctness(state: dict, device: str, quick: bool, deadline: float, log) -> None:
    import torch

    records = state.setdefault("correctness", [])
    failures = state.setdefault("correctness_errors", {})
    for check in correctness_checks(device, quick):
        if time.monotonic() > deadline:
            failures[check.label] = "skipped: time budget spent"
            log(f"    {check.label:<52} skipped (time budget)")
            continue
        try:
            with time_limit(deadline - time.monotonic()):
                check_and_record(check, device, log, records)
        except Exception as err:
            failures[check.label] = f"{type(err).__name__}: {err}"[:400]
            state.setdefault("tracebacks", {})[check.label] = traceback.format_exc(limit=8)
            log(f"    {check.label:<52} ERROR {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ pytest


def part_pytest(state: dict, device: str, quick: bool, deadline: float, log) -> None:
    if importlib.util.find_spec("pytest") is None:
        state["pytest"] = dict(status="skipped", reason="pytest is not installed")
        log("    pytest is not installed: skipped")
        return
    files = sorted(set(glob.glob(os.path.join(REPO, "tests", "test_*cuda*.py")))
                   | set(glob.glob(os.path.join(REPO, "tests", "test_*triton*.py"))))  # fmt: skip
    if not files:
        state["pytest"] = dict(status="skipped", reason="no kernel test files")
        return
    env = dict(os.environ)
    if device == "cuda":
        env["TRITON_INTERPRET"] = "0"  # the test conftest defaults it to 1 (CPU); run the real kernels
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", *[os.path.relpath(f, REPO) for f in files], "-m", "cuda", "-q",
           "-p", "no:cacheprovider", "--no-header", "-rfE"]  # fmt: skip
    timeout = max(5.0, deadline - time.monotonic())
    log(f"    $ {' '.join(cmd[1:])}   (timeout {timeout:.0f} s)")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "passed" if proc.returncode == 0 else ("no tests" if proc.returncode == 5 else "failed")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    tail = "\n".join((out or "").strip().splitlines()[-40:])
    for line in tail.splitlines():
        log("    | " + line)
    state["pytest"] = dict(status=status, returncode=proc.returncode, files=[os.path.relpath(f, REPO) for f in files],
                           tail=tail)  # fmt: skip


# ------------------------------------------------------------------------------------------ benchmark


def bench_plan(device: str, quick: bool):
    from bench.cases import Case, case_list

    if quick and device == "cpu":  # dry run: tiny shapes, every backend, the kernels in the interpreter
        g = Case("dry-train", "gm_rollout", 2, 4, 4, (8, 8), 8, tags=("target-train",))
        f = Case("dry-flux", "gm_rollout", 1, 4, 8, (8, 8), 4, shift=3.0, tags=("target-flux",))
        d = Case("dry-train", "dx_rollout", 2, 4, 4, (8, 8), 8)
        v = Case("dry-train", "gm_velocity_fwd_bwd", 2, 4, 4, (8, 8), tags=("target-velocity",))
        return [(g, "eager"), (g, "triton"), (f, "eager"), (f, "triton"), (v, "eager"), (v, "triton"), (v, "torch"),
                (d, "eager"), (d, "triton"), (g, "compile")]  # fmt: skip
    cases = {(c.name, c.kind): c for c in case_list(device, quick)}
    names = [n for n, _ in cases]
    train, flux, video = names[0], names[1], names[2]
    plan = [
        (cases[(train, "gm_rollout")], "eager"),
        (cases[(train, "gm_rollout")], "triton"),
        (cases[(flux, "gm_rollout")], "eager"),
        (cases[(flux, "gm_rollout")], "triton"),
        (cases[(train, "gm_velocity_fwd_bwd")], "eager"),
        (cases[(train, "gm_velocity_fwd_bwd")], "triton"),
        (cases[(train, "gm_velocity_fwd_bwd")], "torch"),
        (cases[(train, "dx_rollout")], "eager"),
        (cases[(train, "dx_rollout")], "triton"),
        (cases[(video, "gm_rollout")], "eager"),
        (cases[(video, "gm_rollout")], "triton"),
        # torch.compile costs tens of seconds per shape: last, while the budget lasts
        (cases[(train, "gm_rollout")], "compile"),
        (cases[(flux, "gm_rollout")], "compile"),
    ]
    return plan


def part_benchmark(state: dict, device: str, quick: bool, deadline: float, log) -> None:
    from bench.runner import check_targets, format_table, format_targets, run_table

    machine = state["_machine"]
    plan = bench_plan(device, quick)
    target_ms = 50.0 if device == "cpu" else 300.0
    rows = state["bench_rows"] = []

    def _log_and_keep(line):
        log(line)

    with time_limit(deadline - time.monotonic() + 30):  # rows check the deadline; this only stops a stuck one
        rows.extend(run_table(plan, machine, deadline=deadline, log=_log_and_keep, target_ms=target_ms))
    order = {}
    for case, _ in plan:
        order.setdefault((case.name, case.kind), len(order))
    backend_order = {"eager": 0, "compile": 1, "torch": 2, "triton": 3}
    rows.sort(key=lambda r: (order.get((r["case"], r["kind"]), 99), backend_order.get(r["backend"], 9)))
    log("")
    for line in format_table(rows).splitlines():
        log(line)
    state["targets"] = check_targets(rows)
    log("")
    dry = " (dry run: tiny shapes in the interpreter, the verdicts only exercise the code)" if device == "cpu" else ""
    log("targets:" + dry)
    for line in format_targets(state["targets"]).splitlines():
        log(line)


# ------------------------------------------------------------------------------------------ sweep

# (chunk register budget, warps per program) of each GM kernel, timed at the training shape
SWEEP_POINTS = {
    "rollout": [(128, 1), (128, 2), (128, 4), (128, 8)],
    "bwd": [(budget, warps) for budget in (16, 32, 64) for warps in (2, 4, 8)],
    "fwd": [(budget, warps) for budget in (32, 64, 128) for warps in (2, 4, 8)],
}


def sweep_bytes(kernel: str, b: int, k: int, c: int, length: int, substeps: int) -> float:
    """Bytes each kernel moves at least once (fp32): policy K*C + K per pixel, plus its per-pixel vectors."""
    px = b * length
    if kernel == "rollout":
        return 4.0 * px * (k * c + k + 3 * c)
    if kernel == "fwd":  # x, x_src in; u, ybar and lse out
        return 4.0 * px * (k * c + k + 4 * c + 1)
    return 4.0 * px * (2 * (k * c + k) + 4 * c + 1)  # bwd: policy in and its gradient out; x, x_src, grad, ybar, lse


def part_sweep(state: dict, device: str, quick: bool, deadline: float, log) -> None:
    """Time each GM kernel alone at the training shape (fp32, one std per sample) for every launch point of
    SWEEP_POINTS, so the defaults in piflow_kernels.ops.triton_common.LAUNCH can be set from data."""

    from bench.cases import gm_kernel_launches
    from bench.timing import time_fn
    from piflow_kernels.ops.gm import triton_common

    b, k, c, length, substeps = (2, 8, 4, 64, 8) if (quick or device == "cpu") else (512, 32, 4, 1024, 128)
    calls = {name: call for name, (_, call) in gm_kernel_launches(b, k, c, length, substeps, device).items()}
    bw = state.get("machine", {}).get("copy_bandwidth_gbps")
    rows = state["sweep"] = []
    saved = {name: dict(v) for name, v in triton_common.LAUNCH.items()}
    log(f"    shape B{b} K{k} C{c} L{length}, rollout {substeps} substeps; defaults {saved}")
    try:
        for kernel, points in SWEEP_POINTS.items():
            for budget, warps in points if device == "cuda" else points[:2]:
                if time.monotonic() > deadline:
                    log("    sweep: out of time")
                    return
                triton_common.LAUNCH[kernel] = {"budget": budget, "num_warps": warps}
                cfg = triton_common.launch_config(k, c, length, budget, warps)
                try:
                    t = time_fn(calls[kernel], device, target_ms=60.0 if device == "cuda" else 20.0)
                except Exception as err:  # noqa: BLE001 - e.g. out of registers / shared memory at this point
                    rows.append(dict(kernel=kernel, budget=budget, num_warps=warps, error=f"{type(err).__name__}: {err}"[:200]))
                    log(f"    {kernel:<8} budget {budget:>3} warps {warps}: ERROR {rows[-1]['error'][:100]}")
                    continue
                finally:
                    triton_common.LAUNCH[kernel] = saved[kernel]
                gbps = sweep_bytes(kernel, b, k, c, length, substeps) / (t.median_ms * 1e6)
                rows.append(dict(kernel=kernel, budget=budget, num_warps=warps, block_k=cfg["BLOCK_K"], block_l=cfg["BLOCK_L"],
                                 median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, gbps=gbps,
                                 pct_copy_bw=100.0 * gbps / bw if bw else None,
                                 default=saved[kernel] == {"budget": budget, "num_warps": warps}))  # fmt: skip
                pct = f"{rows[-1]['pct_copy_bw']:5.1f}% of copy" if bw else ""
                tile = f"BLOCK_K {cfg['BLOCK_K']:>2}, BLOCK_L {cfg['BLOCK_L']:>3}"
                log(f"    {kernel:<8} budget {budget:>3} warps {warps} ({tile}): {t.median_ms:8.3f} ms  {gbps:7.1f} GB/s {pct}")
    finally:
        triton_common.LAUNCH.update(saved)
    for line in sweep_summary(rows):
        log("    " + line)


def sweep_summary(rows: list[dict]) -> list[str]:
    """One line per kernel: its fastest launch point, and the default's time."""
    lines = []
    for kernel in SWEEP_POINTS:
        ok = [r for r in rows if r["kernel"] == kernel and "error" not in r]
        if ok:
            best = min(ok, key=lambda r: r["median_ms"])
            default = next((f"{r['median_ms']:.3f} ms" for r in ok if r["default"]), "-")
            lines.append(f"sweep {kernel:<8} best budget {best['budget']:>3}, {best['num_warps']} warps: "
                         f"{best['median_ms']:.3f} ms (default {default})")  # fmt: skip
    return lines


# ------------------------------------------------------------------------------------------ driver


def _summary(state: dict) -> str:
    dry = " (dry run on CPU, Triton interpreter)" if state.get("device") == "cpu" else ""
    lines = ["", "=" * 100, "GPU CHECK SUMMARY" + dry]
    m = state.get("machine", {})
    lines.append(f"device {m.get('device_name')}  torch {m.get('versions', {}).get('torch')}  "
                 f"triton {m.get('versions', {}).get('triton')}  commit {m.get('git_commit')}")  # fmt: skip
    for name, p in state.get("parts", {}).items():
        lines.append(f"  part {name:<12} {p['status']:<8} {p['seconds']:6.1f} s  {p.get('error') or ''}")
    recs = state.get("correctness", [])
    if recs:
        worst: dict[tuple, dict] = {}
        for r in recs:
            key = (r["op"], r["quantity"].split("(")[0], r["dtype"])
            if key not in worst or r["rel_err"] / r["tol"] > worst[key]["rel_err"] / worst[key]["tol"]:
                worst[key] = r
        n_fail = sum(not r["passed"] for r in recs)
        lines.append(f"  correctness: {len(recs) - n_fail}/{len(recs)} PASS, "
                     f"{len(state.get('correctness_errors', {}))} checks errored/skipped")  # fmt: skip
        for (op, q, dt), r in sorted(worst.items()):
            verdict = "PASS" if r["passed"] else "FAIL"
            lines.append(f"    worst {op} {q:<16} {dt:<9} {r['rel_err']:9.2e} (tol {r['tol']:.0e}) {verdict}  [{r['check']}]")
        for label, err in state.get("correctness_errors", {}).items():
            lines.append(f"    ERROR {label}: {err[:120]}")
    if "pytest" in state:
        lines.append(f"  pytest: {state['pytest'].get('status')} {state['pytest'].get('reason', '')}")
    rows = state.get("bench_rows", [])
    if rows:
        lines.append("  benchmark (median ms, speed-up vs eager, % roofline):")
        for r in rows:
            if r.get("error"):
                lines.append(f"    {r['case']:<16} {r['kind']:<20} {r['backend']:<8} {r['error'][:60]}")
                continue
            sp = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
            roof = f"{r['pct_roofline']:.0f}%" if r.get("pct_roofline") else "-"
            mem = f"{r['peak_mem_mb']:.0f} MiB" if r.get("peak_mem_mb") is not None else ""
            lead = f"    {r['case']:<16} {r['kind']:<20} {r['backend']:<8}"
            lines.append(f"{lead} {r['median_ms']:10.3f} ms {sp:>8} {roof:>6} {mem}")
    lines.extend("  " + line for line in sweep_summary(state.get("sweep", [])))
    for t in state.get("targets", []):
        v = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  [{'MET' if t['met'] else 'MISSED':>6}] {t['name']}: {v}")
    lines.append("=" * 100)
    return "\n".join(lines)


def _write(state: dict, out_dir: str) -> None:
    doc = {k: v for k, v in state.items() if not k.startswith("_")}
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as fh:
        json.dump(doc, fh, indent=1, default=str)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu = dry run in the Triton interpreter")
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--budget-s", type=float, default=285.0, help="total wall-time budget (default 285)")
    parser.add_argument("--commit", default=None, help="git commit to record (the copy may have no .git)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip (correctness,pytest,benchmark,sweep)")
    args = parser.parse_args(argv)

    t_start = time.monotonic()
    budget_end = t_start + args.budget_s
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_check.log"))
    state: dict = dict(device=args.device, quick=args.quick, budget_s=args.budget_s, parts={}, aborted=False)
    lock = threading.Lock()

    def _watchdog():  # the last resort against a hang: save what there is and leave
        with lock:
            state["aborted"] = True
            log(f"WATCHDOG: budget of {args.budget_s:.0f} s overrun by 20 s; writing partial results and exiting")
            try:
                _write(state, args.out)
                log(_summary(state))
            finally:
                os._exit(3)

    dog = threading.Timer(args.budget_s + 20.0, _watchdog)
    dog.daemon = True
    dog.start()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: run with --device cpu for a dry run")
        state["parts"]["environment"] = dict(status="failed", seconds=0.0, error="no CUDA device")
        _write(state, args.out)
        return 2

    skip = set(filter(None, args.skip.split(",")))
    # fractions of the budget: where each part must have finished (benchmark takes what is left)
    plan = [("environment", 0.04), ("correctness", 0.30), ("pytest", 0.52), ("benchmark", 0.80), ("sweep", 0.97)]
    for name, frac in plan:
        deadline = min(t_start + frac * args.budget_s, budget_end)
        if name in skip:
            state["parts"][name] = dict(status="skipped", seconds=0.0)
            continue
        log(f"== {name} (until t = {deadline - t_start:.0f} s)")
        t0 = time.monotonic()
        status, error = "ok", None
        try:
            if name == "environment":
                from bench.runner import MachineInfo

                with time_limit(max(deadline - time.monotonic(), 10.0)):
                    machine = MachineInfo.measure(args.device, commit=args.commit)
                state["_machine"] = machine
                state["machine"] = dict(device=machine.device, device_name=machine.name, versions=machine.versions,
                                        git_commit=machine.commit, copy_bandwidth_gbps=machine.copy_gbps,
                                        fp32_peak_tflops=machine.fp32_tflops)  # fmt: skip
                log(f"    {machine.name}; torch {machine.versions['torch']}, triton {machine.versions['triton']}, "
                    f"CUDA {machine.versions['cuda']}; copy {machine.copy_gbps and round(machine.copy_gbps, 1)} GB/s; "
                    f"fp32 peak {machine.fp32_tflops} TFLOP/s; diffusers imported: {'diffusers' in sys.modules}")  # fmt: skip
            elif name == "correctness":
                part_correctness(state, args.device, args.quick, deadline, log)
                if any(not r["passed"] for r in state.get("correctness", [])) or state.get("correctness_errors"):
                    status = "failed"
            elif name == "pytest":
                part_pytest(state, args.device, args.quick, deadline, log)
                status = {"passed": "ok", "skipped": "skipped", "no tests": "ok"}.get(state["pytest"]["status"], "failed")
            elif name == "benchmark":
                if "_machine" not in state:
                    from bench.runner import MachineInfo

                    state["_machine"] = MachineInfo(args.device, args.device, None, None)
                part_benchmark(state, args.device, args.quick, deadline, log)
            elif name == "sweep":
                with time_limit(deadline - time.monotonic() + 30):
                    part_sweep(state, args.device, args.quick, deadline, log)
        except BaseException as err:  # noqa: BLE001 - record, go on to the next part
            if isinstance(err, KeyboardInterrupt):
                raise
            status, error = "failed", f"{type(err).__name__}: {err}"[:400]
            state.setdefault("tracebacks", {})[name] = traceback.format_exc(limit=8)
            log(f"    part {name} failed: {error}")
        state["parts"][name] = dict(status=status, seconds=time.monotonic() - t0, error=error)
        with lock:
            _write(state, args.out)
    state["diffusers_imported"] = "diffusers" in sys.modules
    state["total_seconds"] = time.monotonic() - t_start
    with lock:
        dog.cancel()
        _write(state, args.out)
        log(_summary(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
