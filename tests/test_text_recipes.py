"""The text-to-image recipes of examples/text, at CPU scale: the README's workflow, command by command.

Each tiny recipe is the official one on a tiny random pipeline: make the pipeline, encode its prompts, check the
memory with --dry-run, distill (a few iterations), then sample the student folder through the stock pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import piflow_kernels as pk  # noqa: E402
from piflow_kernels.cli import main  # noqa: E402
from piflow_kernels.distill.config import TrainConfig  # noqa: E402
from piflow_kernels.students import PiFlowStudent  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
RECIPES = {"flux": ("piflux_gm_lora", "prompts.txt"), "sd3": ("sd3_gm_lora", "prompts.txt"),
           "qwen": ("piqwen_gm_lora", "prompts.jsonl")}  # fmt: skip


@pytest.mark.parametrize("kind", list(RECIPES))
def test_the_official_recipes_load_and_match_their_tiny_variants(kind):
    recipe, _ = RECIPES[kind]
    full = TrainConfig.from_file(REPO / "examples" / "text" / f"{recipe}.toml")
    tiny = TrainConfig.from_file(REPO / "examples" / "text" / f"{recipe}_tiny.toml")
    # the same recipe: what is learned and how (the scale differs: sizes, iterations, rank, substeps)
    for key in ("policy_type", "window_substeps", "gm_dropout", "final_step_size_scale", "loss_scale", "nfe"):
        assert getattr(full.piid, key) == getattr(tiny.piid, key), key
    assert full.teacher.guidance_scale == tiny.teacher.guidance_scale
    assert full.teacher.embedded_guidance == tiny.teacher.embedded_guidance
    assert full.student.tie_teacher and tiny.student.tie_teacher and full.student.lora_rank > 0 < tiny.student.lora_rank
    assert full.data.mode == tiny.data.mode == "data_free"


@pytest.mark.parametrize("kind", list(RECIPES))
def test_a_tiny_recipe_runs_end_to_end_through_the_command_line(kind, tmp_path, monkeypatch, capsys):
    recipe, prompts = RECIPES[kind]
    monkeypatch.chdir(tmp_path)
    examples = REPO / "examples" / "text"
    assert main(["make-tiny-pipeline", kind, f"runs/tiny/{kind}", "--prompts", f"runs/tiny/{prompts}"]) == 0
    assert main(["encode-prompts", str(examples / f"encode_{kind}_tiny.toml"), "--no-progress"]) == 0
    assert main(["distill", str(examples / f"{recipe}_tiny.toml"), "--dry-run"]) == 0
    assert "per-rank memory" in capsys.readouterr().out
    assert main(["distill", str(examples / f"{recipe}_tiny.toml"), "--max-iters", "2", "--no-progress"]) == 0
    folder = tmp_path / "runs" / "tiny" / recipe / "students" / "iter_00000002"
    student = PiFlowStudent.from_pretrained(folder)
    assert student.num_inference_steps == 4 and student.sampling["final_step_size_scale"] == 0.5
    import diffusers

    pipe_cls = {"flux": diffusers.FluxPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
                "qwen": diffusers.QwenImagePipeline}[kind]  # fmt: skip
    pipe = pk.to_piflow(pipe_cls.from_pretrained(tmp_path / "runs" / "tiny" / kind, dtype=torch.float32), student)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"max_sequence_length": 8} if kind != "qwen" else {}
    if kind != "flux":
        kwargs["guidance_scale"] = 1.0 if kind == "sd3" else None  # the student needs no CFG
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    out = pipe("a red cat", height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.isfinite(out.images).all() and out.images.abs().sum() > 0
