"""Timers and machine figures for the benchmarks.

CUDA: CUDA events around each call after warm-up, with the L2 cache flushed between calls (as
``triton.testing.do_bench`` does) so a policy that fits in L2 is not read from it for free.
CPU: ``time.perf_counter`` around each call, repeats in the same process.
Both report the median and the 20th/80th percentiles in milliseconds.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# fp32 non-tensor-core peak (TFLOP/s, FMA = 2 flops) by device-name substring, first match wins
FP32_PEAK_TFLOPS = (
    ("H100 PCIe", 51.2),
    ("H100 NVL", 60.0),
    ("H100", 66.9),
    ("H200", 66.9),
    ("H800", 66.9),
    ("GH200", 66.9),
    ("B200", 80.0),
    ("A100", 19.5),
    ("A800", 19.5),
    ("L40S", 91.6),
    ("L4", 30.3),
    ("A10", 31.2),
    ("RTX 4090", 82.6),
    ("RTX 3090", 35.6),
)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantiles(times_ms: list[float]) -> Timing:
    times = sorted(times_ms)
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], 1)
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return Timing(statistics.median(times), q[1], q[7], len(times))


def time_cuda(fn: Callable[[], object], target_ms: float = 400.0, min_reps: int = 5, max_reps: int = 100,
              warmup: int = 2) -> Timing:  # fmt: skip
    """Median/p20/p80 of ``fn`` with CUDA events; about ``target_ms`` of measured calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max(target_ms / estimate, min_reps), max_reps))
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")  # 256 MiB > any L2
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cpu(fn: Callable[[], object], target_ms: float = 2000.0, min_reps: int = 3, max_reps: int = 50,
             warmup: int = 1) -> Timing:  # fmt: skip
    """Median/p20/p80 of ``fn`` with ``time.perf_counter``; about ``target_ms`` of measured calls."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = None
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if t_end is None:
            t_end = t0 + target_ms / 1e3
        if len(times) >= min_reps and time.perf_counter() >= t_end:
            break
    return _quantiles(times)


def time_fn(fn: Callable[[], object], device: str, target_ms: float | None = None, **kw) -> Timing:
    if device == "cuda":
        return time_cuda(fn, target_ms=target_ms or 400.0, **kw)
    return time_cpu(fn, target_ms=target_ms or 2000.0, **kw)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak extra device memory (MiB) allocated while ``fn`` runs, beyond what was allocated before."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbps(device: str, nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    if device == "cuda":
        nbytes = nbytes or 2**30
        src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(1.0)
        dst = torch.empty_like(src)
        t = time_cuda(lambda: dst.copy_(src), target_ms=200.0, min_reps=10)
        del src, dst
        torch.cuda.empty_cache()
    else:
        nbytes = nbytes or 2**28
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        t = time_cpu(lambda: dst.copy_(src), target_ms=300.0, min_reps=5)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def fp32_peak_tflops(device: str) -> float | None:
    """fp32 (non-tensor-core) peak of the CUDA device from the table, or None (CPU, unknown card)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in FP32_PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    out["cuda"] = torch.version.cuda
    return out


def git_commit(repo_dir: str | None = None) -> str | None:
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return f"{commit}{'+dirty' if dirty and commit else ''}" if commit else None
    except Exception:
        return None
