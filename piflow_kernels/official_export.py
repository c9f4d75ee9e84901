"""Write a :class:`~piflow_kernels.PiFlowStudent` in the official pi-Flow layout (what LakonLab's
``tools/export_piflow_to_diffusers.py`` writes and its ``load_lakonlab_adapter`` / ComfyUI-piFlow read).

The folder holds ``config.json`` (the official ``_class_name``, e.g. ``GMFluxTransformer2DModel``, with the
teacher's config and the official head settings: ``num_gaussians``, ``logstd_inner_dim``,
``gm_num_logstd_layers``, ``logweights_channels``; a DX class's ``out_channels`` is N times the teacher's) and
``diffusion_pytorch_model.safetensors`` whose ``policy_config`` metadata is ``{"type": ..., **policy_config}``.
A student with a ``constant_logstd`` writes it in ``config.json`` (the official heads' option) and no
``proj_out_logstds.*``.
Weights are under the official names: ``proj_out_means.*``, ``proj_out_logweights.*``, ``proj_out_logstds.*``
(GMFlow), the widened ``proj_out.*`` (DX), trunk layers by their diffusers names, and LoRA pairs
``<module>.lora_A.weight`` / ``<module>.lora_B.weight``.

Which weights: a student whose trunk carries a PEFT adapter (``load_official_adapter(fuse=False)``, or a LoRA
student) is written as an adapter: the policy head, ``norm_out`` and the LoRA pairs, unfused (the official
adapters' convention alpha = r: the pair is written with ``B * alpha / r``, exact when alpha = r). Any other
student is written whole (the official loader puts every non-LoRA key over the base weights). Past
``max_shard_size`` the weights are split into shards with an index (``*.safetensors.index.json``), which this
library's loader reads; the official loader reads a single file only.

A GMFlow student of a ``DiTTransformer2DModel`` with the official timestep embedding (``timestep_freq_shift=0``, as
:func:`~piflow_kernels.load_official_adapter` builds GM-DiT students) is written as a full
``GMDiTTransformer2DModelV2``: diffusers' per-block copies of the time/class embedding become the one shared
``emb.*`` (they must agree), and the config holds the DiT arguments with ``out_channels`` = C.

    >>> export_official(student, "my_gmflux_k8_4step", policy_config={"type": "GMFlow"})
    >>> student2 = load_official_adapter("my_gmflux_k8_4step", teacher)      # the same student back
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from piflow_kernels.layouts import arch_for, geometry
from piflow_kernels.official_lora import _adapter_names
from piflow_kernels.official_weights import INDEX_NAME, WEIGHTS_NAME
from piflow_kernels.students import PiFlowStudent

__all__ = ["export_official", "official_class_name"]

# (teacher class, policy type) -> official _class_name (the classes the loader reads)
_EXPORT_CLASSES = {
    ("FluxTransformer2DModel", "GMFlow"): "GMFluxTransformer2DModel",
    ("FluxTransformer2DModel", "DX"): "DXFluxTransformer2DModel",
    ("QwenImageTransformer2DModel", "GMFlow"): "GMQwenImageTransformer2DModel",
    ("QwenImageTransformer2DModel", "DX"): "DXQwenImageTransformer2DModel",
    ("Flux2Transformer2DModel", "GMFlow"): "GMFlux2Transformer2DModel",  # pi-FLUX.2 (no official DX FLUX.2 class)
    ("DiTTransformer2DModel", "GMFlow"): "GMDiTTransformer2DModelV2",  # GM-DiT: a full model, one shared emb.*
}
# the DiT arguments of LakonLab's _GMDiTTransformer2DModelV2 __init__ (after its head arguments)
_GMDIT_TRUNK_KEYS = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "dropout", "norm_num_groups",
                     "attention_bias", "sample_size", "patch_size", "activation_fn", "num_embeds_ada_norm",
                     "upcast_attention", "norm_type", "norm_elementwise_affine", "norm_eps")  # fmt: skip
# The trunk arguments of the official GM classes' registered config (LakonLab's _GMFluxTransformer2DModel,
# _GMQwenImageTransformer2DModel and _GMFlux2Transformer2DModel __init__), after their head arguments; their channels
# count packed tokens (FLUX.1 / Qwen-Image: 16 latent channels x 2 x 2 = 64; FLUX.2: 32 x 2 x 2 = 128). The DX
# classes register their diffusers base class's config with patch_size 1 and out_channels = N x the packed channels.
_GM_HEAD_KEYS = ("num_gaussians", "constant_logstd", "logstd_inner_dim", "gm_num_logstd_layers", "logweights_channels")
_GM_TRUNK_KEYS = {
    "FluxTransformer2DModel": ("in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
                               "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
                               "axes_dims_rope"),
    "QwenImageTransformer2DModel": ("in_channels", "out_channels", "num_layers", "attention_head_dim",
                                    "num_attention_heads", "joint_attention_dim", "axes_dims_rope", "zero_cond_t",
                                    "use_additional_t_cond", "use_layer3d_rope"),
    "Flux2Transformer2DModel": ("in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
                                "num_attention_heads", "joint_attention_dim", "timestep_guidance_channels", "mlp_ratio",
                                "axes_dims_rope", "rope_theta", "eps", "guidance_embeds"),
}  # fmt: skip


def official_class_name(student: PiFlowStudent) -> str:
    """The official ``_class_name`` of a student, or a ValueError naming what cannot be exported."""
    key = (student.teacher_class, student.policy_type)
    if key not in _EXPORT_CLASSES:
        supported = ", ".join(f"{t} {p}" for t, p in _EXPORT_CLASSES)
        raise ValueError(f"no official layout for a {key[1]} student of a {key[0]} teacher (supported: {supported})")
    if key[0] == "DiTTransformer2DModel":
        cfg = student.config
        if cfg.get("timestep_freq_shift") != 0.0 or cfg.get("timestep_divisor") not in (None, 1.0):
            raise ValueError(
                f"no official layout for a {key[1]} student of a {key[0]} teacher with this timestep embedding: "
                "GMDiTTransformer2DModelV2 has the official one (timestep_freq_shift=0, timestep_divisor 1), this student "
                f"has timestep_freq_shift={cfg.get('timestep_freq_shift')}, timestep_divisor={cfg.get('timestep_divisor')}"
            )
    return _EXPORT_CLASSES[key]


def _official_config(student: PiFlowStudent, class_name: str) -> dict[str, Any]:
    cfg = student.config
    teacher = {k: v for k, v in dict(cfg.teacher_config).items() if not k.startswith("_")}
    c, c_teacher, p = geometry(student.teacher_class, teacher)
    packed = c_teacher * p * p  # output channels of one token
    if student.teacher_class == "DiTTransformer2DModel":
        constant = cfg.get("constant_logstd")
        head = (int(cfg.num_components), None if constant is None else float(constant), int(cfg.logstd_inner_dim),
                int(cfg.num_logstd_layers))  # fmt: skip
        trunk = {k: teacher[k] for k in _GMDIT_TRUNK_KEYS if k in teacher}
        return {"_class_name": class_name, **dict(zip(_GM_HEAD_KEYS[:4], head)), **trunk, "out_channels": int(c)}
    if student.policy_type == "GMFlow":
        constant = cfg.get("constant_logstd")  # None: the log-std MLP (proj_out_logstds.*) is in the weights
        constant = None if constant is None else float(constant)
        head = (int(cfg.num_components), constant, int(cfg.logstd_inner_dim), int(cfg.num_logstd_layers), p * p)
        trunk = {k: teacher[k] for k in _GM_TRUNK_KEYS[student.teacher_class] if k in teacher}
        trunk["in_channels"], trunk["out_channels"] = int(teacher["in_channels"]), packed
        out = {**dict(zip(_GM_HEAD_KEYS, head)), **trunk}
    else:
        out = {**teacher, "patch_size": 1, "out_channels": int(cfg.num_points) * packed}
    return {"_class_name": class_name, **out}


def _head_key(key: str, student: PiFlowStudent) -> str | None:
    """The official name of a student state-dict key of the policy head, or None for a trunk key."""
    head = f"trunk.{arch_for(student.teacher_class).out_attr}."
    if key.startswith(head + "means."):
        return "proj_out_means." + key[len(head + "means.") :]
    if key.startswith(head + "logweights."):
        return "proj_out_logweights." + key[len(head + "logweights.") :]
    if key.startswith(head + "grid."):
        return head[len("trunk.") :] + key[len(head + "grid.") :]
    if key.startswith("proj_out_logstds."):
        return key
    return None


def _lora_layers(trunk: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """PEFT LoRA layers of the trunk by their module path."""
    return {name: m for name, m in trunk.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def _pick_adapter(trunk: torch.nn.Module, adapter_name: str | None) -> str | None:
    names = sorted(_adapter_names(trunk))
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"adapter_name {adapter_name!r} is not an adapter of the student's trunk (it has {names})")
        return adapter_name
    if not names:
        return None
    active = trunk.active_adapters() if hasattr(trunk, "active_adapters") else names
    if len(active) != 1:
        raise ValueError(f"the trunk has adapters {names} ({active} active): name the one to export with adapter_name")
    return active[0]


@torch.no_grad()
def _official_state(student: PiFlowStudent, adapter: str | None) -> dict[str, torch.Tensor]:
    layers = _lora_layers(student.trunk) if adapter is not None else {}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in student.state_dict().items():
        if ".lora_" in key or key.endswith(".lora_magnitude_vector"):
            continue  # written from the layers below
        official = _head_key(key, student)
        if official is None:
            if not key.startswith("trunk."):
                raise ValueError(f"student key {key!r} has no place in the official layout")
            official = key[len("trunk.") :].replace(".base_layer.", ".")
            if adapter is not None and not official.startswith("norm_out."):
                continue  # an adapter leaves the base weights to the teacher
        state[official] = tensor.detach().contiguous()
    for path, layer in layers.items():
        if adapter not in layer.lora_A:
            continue
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise ValueError(f"{path}: DoRA adapters have no official layout")
        scaling = float(layer.scaling[adapter])
        state[f"{path}.lora_A.weight"] = layer.lora_A[adapter].weight.detach().contiguous()
        up = layer.lora_B[adapter].weight.detach()
        state[f"{path}.lora_B.weight"] = (up if scaling == 1.0 else up * scaling).contiguous()
    if student.teacher_class == "DiTTransformer2DModel":
        _share_dit_emb(state)
    return state


def _share_dit_emb(state: dict[str, torch.Tensor]) -> None:
    """GM-DiT keeps one time/class embedding ``emb.*`` for all blocks where diffusers' DiT has one per block
    (``transformer_blocks.i.norm1.emb.*``): the copies must agree, and become the one."""
    shared: dict[str, tuple[str, torch.Tensor]] = {}
    for key in [k for k in state if ".norm1.emb." in k and k.startswith("transformer_blocks.")]:
        name = "emb." + key.split(".norm1.emb.", 1)[1]
        tensor = state.pop(key)
        if name in shared and not torch.equal(shared[name][1], tensor):
            raise ValueError(
                f"{key} differs from {shared[name][0]}: GM-DiT shares one time/class embedding (emb.*) between its blocks"
            )
        shared.setdefault(name, (key, tensor))
    state.update({name: tensor for name, (_, tensor) in shared.items()})


def _shard_bytes(size: int | str | None) -> int | None:
    """``max_shard_size`` in bytes: a positive int, or a size string such as "5GB" (huggingface_hub's units)."""
    if size is None:
        return None
    if isinstance(size, str):
        from huggingface_hub.serialization._base import parse_size_to_int  # what split_torch_state_dict_into_shards reads

        try:
            size = parse_size_to_int(size)
        except ValueError:
            size = None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError("max_shard_size must be a positive number of bytes or a size such as '5GB', got "
                         f"{size if size is not None else 'an unreadable size'!r}")  # fmt: skip
    return size


def export_official(
    student: PiFlowStudent,
    out_dir: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    policy_config: dict[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``student`` to ``out_dir`` in the official layout (module docstring); returns the folder.

    Args:
        student: a :class:`~piflow_kernels.PiFlowStudent` of a FLUX.1 or Qwen-Image teacher, or a GMFlow student
            of a FLUX.2 or DiT (GM-DiT) teacher.
        out_dir: the folder to create (refused when it exists and is not empty, unless ``overwrite``).
        adapter_name: the trunk's PEFT adapter to write (default: the only active one; none: the whole student).
        policy_config: sampling settings for the ``policy_config`` metadata (e.g. a DX student's
            ``{"segment_size": 0.2857, "shift": 3.2}``); ``type`` is the student's policy type.
        max_shard_size: bytes (or "5GB") per safetensors shard; None writes one file.
        overwrite: replace an existing folder.
    """
    if not isinstance(student, PiFlowStudent):
        raise TypeError(f"student must be a PiFlowStudent, got {type(student).__name__}")
    class_name = official_class_name(student)
    meta_policy = dict(policy_config or {})
    if meta_policy.get("type", student.policy_type) != student.policy_type:
        raise ValueError(f"policy_config type {meta_policy['type']!r} differs from the student's {student.policy_type!r}")
    meta = {"policy_config": json.dumps({**meta_policy, "type": student.policy_type})}
    limit = _shard_bytes(max_shard_size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {out} exists and is not empty (overwrite=True replaces it)")
    state = _official_state(student, _pick_adapter(student.trunk, adapter_name))
    config = _official_config(student, class_name)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the folder keeps that mode once renamed
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        split = None
        if limit is not None:
            from huggingface_hub import split_torch_state_dict_into_shards  # a dependency of diffusers

            split = split_torch_state_dict_into_shards(
                state, filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=limit
            )
        if split is None or not split.is_sharded:
            save_file(state, str(staging / WEIGHTS_NAME), metadata=meta)
        else:
            for filename, keys in split.filename_to_tensors.items():
                save_file({k: state[k] for k in keys}, str(staging / filename), metadata=meta)
            index = {"metadata": {**split.metadata, **meta}, "weight_map": split.tensor_to_filename}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)  # the folder appears complete or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
