"""``python -m piflow_kernels``: distill runs the example configs, resumes, reports bad configs; demo dispatch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import pytest
import torch

from piflow_kernels.cli import main


@pytest.fixture(autouse=True)
def fast_cpu(monkeypatch):
    monkeypatch.setenv("PIFLOW_COMPILE", "0")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_distill_exact_example_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "examples/distill_exact_teacher.toml", "--out", str(out), "--no-progress"]
    assert main([*args, "--max-iters", "2"]) == 0
    assert (out / "checkpoints" / "latest").read_text() == "iter_00000002"
    assert main(["distill", "--resume", *args[1:], "--max-iters", "3"]) == 0
    assert (out / "checkpoints" / "latest").read_text() == "iter_00000003"
    assert main([*args, "--max-iters", "4", "--resume-from", str(out / "checkpoints" / "iter_00000002")]) == 0
    records = _records(out)
    losses = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in losses] == [2, 3, 4]
    assert [r["iteration"] for r in records if r.get("event") == "resume"] == [2, 2]  # --resume-from iter 2
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and r["it_per_s"] > 0 and "teacher_ratio" in r for r in losses)
    assert any(r.get("event") == "resume" and r["iteration"] == 2 for r in records)
    assert "resumed from" in capsys.readouterr().out


def test_distill_tiny_dit_example_runs(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "dit"
    code = main(["distill", "examples/distill_tiny_dit.toml", "--out", str(out), "--max-iters", "2", "--no-progress", "--eval"])
    assert code == 0
    records = _records(out)
    assert any("loss_step1" in r for r in records)  # data-free: both segments trained
    evals = [r for r in records if "eval/finite" in r]
    assert evals and evals[-1]["eval/finite"] == 1.0
    assert (out / "checkpoints" / "iter_00000002" / "ema.safetensors").is_file()
    if importlib.util.find_spec("tensorboard") is not None:  # the example leaves tensorboard = true
        assert any((out / "tensorboard").iterdir())


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = 1\n[optim]\nlearning_rate = 0.1\n")
    assert main(["distill", str(bad)]) == 2
    assert "optim.learning_rate" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point_reports_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {"mode": "sideways"}}))
    proc = subprocess.run([sys.executable, "-m", "piflow_kernels", "distill", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "data.mode" in proc.stderr


def test_demo_passes_its_arguments_on(monkeypatch):
    seen = []
    fake = types.ModuleType("piflow_kernels.demo")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "piflow_kernels.demo", fake)
    assert main(["demo", "--help", "--steps", "3"]) == 0
    assert seen == [["--help", "--steps", "3"]]


def test_missing_demo_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "piflow_kernels.demo", None)  # import fails as if the module were absent
    assert main(["demo"]) == 2
    assert "piflow_kernels.demo" in capsys.readouterr().err


def test_unknown_command_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
