"""Export in the official pi-Flow layout (``export_official``, ``python -m piflow_kernels export``).

A student loaded from a synthetic official adapter (test_official_weights.py's tiny teachers) is exported and
loaded back: the same outputs bit for bit (LoRA pairs with alpha = r, as the official adapters have), keys and
config under the official names. The key and config lists below are read off LakonLab's class definitions
(``_GMFluxTransformer2DModel`` / ``_GMQwenImageTransformer2DModel`` __init__ and their head layers,
``DXFluxTransformer2DModel``: the diffusers FLUX config with patch_size 1 and out_channels N x 64), not from
this library. Offline, CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
from safetensors import safe_open  # noqa: E402
from test_official_adapter_peft import LORA_TARGETS, adapter_tensors, assert_outputs_close, run  # noqa: E402
from test_official_weights import write_checkpoint  # noqa: E402
from test_students import tiny_teacher  # noqa: E402

from piflow_kernels import build_student, export_official, load_official_adapter  # noqa: E402

# the official head of a GM class with gm_num_logstd_layers = 2 (SiLU, Linear, SiLU, Linear) and norm_out
GM_HEAD_KEYS = {
    "proj_out_means.weight", "proj_out_means.bias", "proj_out_logweights.weight", "proj_out_logweights.bias",
    "proj_out_logstds.1.weight", "proj_out_logstds.1.bias", "proj_out_logstds.3.weight", "proj_out_logstds.3.bias",
    "norm_out.linear.weight", "norm_out.linear.bias",
}  # fmt: skip
DX_HEAD_KEYS = {"proj_out.weight", "proj_out.bias", "norm_out.linear.weight", "norm_out.linear.bias"}
GM_CONFIG_KEYS = {
    "flux": ["num_gaussians", "constant_logstd", "logstd_inner_dim", "gm_num_logstd_layers", "logweights_channels",
             "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
             "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope"],
    "qwen": ["num_gaussians", "constant_logstd", "logstd_inner_dim", "gm_num_logstd_layers", "logweights_channels",
             "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
             "joint_attention_dim", "axes_dims_rope", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"],
}  # fmt: skip
CLASSES = {
    "gm-flux": "GMFluxTransformer2DModel",
    "dx-flux": "DXFluxTransformer2DModel",
    "gm-qwen": "GMQwenImageTransformer2DModel",
}


def official_adapter(tmp_path, kind: str, with_alpha: bool = False):
    """(teacher, folder) of a synthetic official adapter; alpha = r unless ``with_alpha``."""
    teacher = tiny_teacher(kind.split("-")[1])
    tensors = adapter_tensors(teacher, kind)
    if not with_alpha:
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    policy = {"type": "GMFlow"} if kind.startswith("gm") else {"type": "DX", "segment_size": 1 / 3.5, "shift": 3.2}
    extra = {"num_gaussians": 3} if kind == "gm-flux" else {}
    return teacher, write_checkpoint(tmp_path / f"{kind}-src", tensors, CLASSES[kind], policy, **extra)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def keys_and_meta(folder: Path) -> tuple[set[str], dict]:
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return set(f.keys()), f.metadata()


@pytest.mark.parametrize("kind", list(CLASSES))
def test_adapter_export_round_trips_bit_for_bit_under_the_official_names(tmp_path, kind):
    teacher, folder = official_adapter(tmp_path, kind)
    student = load_official_adapter(folder, teacher)  # an unfused PEFT adapter on the teacher
    policy = {"segment_size": 1 / 3.5, "shift": 3.2} if kind.startswith("dx") else None
    out = export_official(student, tmp_path / "exported", policy_config=policy)

    keys, meta = keys_and_meta(out)
    head = GM_HEAD_KEYS if kind.startswith("gm") else DX_HEAD_KEYS
    loras = {f"{path}.lora_{ab}.weight" for path in LORA_TARGETS[kind.split("-")[1]] for ab in "AB"}
    assert keys == head | loras
    assert json.loads(meta["policy_config"]) == {"type": "GMFlow" if kind.startswith("gm") else "DX", **(policy or {})}
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == CLASSES[kind]
    if kind.startswith("gm"):
        assert set(config) - {"_class_name"} == set(GM_CONFIG_KEYS[kind.split("-")[1]])
        assert config["num_gaussians"] == 3 and config["logweights_channels"] == 4 and config["out_channels"] == 4 * 3
    else:
        assert config["patch_size"] == 1 and config["out_channels"] == 4 * 4 * 3  # N = 4 grid points x 2 x 2 x C = 3

    again = load_official_adapter(out, tiny_teacher(kind.split("-")[1]))
    assert_outputs_close(run(again, kind), run(student, kind), exact=True)


def test_an_adapter_with_alpha_exports_with_the_official_alpha_equals_r(tmp_path):
    """The official adapters carry no .alpha (alpha = r): a pair with alpha != r is written as (A, B alpha / r)."""
    kind = "gm-flux"
    teacher, folder = official_adapter(tmp_path, kind, with_alpha=True)
    student = load_official_adapter(folder, teacher)
    out = export_official(student, tmp_path / "exported")
    keys, _ = keys_and_meta(out)
    assert not any(k.endswith(".alpha") for k in keys)
    assert_outputs_close(run(load_official_adapter(out, tiny_teacher("flux")), kind), run(student, kind))


def test_a_student_without_adapter_is_written_whole_and_sharded(tmp_path):
    kind = "gm-flux"
    teacher, folder = official_adapter(tmp_path, kind)
    student = load_official_adapter(folder, teacher, fuse=True)
    out = export_official(student, tmp_path / "exported", max_shard_size=20_000)
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert GM_HEAD_KEYS <= set(index["weight_map"]) and "transformer_blocks.0.attn.to_q.weight" in index["weight_map"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # a plain folder, not the 0700 of its staging name
    again = load_official_adapter(out, tiny_teacher("flux"))  # every weight comes from the file
    assert_outputs_close(run(again, kind), run(student, kind), exact=True)


def test_cli_exports_a_saved_student(tmp_path):
    kind = "dx-flux"
    teacher, folder = official_adapter(tmp_path, kind)
    student = load_official_adapter(folder, teacher, fuse=True)
    student.save_pretrained(tmp_path / "student")
    repo = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "piflow_kernels", "export", str(tmp_path / "student"), str(tmp_path / "exported"),
           "--policy-config", '{"segment_size": 0.2857, "shift": 3.2}']  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _, meta = keys_and_meta(tmp_path / "exported")
    assert json.loads(meta["policy_config"]) == {"segment_size": 0.2857, "shift": 3.2, "type": "DX"}
    again = load_official_adapter(tmp_path / "exported", tiny_teacher("flux"))
    assert_outputs_close(run(again, kind), run(student, kind), exact=True)

    done = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=300)  # the folder exists now
    last = done.stderr.strip().splitlines()[-1]  # (optional packages may print their own lines first)
    assert done.returncode == 2 and last.startswith("error: ") and "exists and is not empty" in last
    bad = cmd[:-1] + ["{shift: 3"]
    done = subprocess.run(bad[:5] + [str(tmp_path / "other")] + bad[6:], capture_output=True, text=True, cwd=repo, timeout=300)
    assert done.returncode == 2 and "--policy-config is not JSON" in done.stderr


def test_bad_requests_are_refused_before_anything_is_written(tmp_path):
    teacher, folder = official_adapter(tmp_path, "gm-flux")
    student = load_official_adapter(folder, teacher)
    with pytest.raises(ValueError, match="adapter_name 'other' is not an adapter of the student's trunk"):
        export_official(student, tmp_path / "a", adapter_name="other")
    with pytest.raises(ValueError, match="policy_config type 'DX' differs from the student's 'GMFlow'"):
        export_official(student, tmp_path / "b", policy_config={"type": "DX"})
    for bad in ("lots", 0, -5, True):
        with pytest.raises(ValueError, match="max_shard_size must be a positive number of bytes"):
            export_official(student, tmp_path / "c", max_shard_size=bad)
    dit = build_student(tiny_teacher("dit"), "GMFlow", num_components=2)
    with pytest.raises(ValueError, match="no official layout for a GMFlow student of a DiTTransformer2DModel teacher"):
        export_official(dit, tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
