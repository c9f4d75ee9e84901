"""Official adapters kept as a named PEFT adapter (``load_official_adapter(..., fuse=False)``, the default).

The synthetic official checkpoints of test_official_weights.py (tiny teachers, random heads and LoRA
pairs, one with an ``.alpha`` and one of another rank) load both ways; the unfused student must compute
what the fused one computes, leave the base weights alone, give the teacher back with the adapter
disabled, and behave like any diffusers LoRA (stacking, weights, deletion). Offline, CPU.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
# diffusers' load_lora_adapter on a model that already has an adapter (the stacking tests do it on purpose)
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
from safetensors.torch import save_file  # noqa: E402
from test_official_weights import gm_head_tensors, lora_pair, official_gmdit, rand, write_checkpoint  # noqa: E402
from test_students import teacher_inputs, tiny_teacher  # noqa: E402

from piflow_kernels import load_official_adapter  # noqa: E402
from piflow_kernels.files import DamagedFileError  # noqa: E402
from piflow_kernels.official_weights import DEFAULT_ADAPTER_NAME  # noqa: E402

KINDS = ("gm-flux", "dx-flux", "gm-qwen")
LORA_TARGETS = {
    "flux": [
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.proj_out",
        "time_text_embed.timestep_embedder.linear_1",
    ],
    "qwen": [
        "transformer_blocks.0.img_mlp.net.0.proj",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.txt_mlp.net.2",
        "time_text_embed.timestep_embedder.linear_2",
    ],
}
ALPHA = 3.0  # on the second target (alpha / r = 1.5); the third has rank 3, the others rank 2


def adapter_tensors(teacher, kind: str) -> dict:
    """Head, norm_out and LoRA tensors of an official adapter for this tiny teacher."""
    name = kind.split("-")[1]
    c = 3
    if kind.startswith("gm"):
        k = 3
        tensors = gm_head_tensors(teacher, k, k * 4 * c, k * 4)
        tensors["norm_out.linear.weight"] = rand(*teacher.norm_out.linear.weight.shape, seed=8)
    else:
        n, d = 4, teacher.proj_out.in_features
        tensors = {"proj_out.weight": rand(n * 4 * c, d, seed=1), "proj_out.bias": rand(n * 4 * c, seed=2)}
    for i, path in enumerate(LORA_TARGETS[name]):
        a, b = lora_pair(teacher.get_submodule(path), seed=20 + 2 * i)
        if i == 2:  # another rank
            a, b = torch.cat([a, rand(1, a.shape[1], seed=90)]), torch.cat([b, rand(b.shape[0], 1, seed=91)], dim=1)
        prefix = "transformer." if i == 0 else ""  # the official loader strips a "transformer." prefix
        tensors[f"{prefix}{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = a, b
        if i == 1:
            tensors[f"{path}.alpha"] = torch.tensor(ALPHA)
    return tensors


def make_adapter(tmp_path, kind: str):
    teacher = tiny_teacher(kind.split("-")[1])
    tensors = adapter_tensors(teacher, kind)
    if kind == "gm-flux":
        folder = write_checkpoint(tmp_path / kind, tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"}, num_gaussians=3)
    elif kind == "gm-qwen":
        folder = write_checkpoint(tmp_path / kind, tensors, "GMQwenImageTransformer2DModel", {"type": "GMFlow"})
    else:
        policy = {"type": "DX", "segment_size": 1 / 3.5, "shift": 3.2}
        folder = write_checkpoint(tmp_path / kind, tensors, "FluxTransformer2DModel", policy)
    return teacher, tensors, folder


def run(student, kind: str) -> list[torch.Tensor]:
    x, t, kwargs = teacher_inputs(kind.split("-")[1])
    with torch.no_grad():
        out = student(x, t, **kwargs)
    return [out.means, out.logweights, out.logstds] if kind.startswith("gm") else [out.grid]


def assert_outputs_close(a: list[torch.Tensor], b: list[torch.Tensor], exact: bool = False) -> None:
    for x, y in zip(a, b, strict=True):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)


def lora_free(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if "lora_" not in k and not k.endswith(".alpha")}


# ---------------------------------------------------------------------------- unfused == fused


@pytest.mark.parametrize("kind", KINDS)
def test_unfused_student_equals_fused_and_keeps_the_base_weights(tmp_path, kind):
    teacher, tensors, folder = make_adapter(tmp_path, kind)
    name = kind.split("-")[1]
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    for scale in (1.0, 0.5):
        fused = load_official_adapter(folder, teacher, lora_scale=scale, fuse=True)
        student = load_official_adapter(folder, teacher, lora_scale=scale)  # fuse=False is the default
        trunk = student.trunk
        assert set(trunk.peft_config) == {DEFAULT_ADAPTER_NAME} and trunk.active_adapters() == [DEFAULT_ADAPTER_NAME]
        assert_outputs_close(run(student, kind), run(fused, kind))

        # alpha / r per module, times the adapter weight
        layer = trunk.get_submodule(LORA_TARGETS[name][1])
        assert layer.scaling[DEFAULT_ADAPTER_NAME] == pytest.approx(scale * ALPHA / 2)
        assert trunk.get_submodule(LORA_TARGETS[name][2]).r[DEFAULT_ADAPTER_NAME] == 3

        # every base weight the file does not overwrite is the teacher's, bit for bit
        overwritten = {k for k in tensors if "lora_" not in k and not k.endswith(".alpha")}
        checked = set()
        for key, value in trunk.state_dict().items():
            base = key.replace(".base_layer.", ".")
            if ".lora_" not in key and base in teacher_state and base not in overwritten:
                assert torch.equal(value, teacher_state[base]), base
                checked.add(base)
        assert checked == {k for k in teacher_state if k not in overwritten and not k.startswith("proj_out.")}
        for path in LORA_TARGETS[name]:
            assert torch.equal(trunk.get_submodule(path).base_layer.weight, teacher_state[f"{path}.weight"])
    for key, value in teacher.state_dict().items():  # and the teacher is untouched
        assert torch.equal(value, teacher_state[key])


@pytest.mark.parametrize("kind", ["gm-flux", "dx-flux"])
def test_disabled_adapter_gives_the_teacher_back(tmp_path, kind):
    teacher, tensors, folder = make_adapter(tmp_path, kind)
    student = load_official_adapter(folder, teacher)
    with_lora = run(student, kind)
    plain = load_official_adapter(write_checkpoint(tmp_path / "plain", lora_free(tensors), None), teacher)
    assert not torch.allclose(with_lora[0], run(plain, kind)[0], atol=1e-3)  # the LoRA matters

    # the trunk's call, replayed on the teacher: the features entering norm_out are the teacher's, bit for bit
    calls: dict = {}
    student.trunk.register_forward_pre_hook(lambda m, args, kwargs: calls.update(args=args, kwargs=kwargs), with_kwargs=True)
    seen: dict = {}
    student.trunk.norm_out.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args))
    teacher.norm_out.register_forward_pre_hook(lambda m, args: seen.__setitem__("teacher", args))
    student.trunk.disable_adapters()
    without = run(student, kind)
    with torch.no_grad():
        teacher(*calls["args"], **calls["kwargs"])
    assert len(seen["student"]) == len(seen["teacher"]) == 2  # hidden states, temb
    for s, t in zip(seen["student"], seen["teacher"], strict=True):
        assert torch.equal(s, t)
    # and the whole student is the one without LoRA
    assert_outputs_close(without, run(plain, kind), exact=True)

    student.trunk.enable_adapters()
    assert_outputs_close(run(student, kind), with_lora, exact=True)


# ---------------------------------------------------------------------------- a LoRA among others


def style_lora(teacher, name: str) -> dict:
    """An unrelated LoRA: on one layer the pi-Flow adapter also wraps and on one it does not."""
    paths = [LORA_TARGETS[name][0], "transformer_blocks.0.ff.net.2"]
    state = {}
    for i, path in enumerate(paths):
        a, b = lora_pair(teacher.get_submodule(path), seed=60 + 2 * i)
        state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = a, b
    return state


def test_stack_another_lora_then_delete_both(tmp_path):
    kind, name = "gm-flux", "flux"
    teacher, tensors, folder = make_adapter(tmp_path, kind)
    student = load_official_adapter(folder, teacher)
    alone = run(student, kind)
    style = style_lora(teacher, name)
    student.trunk.load_lora_adapter(dict(style), prefix=None, adapter_name="style")
    student.trunk.set_adapters([DEFAULT_ADAPTER_NAME, "style"], weights=[0.5, 0.7])
    assert set(student.trunk.active_adapters()) == {DEFAULT_ADAPTER_NAME, "style"}

    reference = load_official_adapter(folder, teacher, lora_scale=0.5, fuse=True)
    with torch.no_grad():
        for path in ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"):
            delta = style[f"{path}.lora_B.weight"] @ style[f"{path}.lora_A.weight"]
            reference.trunk.get_submodule(path).weight.add_(0.7 * delta)
    assert_outputs_close(run(student, kind), run(reference, kind))

    student.trunk.delete_adapters("style")
    assert set(student.trunk.peft_config) == {DEFAULT_ADAPTER_NAME}
    student.trunk.set_adapters(DEFAULT_ADAPTER_NAME, weights=1.0)
    assert_outputs_close(run(student, kind), alone, exact=True)

    student.trunk.delete_adapters(DEFAULT_ADAPTER_NAME)
    assert not getattr(student.trunk, "peft_config", None) and not any("lora_" in k for k in student.trunk.state_dict())
    plain = load_official_adapter(write_checkpoint(tmp_path / "plain", lora_free(tensors), None), teacher, policy_type="GMFlow")
    assert_outputs_close(run(student, kind), run(plain, kind), exact=True)


def test_custom_name_next_to_a_teacher_lora_and_fuse_to_save(tmp_path):
    """A teacher that already carries a LoRA: the pi-Flow adapter loads under its own name and is the active one
    (as after diffusers' load_lora_adapter); fusing and unloading it gives a plain student that saves."""
    from piflow_kernels import PiFlowStudent

    kind = "dx-flux"
    teacher, tensors, folder = make_adapter(tmp_path, kind)
    fused = load_official_adapter(folder, teacher, fuse=True)
    teacher.load_lora_adapter(style_lora(teacher, "flux"), prefix=None, adapter_name="style")
    student = load_official_adapter(folder, teacher, adapter_name="distilled")
    assert set(student.trunk.peft_config) == {"style", "distilled"} and student.trunk.active_adapters() == ["distilled"]
    assert_outputs_close(run(student, kind), run(fused, kind))

    student.trunk.delete_adapters("style")
    student.trunk.fuse_lora(adapter_names=["distilled"])
    student.trunk.unload_lora()
    assert not any("lora_" in k or "base_layer" in k for k in student.state_dict())
    assert_outputs_close(run(student, kind), run(fused, kind))
    student.save_pretrained(tmp_path / "saved")
    again = PiFlowStudent.from_pretrained(tmp_path / "saved").eval()
    assert_outputs_close(run(again, kind), run(student, kind), exact=True)


def test_save_pretrained_refuses_adapter_layers_and_names_the_fix(tmp_path):
    """An unfused student would be written under base_layer / lora_* keys from_pretrained cannot place: refused, with
    nothing written, naming the adapter and the calls that fuse it."""
    kind = "gm-flux"
    teacher, _, folder = make_adapter(tmp_path, kind)
    student = load_official_adapter(folder, teacher)
    with pytest.raises(ValueError, match=rf"adapters \['{DEFAULT_ADAPTER_NAME}'\].*fuse_lora.*unload_lora"):
        student.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_sharded_adapter_loads_unfused(tmp_path):
    kind = "gm-flux"
    teacher, tensors, folder = make_adapter(tmp_path, kind)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((folder / "config.json").read_text())
    keys = sorted(tensors)
    shards = {"part-1.safetensors": keys[::2], "part-2.safetensors": keys[1::2]}
    for file, names in shards.items():
        meta = {"policy_config": json.dumps({"type": "GMFlow"})} if file == "part-1.safetensors" else None
        save_file({k: tensors[k].contiguous() for k in names}, str(sharded / file), metadata=meta)
    weight_map = {k: file for file, names in shards.items() for k in names}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    student = load_official_adapter(sharded, teacher)
    assert DEFAULT_ADAPTER_NAME in student.trunk.peft_config
    assert_outputs_close(run(student, kind), run(load_official_adapter(folder, teacher), kind), exact=True)


def test_trunk_without_peft_support_is_fused_with_a_warning(tmp_path, caplog):
    """GM-DiT (diffusers' DiT has no PEFT adapter support): a LoRA in the checkpoint is fused, and the log says so."""
    dit = tiny_teacher("dit")
    tensors = official_gmdit(dit, 3)
    a, b = lora_pair(dit.transformer_blocks[0].ff.net[2], seed=5)
    tensors["transformer_blocks.0.ff.net.2.lora_A.weight"], tensors["transformer_blocks.0.ff.net.2.lora_B.weight"] = a, b
    config = {key: dit.config[key] for key in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers",
                                               "sample_size", "patch_size", "norm_num_groups")}  # fmt: skip
    folder = write_checkpoint(tmp_path / "gmdit", tensors, "GMDiTTransformer2DModelV2", {"type": "GMFlow"},
                              num_gaussians=3, **config)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="piflow_kernels.official_weights"):
        student = load_official_adapter(folder)
    assert "no PEFT adapter support" in caplog.text and "fused" in caplog.text
    fused = load_official_adapter(folder, fuse=True)
    assert_outputs_close(run_dit(student), run_dit(fused), exact=True)


