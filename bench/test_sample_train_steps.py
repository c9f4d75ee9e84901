"""The whole-sample and training-iteration benchmarks (bench.sample_step, bench.train_step) on tiny CPU shapes.

They run the scripts' entry points in this process with ``--tiny --device cpu`` and check the JSON
they write: every step / phase is there with a positive time and the parts add up to no more than the
whole. The numbers themselves mean nothing at these shapes.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from bench import sample_step, train_step

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")
# float rounding of the sums of marks; CUDA events resolve about 0.5 us
SLACK_MS = 1e-3


def _load(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _check_machine(doc: dict) -> None:
    assert doc["device"] == "cpu"
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["versions"]["diffusers"]
    assert "git_commit" in doc and "device_name" in doc


@needs_diffusers
def test_sample_step_tiny_cpu(tmp_path, isolated_torch_state, capsys):
    rc = sample_step.main(["--tiny", "--device", "cpu", "--repeats", "2", "--target-ms", "5", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "network ms" in printed and "targets: (dry run" in printed
    doc = _load(tmp_path / "sample_step.json")
    _check_machine(doc)
    assert doc["config"]["num_steps"] == 4 and doc["config"]["tiny"]
    assert doc["skipped_variants"] == {}
    v = doc["variants"]["eager"]
    assert len(v["steps"]) == 4
    for s in v["steps"]:
        assert s["network_ms"] > 0 and s["policy_ms"] > 0 and s["host_gap_ms"] >= 0
    for key in ("network_ms", "policy_ms", "host_gap_ms"):
        assert v[key] == pytest.approx(sum(s[key] for s in v["steps"]) + (v["tail_ms"] if key == "host_gap_ms" else 0.0))
    parts = v["network_ms"] + v["policy_ms"]
    assert 0 < parts <= v["sample_ms"] + SLACK_MS
    assert parts + v["host_gap_ms"] == pytest.approx(v["sample_ms"], abs=SLACK_MS)
    assert 0 < v["policy_share"] < 1
    assert v["bare_network_ms"] > 0 and len(v["sample_ms_all"]) == 2
    assert doc["teacher_bare_network_ms"] > 0
    iso = doc["policy_step_isolated"]
    assert [r["step"] for r in iso] == [0, 1, 2, 3]
    assert all(r["library_ms"] > 0 and r["official_style_ms"] > 0 and r["substeps"] >= 1 for r in iso)
    assert sum(r["substeps"] for r in iso) == pytest.approx(128, abs=2)  # 128 substeps per unit raw time
    checks = doc["checks"]
    assert checks["final_latents_finite"]
    assert checks["library_step_vs_scheduler_step_max_abs_diff"] == 0.0
    assert checks["official_style_vs_library_max_rel_diff"] < 1e-2
    assert {t["name"].split(" [")[0] for t in doc["targets"]} == {
        "policy share of a 4-NFE sample < 1%",
        "whole sample within 5% of 4 bare network calls",
    }
    assert all(t["met"] is None for t in doc["targets"])  # judged on CUDA only


@needs_diffusers
def test_sample_step_graph_variants_skip_without_cuda(tmp_path, isolated_torch_state):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    rc = sample_step.main(["--tiny", "--device", "cpu", "--variants", "eager+graph", "--repeats", "1", "--target-ms", "1",
                           "--no-teacher-baseline", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    doc = _load(tmp_path / "sample_step.json")
    assert doc["variants"] == {} and "eager+graph" in doc["skipped_variants"]
    assert "library_graphed_ms" not in doc["policy_step_isolated"][0]


@needs_diffusers
def test_train_step_tiny_cpu(tmp_path, isolated_torch_state, capsys):
    rc = train_step.main(["--tiny", "--device", "cpu", "--warmup", "1", "--iters", "2", "--out", str(tmp_path)])
    assert rc == 0
    assert "rollout share %" in capsys.readouterr().out
    doc = _load(tmp_path / "train_step.json")
    _check_machine(doc)
    assert doc["config"]["piid"]["num_intermediate_states"] == 2
    assert set(doc["variants"]) == {"library", "official_style"}
    for v in doc["variants"].values():
        for key in train_step.PHASES:
            if key != "other_ms":
                assert v[key] > 0, key
        parts = sum(v[k] for k in train_step.PHASES if k != "other_ms")
        assert parts <= v["iteration_ms"] + SLACK_MS
        assert v["other_ms"] >= -SLACK_MS
        assert parts + v["other_ms"] == pytest.approx(v["iteration_ms"])
        assert v["policy_velocity_backward_ms"] <= v["backward_ms"]
        # data-dependent, one segment: one student call, M = 2 teacher calls, rollouts and velocities, one backward
        assert v["calls"] == {"teacher": 2, "student": 1, "rollout": 2, "velocity": 2, "backward": 1}
        assert 0 < v["rollout_share"] <= v["policy_share"] < 1
        assert len(v["iteration_ms_all"]) == 2
    assert [t["met"] for t in doc["targets"]] == [None, None]


@needs_diffusers
def test_train_step_restores_the_library(tmp_path, isolated_torch_state):
    from piflow_kernels.policies import GMFlowPolicy

    before = (GMFlowPolicy.rollout, GMFlowPolicy.velocity, torch.autograd.backward)
    assert train_step.main(["--tiny", "--device", "cpu", "--variants", "official_style", "--warmup", "0", "--iters", "1",
                            "--out", str(tmp_path)]) == 0  # fmt: skip
    assert (GMFlowPolicy.rollout, GMFlowPolicy.velocity, torch.autograd.backward) == before


@pytest.mark.parametrize("module", [sample_step, train_step])
def test_missing_diffusers_is_a_clear_error(module, monkeypatch, capsys, tmp_path, isolated_torch_state):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert module.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "install the diffusers wheel" in err
    assert not (tmp_path / "sample_step.json").exists() and not (tmp_path / "train_step.json").exists()
