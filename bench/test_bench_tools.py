"""The benchmark's own parts: the official-style baselines compute the same thing as the reference,
the cost model, the target checks and the table."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench import official_style
from bench.cases import Case, case_list, cost, dx_inputs, gm_inputs
from bench.runner import MachineInfo, add_speedups, check_targets, default_plan, format_table, report, run_case
from piflow_kernels import reference


@pytest.mark.parametrize("shift", [1.0, 3.2], ids=["shift1", "shift3.2"])
def test_official_style_gm_rollout_matches_reference(shift):
    case = Case("t", "gm_rollout", 3, 3, 5, (7, 9), 16)
    p = gm_inputs(case, "cpu", seed=3)
    sigma_src = torch.tensor([0.9, 0.7, 1.0])
    s_end = torch.tensor([0.1, 0.6, 0.0])  # different substep counts per sample
    pol = official_style.OfficialStyleGMPolicy(p["means"], p["logweights"], p["logstds"], p["x_src"], sigma_src)
    out = official_style.official_style_rollout(pol, p["x_src"], sigma_src, s_end, 64, shift)
    d = {k: v.double() for k, v in p.items()}
    vel = lambda x, s: reference.gm_velocity(x, s, d["means"], d["logweights"], d["logstds"], d["x_src"], sigma_src.double())  # noqa: E731
    ref = reference.rollout(vel, d["x_src"], sigma_src.double(), s_end.double(), 64, shift, "round")  # its default
    assert float((out.double() - ref).abs().max() / ref.abs().max()) <= 1e-4


@pytest.mark.parametrize("mode", ["grid", "polynomial"])
def test_official_style_dx_velocity_matches_reference(mode):
    case = Case("t", "dx_rollout", 3, 4, 5, (7, 9), 16)
    p = dx_inputs(case, "cpu", seed=4)
    sigma_src, sigma = torch.tensor([0.9, 0.7, 1.0]), torch.tensor([0.5, 0.3, 0.95])
    x = p["x_src"] + 0.1 * torch.randn(p["x_src"].shape)
    pol = official_style.OfficialStyleDXPolicy(p["grid"], p["x_src"], sigma_src, 0.5, 3.0, mode)
    ref = reference.dx_velocity(x.double(), sigma.double(), p["grid"].double(), p["x_src"].double(), sigma_src.double(),
                                0.5, 3.0, mode)  # fmt: skip
    assert float((pol.velocity(x, sigma).double() - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_cost_model_matches_design_formula():
    case = Case("t", "gm_rollout", 2, 32, 4, (32, 32), 128)
    nbytes, flops = cost(case)
    assert nbytes == 2 * 1024 * (32 * 4 + 32 + 3 * 4) * 4
    assert flops == 2 * 1024 * 128 * 32 * (4 * 4 + 10)


def test_case_lists_hold_the_issue_shapes():
    cuda = {(c.kind, c.shape): c for c in case_list("cuda", quick=False)}
    train = cuda[("gm_rollout", "B512-K32-C4-32x32")]
    assert train.substeps == 128 and "target-train" in train.tags
    assert cuda[("gm_rollout", "B1-K8-C16-128x128")].substeps == 32
    assert "target-velocity" in cuda[("gm_velocity_fwd_bwd", "B512-K32-C4-32x32")].tags
    assert any(len(c.spatial) == 3 for c in cuda.values())
    cpu = {c.name: c for c in case_list("cpu", quick=False)}
    assert cpu["cpu-target"].shape == "B16-K32-C4-32x32" and cpu["cpu-target"].substeps == 128
    assert cpu["imagenet-train"].batch == 64


def _row(case, backend, ms, mem=None, **kw):
    return dict(case=case, kind="gm_rollout", shape="s", backend=backend, substeps=128, median_ms=ms, p20_ms=ms, p80_ms=ms,
                peak_mem_mb=mem, tags=kw.pop("tags", []), **kw)  # fmt: skip


def test_speedups_and_targets():
    rows = [
        _row("train", "eager", 200.0, tags=["target-train"]),
        _row("train", "triton", 1.0, tags=["target-train"], roofline_ratio=1.2),
        _row("flux", "eager", 10.0, tags=["target-flux"]),
        _row("flux", "triton", 1.0, tags=["target-flux"]),
        _row("vel", "eager", 50.0, mem=1000.0, tags=["target-velocity"]),
        _row("vel", "triton", 10.0, mem=100.0, tags=["target-velocity"]),
    ]
    add_speedups(rows)
    assert rows[1]["speedup"] == pytest.approx(200.0)
    assert rows[5]["mem_ratio"] == pytest.approx(0.1)
    met = {t["name"].split(":")[1].strip(): t["met"] for t in check_targets(rows)}
    assert met == {
        "speed-up vs eager >= 100x": True,
        "time / roofline <= 1.5": True,
        "speed-up vs eager >= 20x": False,
        "speed-up vs reference autograd >= 10x": False,
        "peak memory / reference's <= 0.25": True,
    }


def test_run_case_row_table_and_json(tmp_path):
    machine = MachineInfo("cpu", "test cpu", copy_gbps=10.0, fp32_tflops=1.0, versions={"torch": torch.__version__})
    case = Case("tiny", "dx_rollout", 2, 3, 4, (8, 8), 8)
    rows = [run_case(case, backend, machine, target_ms=1.0) for backend in ("eager", "torch")]
    add_speedups(rows)
    for r in rows:
        assert r["error"] is None and r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["roofline_ms"] > 0 and r["gbps"] > 0
    table = format_table(rows)
    assert "dx_rollout" in table and "torch" in table
    doc = report(rows, machine)
    path = tmp_path / "out.json"
    path.write_text(json.dumps(doc, default=str))
    assert json.loads(path.read_text())["rows"][1]["backend"] == "torch"


def test_failing_backend_is_recorded_not_raised():
    machine = MachineInfo("cpu", "test cpu", None, None)
    row = run_case(Case("bad", "no_such_kind", 1, 1, 1, (2, 2)), "eager", machine)
    assert row["error"] and "no_such_kind" in row["error"]


def test_default_plan_skips_compile_off_gm_rollouts():
    plan = default_plan(case_list("cuda", quick=False), "cuda")
    assert all(kind_backend[1] != "compile" or kind_backend[0].kind == "gm_rollout" for kind_backend in plan)
    assert any(b == "triton" for _, b in plan)


def test_gpu_check_records_torch_comparison_when_over_tolerance(monkeypatch):
    """A figure over the fixed tolerance passes only within 2x the torch path's own error on the same inputs."""
    from bench import gpu_correctness

    check = gpu_correctness.Check("dx", 2, 3, 4, (3, 5), substeps=8, shift=3.2)
    tight = {kind: {"float32": 1e-12, "bfloat16": 1e-12} for kind in gpu_correctness.TOL}
    monkeypatch.setattr(gpu_correctness, "TOL", tight)
    records: list = []
    gpu_correctness.check_and_record(check, "cpu", lambda *a: None, records)
    assert {r["quantity"] for r in records} == {"velocity", "grad grid", "grad x", "grad x_src", "rollout(8)"}
    for r in records:
        assert r["torch_rel_err"] is not None
        assert r["passed"] == (r["rel_err"] <= 2 * r["torch_rel_err"])