def run_dit(student) -> list[torch.Tensor]:
    x, t, kwargs = teacher_inputs("dit")
    with torch.no_grad():
        out = student(x, t, **kwargs)
    return [out.means, out.logweights, out.logstds]


# ---------------------------------------------------------------------------- bad input


def test_adapter_for_another_base_size_names_the_key(tmp_path):
    teacher, tensors, _ = make_adapter(tmp_path, "gm-flux")
    path = LORA_TARGETS["flux"][1]
    tensors[f"{path}.lora_A.weight"] = rand(2, 24, seed=3)  # a base with hidden size 24, not 16
    folder = write_checkpoint(tmp_path / "wide-lora", tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"})
    with pytest.raises(ValueError, match=rf"LoRA for '{path}': lora_A \(2, 24\).*another model size"):
        load_official_adapter(folder, teacher)
    with pytest.raises(ValueError, match=rf"LoRA for '{path}': lora_B @ lora_A is \(16, 24\)"):
        load_official_adapter(folder, teacher, fuse=True)  # the fused path keeps its error
    tensors = adapter_tensors(teacher, "gm-flux")
    tensors["proj_out_means.weight"] = rand(36, 24, seed=1)
    folder = write_checkpoint(tmp_path / "wide-head", tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"})
    with pytest.raises(ValueError, match=r"proj_out_means.weight: checkpoint tensor \(36, 24\)"):
        load_official_adapter(folder, teacher)


def test_adapter_name_in_use_is_refused_before_the_teacher_changes(tmp_path):
    teacher, _, folder = make_adapter(tmp_path, "gm-flux")
    teacher.load_lora_adapter(style_lora(teacher, "flux"), prefix=None, adapter_name=DEFAULT_ADAPTER_NAME)
    with pytest.raises(ValueError, match=f"adapter_name '{DEFAULT_ADAPTER_NAME}' is already an adapter"):
        load_official_adapter(folder, teacher, copy_teacher=False)
    assert isinstance(teacher.proj_out, torch.nn.Linear)  # not turned into a student
    assert load_official_adapter(folder, teacher, adapter_name="second").trunk.active_adapters() == ["second"]
    with pytest.raises(ValueError, match="has no name"):
        load_official_adapter(folder, teacher, fuse=True, adapter_name="x")
    with pytest.raises(ValueError, match="without dots"):
        load_official_adapter(folder, teacher, adapter_name="a.b")


def test_missing_peft_names_the_install(tmp_path, monkeypatch):
    teacher, tensors, folder = make_adapter(tmp_path, "gm-flux")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(ImportError, match="pip install peft"):
        load_official_adapter(folder, teacher, copy_teacher=False)
    assert isinstance(teacher.proj_out, torch.nn.Linear)
    assert load_official_adapter(folder, teacher, fuse=True).num_components == 3  # fusing needs no peft
    plain = write_checkpoint(tmp_path / "plain", lora_free(tensors), "GMFluxTransformer2DModel", {"type": "GMFlow"})
    assert load_official_adapter(plain, teacher).num_components == 3  # nor does a checkpoint without LoRA


def test_old_peft_names_the_versions(tmp_path, monkeypatch):
    import peft

    teacher, _, folder = make_adapter(tmp_path, "gm-flux")
    monkeypatch.setattr(peft, "__version__", "0.14.0")  # rank patterns anchored with "^" need PEFT 0.15
    with pytest.raises(ImportError, match=r"needs peft>=0.15 and diffusers>=0.34 \(found peft 0.14.0"):
        load_official_adapter(folder, teacher)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: t.update({"transformer_blocks.0.ff.net.2.lora_A.weight": torch.randn(2, 64)}), "needs both lora_A"),
        (
            lambda t: t.update({"nowhere.lora_A.weight": torch.randn(2, 4), "nowhere.lora_B.weight": torch.randn(4, 2)}),
            "no module 'trunk.nowhere'",
        ),  # fmt: skip
        (
            lambda t: t.update({"transformer_blocks.0.ff.net.2.lora_magnitude_vector": torch.randn(16)}),
            "DoRA weights",
        ),  # fmt: skip
        (
            lambda t: t.update(
                {"proj_out_logstds.1.lora_A.weight": torch.randn(2, 32), "proj_out_logstds.1.lora_B.weight": torch.randn(24, 2)}
            ),
            r"apply to \['proj_out_logstds.1'\].*fuse=True",
        ),
    ],
    ids=["half-lora", "lora-target", "dora", "lora-outside-trunk"],
)
def test_bad_lora_pairs_name_the_key(tmp_path, change, match):
    teacher, tensors, _ = make_adapter(tmp_path, "gm-flux")
    change(tensors)
    folder = write_checkpoint(tmp_path / "bad", tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"})
    with pytest.raises(ValueError, match=match):
        load_official_adapter(folder, teacher)
    assert not getattr(teacher, "peft_config", None)


def test_damaged_file_is_named(tmp_path):
    teacher, _, folder = make_adapter(tmp_path, "gm-flux")
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DamagedFileError, match="diffusion_pytorch_model.safetensors"):
        load_official_adapter(folder, teacher)


