"""Loading released checkpoints in the official layout (pi-FLUX.1, pi-Qwen-Image, DX-FLUX, GM-DiT).

Each test writes a synthetic checkpoint of that layout (config.json, safetensors with the
policy_config metadata, head keys, LoRA pairs) for a tiny teacher, loads it, and checks that the
weights land where the official model would use them: the student's policy must equal the official
head's output computed by hand from the features entering the head (no network access).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.models.embeddings import Timesteps, get_timestep_embedding  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_students import teacher_inputs, tiny_teacher  # noqa: E402

from piflow_kernels import PiFlowStudent, load_official_adapter  # noqa: E402
from piflow_kernels.official_weights import read_policy_config  # noqa: E402

RANK = 2


def write_checkpoint(folder, tensors: dict, class_name: str | None, policy_config: dict | None = None, **config):
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"policy_config": json.dumps(policy_config)} if policy_config is not None else None
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "diffusion_pytorch_model.safetensors"), metadata=meta)
    if class_name is not None:
        (folder / "config.json").write_text(json.dumps({"_class_name": class_name, **config}))
    return folder


def rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.2


def lora_pair(module: torch.nn.Linear, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rand(RANK, module.in_features, seed=seed), rand(module.out_features, RANK, seed=seed + 1)


def gm_head_tensors(teacher, k: int, rows_means: int, rows_logweights: int, inner: int = 24) -> dict:
    d = teacher.config.num_attention_heads * teacher.config.attention_head_dim
    return {
        "proj_out_means.weight": rand(rows_means, d, seed=1),
        "proj_out_means.bias": rand(rows_means, seed=2),
        "proj_out_logweights.weight": rand(rows_logweights, d, seed=3),
        "proj_out_logweights.bias": rand(rows_logweights, seed=4),
        "proj_out_logstds.1.weight": rand(inner, d, seed=5),
        "proj_out_logstds.1.bias": rand(inner, seed=6),
        "proj_out_logstds.3.weight": rand(1, inner, seed=7),
        "proj_out_logstds.3.bias": torch.full((1,), math.log(0.05)),
    }


def capture(module: torch.nn.Module, pre: bool = False) -> dict:
    """Record a module's input (pre) or output on each call."""
    seen: dict = {}
    if pre:
        module.register_forward_pre_hook(lambda m, args: seen.__setitem__("value", args[0]))
    else:
        module.register_forward_hook(lambda m, args, out: seen.__setitem__("value", out))
    return seen


def dit_forward(student) -> tuple:
    """The student on the DiT teacher's inputs: (output, the features entering proj_out_2, block 0's timestep
    embedding, the inputs (x, t, kwargs))."""
    features = capture(student.trunk.proj_out_2, pre=True)
    temb = capture(student.trunk.transformer_blocks[0].norm1.emb)
    x, t, kwargs = teacher_inputs("dit")
    with torch.no_grad():
        out = student(x, t, **kwargs)
    return out, features["value"], temb["value"], (x, t, kwargs)


def official_logstds(tensors: dict, temb: torch.Tensor) -> torch.Tensor:
    h = torch.nn.functional.silu(temb) @ tensors["proj_out_logstds.1.weight"].T + tensors["proj_out_logstds.1.bias"]
    return torch.nn.functional.silu(h) @ tensors["proj_out_logstds.3.weight"].T + tensors["proj_out_logstds.3.bias"]