def test_gpu_check_dry_run_writes_json_and_log(tmp_path):
    """The dry run in a fresh process (as on the GPU machine), so that 'diffusers imported' means the check's own imports."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--out", str(tmp_path),
                           "--skip", "pytest,benchmark", "--budget-s", "120"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    rc = proc.returncode
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and doc["parts"]["correctness"]["status"] == "ok", proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(doc["correctness"]) >= 20 and all(r["passed"] for r in doc["correctness"])
    assert not doc["diffusers_imported"]
    assert "GPU CHECK SUMMARY" in (tmp_path / "gpu_check.log").read_text()
    # the launch sweep timed two points of each GM kernel and left the defaults as they were
    assert doc["parts"]["sweep"]["status"] == "ok"
    assert sorted({r["kernel"] for r in doc["sweep"]}) == ["bwd", "fwd", "rollout"]
    assert all("error" not in r and r["median_ms"] > 0 and r["gbps"] > 0 for r in doc["sweep"]) and len(doc["sweep"]) == 6


def test_sweep_restores_the_launch_defaults(tmp_path):
    from bench import gpu_sweep
    from piflow_kernels.ops.gm import triton_common

    before = {name: dict(v) for name, v in triton_common.LAUNCH.items()}
    state: dict = {}
    gpu_sweep.part_sweep(state, "cpu", True, float("inf"), lambda *a: None)
    assert triton_common.LAUNCH == before and len(state["sweep"]) == 6



def test_sass_report_kernels_keep_pixels_in_one_thread():
    """Offline sm_90 compile through Triton's launch specialization: the forward and rollout kernels have
    no shuffles or barriers (each thread owns whole pixels), and the report names every column."""
    import subprocess
    import sys

    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "nvdisasm")):
        pytest.skip("this Triton wheel ships no NVIDIA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.sass", "--kernels", "fwd,rollout", "--shape", "2,32,4,256"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = lines[1].split()
    rows = {" ".join(line.split()[:2]): dict(zip(header[1:], line.split()[2:])) for line in lines[2:]}
    assert sorted(rows) == ["fwd (std/k)", "fwd (std/sample)", "rollout (std/k)", "rollout (std/sample)"]
    for name, row in rows.items():
        assert int(row["regs"]) > 0 and int(row["loop"]) > 100, name
        assert row["SHFL"] == "0" and row["BAR"] == "0", (name, row)
