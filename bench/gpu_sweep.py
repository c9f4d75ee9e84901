"""GPU check, part 5: each GM kernel alone at the training shape for several chunk register budgets and warp
counts, with GB/s and % of the copy bandwidth: the evidence for the launch defaults
(``piflow_kernels.ops.gm.triton_common.LAUNCH``)."""

from __future__ import annotations

import time

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