# ---------------------------------------------------------------------------- quantized base


def test_int8_weight_only_base_takes_the_adapter(tmp_path):
    """TorchAO int8 weight-only FLUX base (CPU): fusing is refused, the adapter loads and the student is the
    unquantized one up to the quantization error. The base's output layer stays unquantized (the student
    builds its policy head from it; the adapter replaces it anyway)."""
    pytest.importorskip("torchao")
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    kind = "gm-flux"
    teacher, _, folder = make_adapter(tmp_path, kind)
    teacher.save_pretrained(tmp_path / "base")
    config = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["proj_out"])
    quantized = FluxTransformer2DModel.from_pretrained(tmp_path / "base", quantization_config=config, torch_dtype=torch.float32)
    quantized.eval()
    path = LORA_TARGETS["flux"][0]
    assert type(quantized.get_submodule(path).weight) is not torch.nn.Parameter  # a TorchAO tensor subclass
    with pytest.raises(ValueError, match="cannot fuse into a .* weight.*fuse=False"):
        load_official_adapter(folder, quantized, fuse=True, copy_teacher=False)
    assert isinstance(quantized.proj_out, torch.nn.Linear)

    reference = load_official_adapter(folder, teacher)
    for scale in (1.0, 0.5):
        student = load_official_adapter(folder, quantized, lora_scale=scale)
        reference.trunk.set_adapters(DEFAULT_ADAPTER_NAME, weights=scale)
        assert "torchao" in type(student.trunk.get_submodule(path)).__module__
        for got, want in zip(run(student, kind), run(reference, kind), strict=True):
            error = (got - want).norm() / want.norm()
            assert error < 2e-2, error
        assert torch.equal(student.trunk.norm_out.linear.weight, reference.trunk.norm_out.linear.weight)