# ---------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("name", ["flux", "qwen"])
def test_gm_adapter_heads_lora_and_layout(tmp_path, name):
    """pi-FLUX.1 / pi-Qwen-Image: proj_out_means (K * 4C rows: k, c, 2x2 pixel), proj_out_logweights
    (K * 4: k, pixel), logstd MLP, norm_out, LoRA pairs; unpacked as the official pipelines' _unpack_gm."""
    teacher = tiny_teacher(name)
    k, c = 3, 3
    tensors = gm_head_tensors(teacher, k, k * 4 * c, k * 4)
    tensors["norm_out.linear.weight"] = rand(*teacher.norm_out.linear.weight.shape, seed=8)
    if name == "flux":
        lora_targets = [
            "transformer_blocks.0.ff.net.0.proj",
            "single_transformer_blocks.0.proj_out",
            "time_text_embed.timestep_embedder.linear_1",
        ]
        class_name = "GMFluxTransformer2DModel"
    else:
        lora_targets = [
            "transformer_blocks.0.img_mlp.net.0.proj",
            "transformer_blocks.0.txt_mlp.net.2",
            "time_text_embed.timestep_embedder.linear_2",
        ]
        class_name = "GMQwenImageTransformer2DModel"
    for i, path in enumerate(lora_targets):
        a, b = lora_pair(teacher.get_submodule(path), seed=20 + 2 * i)
        prefix = "transformer." if i == 0 else ""  # the official loader strips a "transformer." prefix
        tensors[f"{prefix}{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = a, b
    folder = write_checkpoint(tmp_path / "gm_k3", tensors, class_name, {"type": "GMFlow"}, num_gaussians=k, logweights_channels=4)

    student, policy_config = load_official_adapter(folder, teacher, return_policy_config=True, fuse=True)
    assert policy_config == {"type": "GMFlow"} and student.num_components == k and not student.training
    head = student.trunk.proj_out
    assert torch.equal(head.means.weight, tensors["proj_out_means.weight"])
    assert torch.equal(head.logweights.bias, tensors["proj_out_logweights.bias"])
    assert torch.equal(student.trunk.norm_out.linear.weight, tensors["norm_out.linear.weight"])
    for i, path in enumerate(lora_targets):  # fused: W + B @ A (alpha = rank)
        prefix = "transformer." if i == 0 else ""
        delta = tensors[f"{path}.lora_B.weight"] @ tensors[f"{prefix}{path}.lora_A.weight"]
        fused = student.trunk.get_submodule(path).weight
        torch.testing.assert_close(fused, teacher.get_submodule(path).weight + delta, atol=1e-6, rtol=0)

    features = capture(head, pre=True)
    temb = capture(student.trunk.time_text_embed)
    x, t, kwargs = teacher_inputs(name)
    with torch.no_grad():
        out = student(x, t, **kwargs)
    b, _, height, width = x.shape
    hh, ww, f = height // 2, width // 2, features["value"]
    means = (f @ tensors["proj_out_means.weight"].T + tensors["proj_out_means.bias"]).reshape(b, hh, ww, k, c, 2, 2)
    means = means.permute(0, 3, 4, 1, 5, 2, 6).reshape(b, k, c, height, width)
    logits = (f @ tensors["proj_out_logweights.weight"].T + tensors["proj_out_logweights.bias"]).reshape(b, hh * ww, k, 4)
    logweights = logits.log_softmax(dim=-2).reshape(b, hh, ww, k, 1, 2, 2).permute(0, 3, 4, 1, 5, 2, 6)
    torch.testing.assert_close(out.means, means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logweights, logweights.reshape(b, k, 1, height, width), atol=1e-5, rtol=1e-5)
    ref_logstds = official_logstds(tensors, temb["value"]).reshape(b, 1, 1, 1, 1)
    torch.testing.assert_close(out.logstds, ref_logstds, atol=1e-5, rtol=1e-5)

    student.save_pretrained(tmp_path / "ours")  # and it round-trips in our own format
    again = PiFlowStudent.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(x, t, **kwargs).means, out.means)


