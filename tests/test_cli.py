"""``python -m piflow_kernels``: distill runs the example configs, resumes, reports bad configs; demo dispatch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import pytest

from piflow_kernels.cli import main

pytestmark = pytest.mark.usefixtures("eager_cpu")


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


# ---------------------------------------------------------------------------------------------- user errors


def _tiny_config(tmp_path, **changes) -> str:
    """The test_trainer toy run as a JSON config file (out_dir under tmp_path)."""
    from test_trainer import small_config

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(small_config(tmp_path / "run", max_iters=2, **changes)))
    return str(path)


def _trained(tmp_path) -> tuple[str, object]:
    """A tiny config and its checkpoints folder after 2 iterations (checkpoints at 1 and 2)."""
    config = _tiny_config(tmp_path, ckpt_every=1)
    assert main(["distill", config]) == 0
    return config, tmp_path / "run" / "checkpoints"


def _case_not_utf8(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'\xff\xfename = "x"\n')
    return ["distill", str(bad)], f"error: {bad}: training config: not UTF-8 text (UnicodeDecodeError: "


def _case_json_garbage(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("this is not json {")
    return ["distill", str(bad)], f"error: {bad}: training config: invalid JSON (JSONDecodeError: "


def _case_config_directory(tmp_path):
    folder = tmp_path / "configs.toml"
    folder.mkdir()
    return ["distill", str(folder)], f"error: {folder} is a directory, not a file (training config)"


def _case_config_missing(tmp_path):
    return ["distill", str(tmp_path / "nope.toml")], f"error: {tmp_path / 'nope.toml'} does not exist (training config)"


def _case_resume_from_missing(tmp_path):
    missing = tmp_path / "missing"
    argv = ["distill", _tiny_config(tmp_path), "--resume-from", str(missing)]
    return argv, f"error: {missing} does not exist (training checkpoint)"


def _case_resume_from_file(tmp_path):
    config = _tiny_config(tmp_path)
    return ["distill", config, "--resume-from", config], f"error: {config} is not a directory (a training checkpoint is a folder"


def _case_resume_from_damaged(tmp_path):
    config, root = _trained(tmp_path)
    state = root / "iter_00000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    return ["distill", config, "--resume-from", str(state.parent)], f"error: {state}: training state: 100 bytes where"


def _case_resume_all_damaged(tmp_path):
    config, root = _trained(tmp_path)
    for folder in root.glob("iter_*"):
        (folder / "student.safetensors").write_bytes(b"")
    return ["distill", config, "--resume"], f"error: {root}: no checkpoint under it verifies ("


def _case_damaged_data_cache(tmp_path):
    cache = tmp_path / "x0.safetensors"
    cache.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    config = _tiny_config(tmp_path, data={"source": "tensors", "path": str(cache)})
    return ["distill", config], f"error: {cache}: data.path tensors: not a complete safetensors file (SafetensorError: "


USER_ERRORS = {
    "toml-not-utf8": _case_not_utf8,
    "json-garbage": _case_json_garbage,
    "config-is-a-directory": _case_config_directory,
    "config-missing": _case_config_missing,
    "resume-from-missing": _case_resume_from_missing,
    "resume-from-a-file": _case_resume_from_file,
    "resume-from-damaged": _case_resume_from_damaged,
    "resume-all-damaged": _case_resume_all_damaged,
    "damaged-data-cache": _case_damaged_data_cache,
}


@pytest.mark.filterwarnings("ignore:resume:UserWarning")
@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_exit_2_with_one_error_line(tmp_path, capsys, case):
    argv, expected = USER_ERRORS[case](tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected), err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["toml-not-utf8", "config-is-a-directory", "resume-from-missing"])
def test_module_entry_point_prints_no_traceback(tmp_path, case):
    argv, expected = USER_ERRORS[case](tmp_path)
    proc = subprocess.run([sys.executable, "-m", "piflow_kernels", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