# ---------------------------------------------------------------------------- packaging


def test_peft_comes_with_the_diffusers_extra_and_the_setup_probe():
    """fuse=False is the default, so ``pip install piflow_kernels[diffusers]`` brings peft, and run.sh reinstalls the
    test extras when it is missing."""
    from pathlib import Path

    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.replace(" ", "").startswith("peft>=") for req in extras["diffusers"])
    probe = (root / "run.sh").read_text().split("TEST_EXTRA_PROBE='", 1)[1].split("'", 1)[0]
    assert "peft" in [name.strip() for line in probe.splitlines() if line.startswith("import ") for name in line[7:].split(",")]


@pytest.mark.cuda
def test_nf4_base_takes_the_adapter_on_cuda(tmp_path):
    """bitsandbytes 4-bit (NF4) FLUX base on CUDA, as the torchao test above: fusing is refused, the adapter loads on
    the quantized layers and the student is the unquantized one up to the quantization error."""
    pytest.importorskip("bitsandbytes")
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    kind = "gm-flux"
    teacher, _, folder = make_adapter(tmp_path, kind)
    teacher.save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["proj_out"])  # fmt: skip
    quantized = FluxTransformer2DModel.from_pretrained(tmp_path / "base", quantization_config=config, torch_dtype=torch.float32)
    quantized.eval()
    path = LORA_TARGETS["flux"][0]
    assert "bitsandbytes" in type(quantized.get_submodule(path)).__module__
    with pytest.raises(ValueError, match="fuse=False"):
        load_official_adapter(folder, quantized, fuse=True, copy_teacher=False)
    reference = load_official_adapter(folder, teacher.cuda())
    student = load_official_adapter(folder, quantized)
    x, t, kwargs = teacher_inputs("flux")
    inputs = [v.cuda() if isinstance(v, torch.Tensor) else v for v in (x, t)]
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with torch.no_grad():
        got, want = student(*inputs, **kwargs), reference(*inputs, **kwargs)
    for name in ("means", "logweights", "logstds"):
        a, b = getattr(got, name).float(), getattr(want, name).float()
        error = (a - b).norm() / b.norm()
        assert error < 1e-1, (name, error)  # NF4 keeps about 3 bits of each weight
