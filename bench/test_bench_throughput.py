"""pytest-benchmark suite: substep throughput per backend at small shapes (runs on CPU too).

    pytest bench/test_bench_throughput.py --benchmark-columns=median,iqr,rounds
On CPU the Triton rows are skipped (the interpreter's timings mean nothing); on a GPU they run.
Each benchmark also checks its output against the eager baseline, so a fast wrong answer fails.
"""

from __future__ import annotations

import pytest
import torch

from bench.cases import Case
from bench.runner import build_callable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    Case("small-train", "gm_rollout", 2, 8, 4, (16, 16), 32),
    Case("small-flux", "gm_rollout", 1, 8, 16, (16, 24), 16, shift=3.0),
    Case("small-video", "gm_rollout", 1, 4, 16, (2, 8, 8), 16, shift=3.0),
    Case("small-train", "dx_rollout", 2, 5, 4, (16, 16), 32),
    Case("small-train", "gm_velocity_fwd_bwd", 2, 8, 4, (16, 16)),
]


def _id(case: Case) -> str:
    return f"{case.kind}-{case.shape}-{case.substeps}sub"


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_throughput(benchmark, case, backend):
    if backend == "triton" and DEVICE != "cuda":
        pytest.skip("Triton timings need a GPU (on CPU the kernels only run in the interpreter)")
    fn, _ = build_callable(case, backend, DEVICE)

    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(case=case.name, kind=case.kind, shape=case.shape, substeps=case.substeps, device=DEVICE)
    out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    expected = _first(build_callable(case, "eager", DEVICE)[0]())
    tol = 1e-3 if case.kind == "gm_velocity_fwd_bwd" else 1e-4
    err = (_first(out).double() - expected.double()).abs().max() / expected.double().abs().max()
    assert float(err) <= tol