def test_dx_flux_adapter(tmp_path):
    """DX-FLUX: the root proj_out widened to N * 4C rows (n, c, pixel), as the official DXFlux."""
    teacher = tiny_teacher("flux")
    n, c, d = 4, 3, 16
    tensors = {"proj_out.weight": rand(n * 4 * c, d, seed=1), "proj_out.bias": rand(n * 4 * c, seed=2)}
    a, b = lora_pair(teacher.single_transformer_blocks[0].proj_out, seed=3)
    tensors["single_transformer_blocks.0.proj_out.lora_A.default.weight"] = a  # un-exported PEFT naming
    tensors["single_transformer_blocks.0.proj_out.lora_B.default.weight"] = b
    policy = {"type": "DX", "segment_size": 1 / 3.5, "shift": 3.2}
    folder = write_checkpoint(tmp_path / "dx", tensors, "FluxTransformer2DModel", policy, out_channels=n * 4 * c)
    assert read_policy_config(folder) == policy
    student = load_official_adapter(folder, teacher, lora_scale=0.5, fuse=True)
    assert student.policy_type == "DX" and student.num_components == n
    fused = student.trunk.single_transformer_blocks[0].proj_out.weight
    torch.testing.assert_close(fused, teacher.single_transformer_blocks[0].proj_out.weight + 0.5 * b @ a, atol=1e-6, rtol=0)

    features = capture(student.trunk.proj_out, pre=True)
    x, t, kwargs = teacher_inputs("flux")
    with torch.no_grad():
        grid = student(x, t, **kwargs).grid
    bsz, _, height, width = x.shape
    raw = features["value"] @ tensors["proj_out.weight"].T + tensors["proj_out.bias"]  # (B, L, N*4C)
    ref = raw.reshape(bsz, height // 2, width // 2, n * c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(bsz, n, c, height, width)
    torch.testing.assert_close(grid, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- full model


def official_gmdit(teacher, k: int) -> dict:
    """A GMDiTTransformer2DModelV2 state dict: DiT weights with one shared ``emb`` and the GM heads."""
    tensors = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("proj_out_2."):
            continue
        if ".norm1.emb." in key:
            if key.startswith("transformer_blocks.0."):
                tensors["emb." + key.split(".norm1.emb.", 1)[1]] = rand(*value.shape, seed=len(tensors))
            continue
        tensors[key] = rand(*value.shape, seed=len(tensors))
    c, p2 = teacher.config.in_channels, teacher.config.patch_size**2
    tensors.update(gm_head_tensors(teacher, k, p2 * k * c, p2 * k))
    return tensors


def test_gm_dit_full_model_builds_its_own_teacher(tmp_path):
    dit = tiny_teacher("dit")
    k, c, p = 3, 3, 2
    tensors = official_gmdit(dit, k)
    config = {key: dit.config[key] for key in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers",
                                               "sample_size", "patch_size", "norm_num_groups")}  # fmt: skip
    folder = write_checkpoint(tmp_path / "gmdit", tensors, "GMDiTTransformer2DModelV2", {"type": "GMFlow"},
                              num_gaussians=k, logstd_inner_dim=24, gm_num_logstd_layers=2, **config)  # fmt: skip
    student = load_official_adapter(folder)  # no teacher: built from config.json
    assert student.teacher_class == "DiTTransformer2DModel" and student.num_components == k
    for block in student.trunk.transformer_blocks:  # the shared embedding lands in every block's copy
        assert torch.equal(block.norm1.emb.timestep_embedder.linear_1.weight, tensors["emb.timestep_embedder.linear_1.weight"])
    assert {m.downscale_freq_shift for m in student.modules() if isinstance(m, Timesteps)} == {0.0}
    assert torch.equal(student.trunk.proj_out_1.weight, tensors["proj_out_1.weight"])

    out, f, temb, (x, t, kwargs) = dit_forward(student)
    b, _, height, width = x.shape
    hh, ww = height // p, width // p
    means = (f @ tensors["proj_out_means.weight"].T + tensors["proj_out_means.bias"]).reshape(b, hh, ww, p, p, k * c)
    means = means.permute(0, 5, 1, 3, 2, 4).reshape(b, k, c, height, width)
    logits = (f @ tensors["proj_out_logweights.weight"].T + tensors["proj_out_logweights.bias"]).reshape(b, hh, ww, p, p, k)
    logweights = logits.permute(0, 5, 1, 3, 2, 4).reshape(b, k, 1, height, width).log_softmax(dim=1)
    torch.testing.assert_close(out.means, means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logweights, logweights, atol=1e-5, rtol=1e-5)
    # the official timestep embedding: sinusoid with shift 0, then the MLP, plus the class embedding
    sinus = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    h = torch.nn.functional.silu(
        sinus @ tensors["emb.timestep_embedder.linear_1.weight"].T + tensors["emb.timestep_embedder.linear_1.bias"]
    )
    cond = h @ tensors["emb.timestep_embedder.linear_2.weight"].T + tensors["emb.timestep_embedder.linear_2.bias"]
    cond = cond + tensors["emb.class_embedder.embedding_table.weight"][kwargs["class_labels"]]
    torch.testing.assert_close(temb, cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logstds, official_logstds(tensors, cond).reshape(b, 1, 1, 1, 1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- constant log-std, GM-DiT v1


def set_gm_head(student, tensors: dict) -> None:
    """Set a student's head by hand from official head tensors (proj_out_means / logweights / logstds)."""
    head = student.trunk.get_submodule("proj_out" if student.teacher_class != "DiTTransformer2DModel" else "proj_out_2")
    with torch.no_grad():
        for part in ("weight", "bias"):
            getattr(head.means, part).copy_(tensors[f"proj_out_means.{part}"])
            getattr(head.logweights, part).copy_(tensors[f"proj_out_logweights.{part}"])
        for key, value in tensors.items():
            if key.startswith("proj_out_logstds."):
                student.get_parameter(key).copy_(value)


def test_constant_logstd_adapter_loads_exports_and_round_trips(tmp_path):
    """config.json's constant_logstd (the official heads' fixed log-std, a number, no proj_out_logstds weights):
    the student's logstds are that constant; the rest equals a student set by hand; export -> load is exact."""
    from piflow_kernels import build_student
    from piflow_kernels.official_export import export_official

    teacher = tiny_teacher("flux")
    k, c, const = 3, 3, -1.25
    tensors = {key: v for key, v in gm_head_tensors(teacher, k, k * 4 * c, k * 4).items() if "logstds" not in key}
    tensors["norm_out.linear.weight"] = rand(*teacher.norm_out.linear.weight.shape, seed=8)
    folder = write_checkpoint(tmp_path / "const", tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"},
                              num_gaussians=k, constant_logstd=const, logweights_channels=4)  # fmt: skip
    student = load_official_adapter(folder, teacher, fuse=True)
    assert student.constant_logstd == const and not hasattr(student, "proj_out_logstds")

    by_hand = build_student(teacher, "GMFlow", num_components=k, init_noise=0.0, constant_logstd=const).eval()
    set_gm_head(by_hand, tensors)
    with torch.no_grad():
        by_hand.trunk.norm_out.linear.weight.copy_(tensors["norm_out.linear.weight"])
    x, t, kwargs = teacher_inputs("flux")
    with torch.no_grad():
        out, ref = student(x, t, **kwargs), by_hand(x, t, **kwargs)
    assert torch.equal(out.means, ref.means) and torch.equal(out.logweights, ref.logweights)
    assert torch.equal(out.logstds, torch.full((x.shape[0], 1, 1, 1, 1), const))

    exported = export_official(student, tmp_path / "exported")
    config = json.loads((exported / "config.json").read_text())
    assert config["_class_name"] == "GMFluxTransformer2DModel" and config["constant_logstd"] == const
    again = load_official_adapter(exported, tiny_teacher("flux"))
    assert again.constant_logstd == const
    with torch.no_grad():
        back = again(x, t, **kwargs)
    for field in ("means", "logweights", "logstds"):
        assert torch.equal(getattr(back, field), getattr(out, field)), field

    student.save_pretrained(tmp_path / "ours")  # our own format keeps the option
    ours = PiFlowStudent.from_pretrained(tmp_path / "ours").eval()
    assert ours.constant_logstd == const
    with torch.no_grad():
        assert torch.equal(ours(x, t, **kwargs).logstds, out.logstds)

    tensors.update({key: v for key, v in gm_head_tensors(teacher, k, k * 4 * c, k * 4).items() if "logstds" in key})
    both = write_checkpoint(tmp_path / "both", tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"}, constant_logstd=const)
    with pytest.raises(ValueError, match="constant_logstd=-1.25 but the weights hold a log-std MLP"):
        load_official_adapter(both, teacher)


def official_gmdit_v1(teacher, k: int, constant: bool) -> dict:
    """A GMDiTTransformer2DModel (v1) state dict: DiT weights with one shared ``emb``, proj_out_2 with p2 * (K*C + K)
    rows (per sub-pixel: means (k, c), then logweights (k)) and the log-std MLP under gm_out.logstd_layers."""
    tensors = {key: v for key, v in official_gmdit(teacher, 1).items() if not key.startswith("proj_out_")}
    tensors.update({key: v for key, v in official_gmdit(teacher, 1).items() if key.startswith("proj_out_1.")})
    c, p2 = teacher.config.in_channels, teacher.config.patch_size**2
    d = teacher.config.num_attention_heads * teacher.config.attention_head_dim
    tensors["proj_out_2.weight"] = rand(p2 * k * (c + 1), d, seed=41)
    tensors["proj_out_2.bias"] = rand(p2 * k * (c + 1), seed=42)
    if not constant:
        for key, value in gm_head_tensors(teacher, k, 1, 1).items():
            if "logstds" in key:
                tensors[key.replace("proj_out_logstds.", "gm_out.logstd_layers.")] = value
    return tensors


@pytest.mark.parametrize("constant", [False, True], ids=["logstd-mlp", "constant-logstd"])
def test_gm_dit_v1_full_model(tmp_path, constant):
    """GM-DiT v1 (gm_out.*): the v1 forward written out (proj_out_2, unpatchify, split into K*C means and K
    logweights per pixel, gm_out's log-std MLP or the constant) equals the loaded student's policy."""
    dit = tiny_teacher("dit")
    dit = type(dit).from_config({**dit.config, "num_layers": 2})  # two blocks sharing the official emb
    k, c, p, const = 3, 3, 2, -0.75
    tensors = official_gmdit_v1(dit, k, constant)
    config = {key: dit.config[key] for key in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers",
                                               "sample_size", "patch_size", "norm_num_groups")}  # fmt: skip
    head_cfg = {"constant_logstd": const} if constant else {"logstd_inner_dim": 24, "gm_num_logstd_layers": 2}
    folder = write_checkpoint(tmp_path / "gmdit1", tensors, "GMDiTTransformer2DModel", None,
                              num_gaussians=k, **head_cfg, **config)  # fmt: skip
    student = load_official_adapter(folder)
    assert student.teacher_class == "DiTTransformer2DModel" and student.num_components == k
    assert student.constant_logstd == (const if constant else None)
    assert {m.downscale_freq_shift for m in student.modules() if isinstance(m, Timesteps)} == {0.0}

    out, f, temb, (x, t, kwargs) = dit_forward(student)
    b, _, height, width = x.shape
    hh, ww = height // p, width // p
    raw = (f @ tensors["proj_out_2.weight"].T + tensors["proj_out_2.bias"]).reshape(b, hh, ww, p, p, k * (c + 1))
    raw = raw.permute(0, 5, 1, 3, 2, 4).reshape(b, k * (c + 1), height, width)  # the v1 unpatchify
    means, logits = raw.split([k * c, k], dim=1)  # GMOutput2D
    torch.testing.assert_close(out.means, means.reshape(b, k, c, height, width), atol=1e-5, rtol=1e-5)
    logweights = logits.reshape(b, k, 1, height, width).log_softmax(dim=1)
    torch.testing.assert_close(out.logweights, logweights, atol=1e-5, rtol=1e-5)
    if constant:
        assert torch.equal(out.logstds, torch.full((b, 1, 1, 1, 1), const))
    else:
        mlp = {key.replace("gm_out.logstd_layers.", "proj_out_logstds."): v for key, v in tensors.items() if "gm_out" in key}
        torch.testing.assert_close(out.logstds, official_logstds(mlp, temb).reshape(b, 1, 1, 1, 1), atol=1e-5, rtol=1e-5)

    from piflow_kernels.official_export import export_official

    # exported as the current official class (v2: proj_out_means / proj_out_logweights, one shared emb.*) and back
    exported = export_official(student, tmp_path / "v2")
    written = json.loads((exported / "config.json").read_text())
    assert written["_class_name"] == "GMDiTTransformer2DModelV2" and written["constant_logstd"] == (const if constant else None)
    assert written["num_gaussians"] == k and written["out_channels"] == c
    student.save_pretrained(tmp_path / "ours")  # and our own format
    for again in (load_official_adapter(exported), PiFlowStudent.from_pretrained(tmp_path / "ours").eval()):
        assert again.constant_logstd == student.constant_logstd
        mine, theirs = student.state_dict(), again.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[key], theirs[key]) for key in mine)
        with torch.no_grad():
            back = again(x, t, **kwargs)
        for field in ("means", "logweights", "logstds"):
            torch.testing.assert_close(getattr(back, field), getattr(out, field), atol=1e-6, rtol=1e-6)

    bad = dict(tensors, **{"proj_out_2.weight": tensors["proj_out_2.weight"][:-1]})
    folder = write_checkpoint(tmp_path / "bad", bad, "GMDiTTransformer2DModel", None, **head_cfg, **config)
    with pytest.raises(ValueError, match="proj_out_2.weight has"):
        load_official_adapter(folder)
    if not constant:  # what the official class cannot hold: per-block embeddings, diffusers' own sinusoid shift
        from piflow_kernels import build_student

        with torch.no_grad():
            student.trunk.transformer_blocks[-1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
        with pytest.raises(ValueError, match="shares one time/class embedding"):
            export_official(student, tmp_path / "unshared")
        with pytest.raises(ValueError, match="timestep_freq_shift=0"):
            export_official(build_student(tiny_teacher("dit")), tmp_path / "shift1")


# ---------------------------------------------------------------------------- bad input


@pytest.fixture
def flux_adapter(tmp_path):
    teacher = tiny_teacher("flux")
    tensors = gm_head_tensors(teacher, 2, 2 * 12, 2 * 4)
    return teacher, tensors, tmp_path


def test_missing_files_and_teacher(flux_adapter):
    teacher, tensors, tmp = flux_adapter
    with pytest.raises(FileNotFoundError, match="snapshot_download"):
        load_official_adapter(tmp / "nowhere", teacher)
    folder = write_checkpoint(tmp / "a", tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"})
    with pytest.raises(ValueError, match="teacher is required"):
        load_official_adapter(folder)
    with pytest.raises(ValueError, match="for a FluxTransformer2DModel teacher, got a SD3Transformer2DModel"):
        load_official_adapter(folder, tiny_teacher("sd3"))
    (tmp / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_official_adapter(tmp / "empty", teacher)


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda t: t.update({"norm_out.linear.weight": torch.randn(5, 5)}),
            r"norm_out.linear.weight: checkpoint tensor \(5, 5\)",
        ),
        (
            lambda t: t.update({"not_a_layer.weight": torch.randn(3)}),
            "no place in the FluxTransformer2DModel student: not_a_layer",
        ),
        (lambda t: t.update({"transformer_blocks.0.ff.net.2.lora_A.weight": torch.randn(2, 64)}), "needs both lora_A"),
        (
            lambda t: t.update({"nowhere.lora_A.weight": torch.randn(2, 4), "nowhere.lora_B.weight": torch.randn(4, 2)}),
            "no module 'trunk.nowhere'",
        ),  # fmt: skip
        (lambda t: t.pop("proj_out_logstds.1.weight"), r"proj_out_logstds layers \[3\]"),
        (lambda t: [t.pop(k) for k in list(t) if "logstds" in k], "no constant_logstd in its config.json"),
        (lambda t: t.update({"proj_out_logweights.weight": torch.randn(7, 16)}), "not a multiple of 4"),
        (lambda t: t.update({"gm_out.logstd_layers.1.weight": torch.randn(2)}), "v1"),
    ],
    ids=["shape", "unknown-key", "half-lora", "lora-target", "logstd-stack", "no-logstd", "logweight-rows", "gmdit-v1"],
)
def test_bad_checkpoints_name_the_key(flux_adapter, change, match):
    teacher, tensors, tmp = flux_adapter
    change(tensors)
    folder = write_checkpoint(tmp / "bad", tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"})
    with pytest.raises(ValueError, match=match):
        load_official_adapter(folder, teacher)


def test_unknown_keys_pass_when_not_strict_and_conflicts_are_refused(flux_adapter):
    teacher, tensors, tmp = flux_adapter
    tensors["not_a_layer.weight"] = torch.randn(3)
    folder = write_checkpoint(tmp / "extra", tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"})
    assert load_official_adapter(folder, teacher, strict=False).num_components == 2
    folder = write_checkpoint(tmp / "conflict", tensors, "GMFluxTransformer2DModel", {"type": "DX"})
    with pytest.raises(ValueError, match="conflicting policy types"):
        load_official_adapter(folder, teacher, strict=False)
    folder = write_checkpoint(tmp / "flux2", tensors, "GMFlux2Transformer2DModel", {"type": "GMFlow"})
    # a FLUX.2 checkpoint for a FLUX.1 teacher: the class is known, the teacher is the wrong one
    with pytest.raises(ValueError, match="GMFlux2Transformer2DModel checkpoints are for a Flux2Transformer2DModel teacher"):
        load_official_adapter(folder, teacher)
    folder = write_checkpoint(tmp / "k", tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"}, num_gaussians=8)
    with pytest.raises(ValueError, match="num_gaussians=8 but the weights hold 2"):
        load_official_adapter(folder, teacher, strict=False)


def test_damaged_index_and_metadata_name_the_file(flux_adapter):
    """Files that parse but do not say what the layout needs (tests/test_damaged_files.py has the garbled,
    truncated and empty ones): an index without a weight map, policy_config metadata that is not JSON."""
    from piflow_kernels.files import DamagedFileError

    teacher, tensors, tmp = flux_adapter
    folder = tmp / "sharded"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "part-1.safetensors"))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(DamagedFileError) as info:
        load_official_adapter(folder, teacher)
    assert str(info.value) == f"{index}: sharded checkpoint index: no 'weight_map' of tensor names to files"
    index.write_text(json.dumps({"weight_map": dict.fromkeys(tensors, "part-2.safetensors")}))
    with pytest.raises(FileNotFoundError, match=r"part-2\.safetensors does not exist \(checkpoint weights\)"):
        load_official_adapter(folder, teacher)

    weights = write_checkpoint(tmp / "meta", tensors, "GMFluxTransformer2DModel") / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata={"policy_config": "{type: GMFlow"})
    with pytest.raises(DamagedFileError, match=r"policy_config metadata is not JSON \(JSONDecodeError: "):
        read_policy_config(weights.parent)
