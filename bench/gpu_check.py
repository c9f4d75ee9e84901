"""The prepared GPU check: one run on a fresh CUDA machine, at most about five minutes.

    cd repo && PYTHONPATH=. python -m bench.gpu_check --out OUT_DIR [--commit SHA]
    PYTHONPATH=. python -m bench.gpu_check --device cpu --quick --out /tmp/check   # dry run (interpreter)

Parts, each under its own time budget and try/except (a failing part is recorded, the rest go on):
    1. environment   device, versions, measured copy bandwidth, fp32 peak from the table
    2. correctness   every Triton kernel (GM velocity forward/backward, GM rollout, DX velocity
                     forward/backward, DX rollout) against the float64 reference on the device, at
                     several shapes (the benchmark shapes included) and dtypes (fp32, bf16); max
                     relative errors and PASS/FAIL against the test tolerances
    3. pytest        the CUDA-marked tests of the op test files (tests/ops), in a subprocess with a timeout
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

from bench.gpu_common import REPO, Log, time_limit
from bench.gpu_correctness import part_correctness
from bench.gpu_sweep import part_sweep, sweep_summary

# ------------------------------------------------------------------------------------------ pytest


def part_pytest(state: dict, device: str, quick: bool, deadline: float, log) -> None:
    if importlib.util.find_spec("pytest") is None:
        state["pytest"] = dict(status="skipped", reason="pytest is not installed")
        log("    pytest is not installed: skipped")
        return
    # the op tests (one file per op, CUDA cases marked) and the policy tests
    files = sorted(glob.glob(os.path.join(REPO, "tests", "ops", "test_*.py"))) + [os.path.join(REPO, "tests", "test_policies.py")]
    files = [f for f in files if os.path.exists(f)]
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


def _kernel_rows(g, f, v, d) -> list:
    """The rows every plan starts with: the training (g) and FLUX (f) GM rollouts, the GM velocity (v) and
    the DX rollout (d), each in eager and Triton (the velocity also in the torch backend)."""
    return [(g, "eager"), (g, "triton"), (f, "eager"), (f, "triton"), (v, "eager"), (v, "triton"), (v, "torch"),
            (d, "eager"), (d, "triton")]  # fmt: skip


def bench_plan(device: str, quick: bool):
    from bench.cases import Case, case_list

    if quick and device == "cpu":  # dry run: tiny shapes, every backend, the kernels in the interpreter
        g = Case("dry-train", "gm_rollout", 2, 4, 4, (8, 8), 8, tags=("target-train",))
        f = Case("dry-flux", "gm_rollout", 1, 4, 8, (8, 8), 4, shift=3.0, tags=("target-flux",))
        d = Case("dry-train", "dx_rollout", 2, 4, 4, (8, 8), 8)
        v = Case("dry-train", "gm_velocity_fwd_bwd", 2, 4, 4, (8, 8), tags=("target-velocity",))
        return [*_kernel_rows(g, f, v, d), (g, "compile")]
    cases = {(c.name, c.kind): c for c in case_list(device, quick)}
    names = [n for n, _ in cases]
    train, flux, video = names[0], names[1], names[2]
    g, f, vid = cases[(train, "gm_rollout")], cases[(flux, "gm_rollout")], cases[(video, "gm_rollout")]
    v, d = cases[(train, "gm_velocity_fwd_bwd")], cases[(train, "dx_rollout")]
    # torch.compile costs tens of seconds per shape: last, while the budget lasts
    return [*_kernel_rows(g, f, v, d), (vid, "eager"), (vid, "triton"), (g, "compile"), (f, "compile")]


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
