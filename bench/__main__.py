"""``python -m bench [--device cpu|cuda] [--quick] [--json PATH]``: the substep-throughput table.

Prints one table (backend, case, shape, substeps, median and p20/p80 ms, substeps per second,
effective GB/s, % of roofline, speed-up vs the official-style eager baseline) and the issue's
targets that the run can judge; with ``--json`` also writes every row with the device, versions
and git commit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows and machine info here")
    parser.add_argument("--cases", default=None, help="comma-separated case names to keep (e.g. cpu-target)")
    parser.add_argument("--backends", default=None, help="comma-separated backends (eager,compile,torch,triton)")
    parser.add_argument("--target-ms", type=float, default=None, help="measured time per row (default 400 cuda, 2000 cpu)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip remaining rows after this many seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if args.backends and "triton" in args.backends and device == "cpu":
        # the kernels only run on CPU tensors in Triton's interpreter (slow: for smoke runs only)
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from bench.cases import case_list
    from bench.runner import (
        MachineInfo,
        check_targets,
        default_plan,
        format_table,
        format_targets,
        report,
        run_table,
        write_json,
    )

    cases = case_list(device, args.quick)
    if args.cases:
        keep = set(args.cases.split(","))
        cases = [c for c in cases if c.name in keep]
    backends = tuple(args.backends.split(",")) if args.backends else None
    machine = MachineInfo.measure(device)
    print(f"device: {machine.name}; torch {machine.versions['torch']}, triton {machine.versions['triton']}; "
          f"commit {machine.commit}")  # fmt: skip
    bw = f"{machine.copy_gbps:.1f} GB/s" if machine.copy_gbps else "n/a"
    peak = f"{machine.fp32_tflops} TFLOP/s" if machine.fp32_tflops else "n/a (no % of roofline)"
    print(f"copy bandwidth {bw}, fp32 peak {peak}")
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    rows = run_table(default_plan(cases, device, args.quick, backends), machine, deadline=deadline, target_ms=args.target_ms)
    print()
    print(format_table(rows))
    targets = check_targets(rows)
    if targets:
        print("\ntargets:")
        print(format_targets(targets))
    if args.json:
        write_json(report(rows, machine, extra={"quick": args.quick}), args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
