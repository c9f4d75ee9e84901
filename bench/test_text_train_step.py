"""bench.text_train_step on its --quick toy config (CPU): the JSON holds every figure, finite and positive.

The numbers mean nothing at these shapes and no timing is judged; the checks are that every phase, the policy
parts, the peak memory and the prompt cache's throughput are there, that the phases add up to the instrumented
iteration, that the calls per iteration are those of the config, and that the library is left as it was.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from bench import text_train_step as tts

needs_text_stack = pytest.mark.skipif(
    any(importlib.util.find_spec(n) is None for n in ("diffusers", "transformers", "peft")),
    reason="needs diffusers, transformers and peft",
)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_row(row: dict) -> None:
    for key in tts.ROW_FIGURES:
        assert _positive(row[key]), (row["variant"], key, row.get(key))
    parts = sum(row[k] for k in tts.PHASES if k != "rest_ms")
    assert parts + row["rest_ms"] == pytest.approx(row["iteration_probed_ms"])
    assert row["policy_ms"] == pytest.approx(sum(row[k] for k in tts.POLICY_PARTS))
    assert row["cache_draw_ms"] <= row["data_ms"] and row["optimizer_ema_ms"] <= row["rest_ms"]
    assert 0 < row["policy_share"] < 1
    # data-free, quick config: nfe 2 segments, M = 2 states each, the detached rollout to the next segment's start
    assert row["calls"] == {"data": 1, "cache_draw": 1, "teacher": 4, "student": 2, "policy": 2, "rollout": 5,
                            "mean_velocity": 4, "backward": 2}  # fmt: skip


def _check_prompt_cache(pc: dict) -> None:
    assert pc["encode"]["num_prompts"] == tts.SIZES["quick"]["num_prompts"]
    for key in ("total_s", "prompts_per_s", "batches_s", "batches_prompts_per_s"):
        assert _positive(pc["encode"][key]), key
    for case in ("first_epoch", "second_epoch", "shards_held"):
        for key in ("prompts_per_s", "mb_per_s", "draw_ms", "bytes"):
            assert _positive(pc["read"][case][key]), (case, key)
    assert pc["read"]["shards"] == 3 and _positive(pc["read"]["bytes_per_prompt"])


@needs_text_stack
def test_quick_run_writes_every_figure(tmp_path, isolated_torch_state, capsys):
    from piflow_kernels.distill import piid
    from piflow_kernels.policies import DXPolicy, GMFlowPolicy

    before = (GMFlowPolicy.rollout, DXPolicy.rollout, piid.student_policy, piid.policy_mean_velocity, torch.autograd.backward)
    out = tmp_path / "quick.json"
    assert tts.main(["--quick", "--in-process", "--device", "cpu", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    after = (GMFlowPolicy.rollout, DXPolicy.rollout, piid.student_policy, piid.policy_mean_velocity, torch.autograd.backward)
    assert after == before  # every patch undone

    doc = json.loads(out.read_text())
    assert doc["size"] == "quick" and doc["machine"]["device"] == "cpu" and doc["machine"]["cpu"]
    assert doc["config"]["flux"]["num_layers"] == 1 and doc["config"]["piid"]["nfe"] == 2
    assert set(doc["variants"]) == set(tts.VARIANTS)
    for v in doc["variants"].values():
        assert "error" not in v and v["trainable_parameters"] > 0
    lora, full = doc["variants"]["lora"], doc["variants"]["full"]
    assert lora["teacher"] == "TiedTeacher" and full["teacher"] == "DiffusersTeacher"
    assert lora["teacher_own_parameters"] == 0 and full["teacher_own_parameters"] > 0
    assert lora["trainable_parameters"] < full["trainable_parameters"]
    assert [(r["variant"], r["teacher_ratio"]) for r in doc["rows"]] == [(v, q) for v in tts.VARIANTS for q in (1.0, 0.0)]
    for row in doc["rows"]:
        _check_row(row)
        assert len(row["iteration_ms_all"]) == 2
    _check_prompt_cache(doc["prompt_cache"])
    log = out.with_suffix(".log").read_text()
    assert "pol %" in log and "PromptSource.draw (first epoch)" in log


@needs_text_stack
def test_a_variant_runs_in_a_fresh_process(tmp_path, isolated_torch_state):
    out = tmp_path / "one.json"
    assert tts.main(["--quick", "--device", "cpu", "--variants", "full+gc", "--teacher-ratios", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["variants"]) == ["full+gc"] and "error" not in doc["variants"]["full+gc"]
    (row,) = doc["rows"]
    assert row["variant"] == "full+gc" and row["teacher_ratio"] == 0.0
    _check_row(row)


def test_missing_diffusers_is_a_clear_error(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert tts.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "diffusers" in err and "not installed" in err
    assert not (tmp_path / "x.json").exists()
