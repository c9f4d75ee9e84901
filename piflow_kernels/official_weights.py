"""Load the released pi-Flow weights (official adapter layout) into :class:`~piflow_kernels.PiFlowStudent`.

The official releases are diffusers-style folders: ``config.json`` (``_class_name`` such as
``GMFluxTransformer2DModel``) and ``diffusion_pytorch_model.safetensors`` whose metadata carries
``policy_config`` (JSON: the policy type and its options). Two kinds:

- adapters (pi-FLUX.1, pi-Qwen-Image, pi-FLUX.2: ``gmflux_k8_piid_4step``, ``dxflux_n10_piid_4step``,
  ``gmqwen_k8_piid_4step``, ``gmflux2_k8_piid_4step``, ...): the policy head (``proj_out_means``, ``proj_out_logweights``,
  ``proj_out_logstds.{1,3}`` for GMFlow; the widened ``proj_out`` for DX), ``norm_out.*``, and PEFT
  LoRA pairs ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` on the base model's layers. The
  base model (the teacher) must be given.
- full models (GM-DiT ImageNet, ``GMDiTTransformer2DModelV2``): every weight; the DiT teacher is
  built from ``config.json`` when none is given. Its time/class embedding ``emb.*`` is shared by all
  blocks (diffusers' DiT keeps one copy per block, so it is copied into each) and its sinusoidal
  timestep embedding has frequency shift 0 (diffusers' DiT: 1), which the student records.
  The older GM-DiT v1 layout (``GMDiTTransformer2DModel``) is read too: its single ``proj_out_2`` holds,
  per sub-pixel, the K*C means rows then the K logweights rows, and ``gm_out.logstd_layers.*`` is the
  log-std MLP; they become ``proj_out_means`` / ``proj_out_logweights`` / ``proj_out_logstds``.

A checkpoint whose ``config.json`` sets ``constant_logstd`` (the official heads' fixed log-std, a number in the
config, not a weight) has no ``proj_out_logstds``; it loads into a student with that ``constant_logstd``.

LoRA pairs (alpha = r when the file has no ``.alpha``; the official adapters are trained with alpha = r)
are applied one of two ways:

- ``fuse=False`` (the default, as the official pipelines' ``load_lakonlab_adapter``): the pairs become a
  named PEFT adapter on ``student.trunk`` (default name ``"transformer_piflow"``), loaded with diffusers'
  ``load_lora_adapter``; the base weights stay as they are. ``lora_scale`` is the adapter's weight
  (``set_adapters(name, weights=lora_scale)``); other LoRAs can be stacked next to it with
  ``student.trunk.set_adapters([...], weights=[...])``, it can be rescaled, disabled (``disable_adapters``: the
  trunk is the teacher's again, up to the overwritten head and ``norm_out``), deleted, and it loads on
  quantized bases (e.g. TorchAO int8 weight-only) where fusing is impossible. Needs ``peft``. Trunks
  without diffusers' PEFT support (``DiTTransformer2DModel``, ``UNet2DModel``) are fused instead, with a
  logged warning.
- ``fuse=True``: fused into the weights, ``W += lora_scale * alpha / r * B @ A`` (as the official
  training-side loader does): no PEFT layers, no run-time cost, nothing to undo.

Nothing is downloaded: pass a local folder (e.g. from ``huggingface_hub.snapshot_download``).
Files are read through :mod:`piflow_kernels.files`: a garbled, truncated or empty ``.safetensors``, index
or ``config.json`` is a :class:`~piflow_kernels.files.DamagedFileError` naming the file.

    >>> teacher = FluxTransformer2DModel.from_pretrained("black-forest-labs/FLUX.1-dev", subfolder="transformer")
    >>> student = load_official_adapter("pi-FLUX.1/gmflux_k8_piid_4step", teacher, copy_teacher=False)
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from piflow_kernels.checks import is_real
from piflow_kernels.files import DamagedFileError, load_safetensors, read_json, safetensors_metadata
from piflow_kernels.layouts import arch_for, geometry, teacher_class_name
from piflow_kernels.official_lora import (
    _ALPHA_RE,
    _LORA_RE,
    _check_adapter_name,
    _check_fusable,
    _fuse_lora,
    _load_adapter,
    _require_peft,
    _supports_adapters,
    _target_keys,
    _target_modules,
)
from piflow_kernels.students import PiFlowStudent, build_student

__all__ = ["DEFAULT_ADAPTER_NAME", "load_official_adapter", "read_policy_config"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# official _class_name -> (diffusers teacher class, policy type or None when the keys decide)
_OFFICIAL_CLASSES: dict[str, tuple[str, str | None]] = {
    "GMFluxTransformer2DModel": ("FluxTransformer2DModel", "GMFlow"),
    "DXFluxTransformer2DModel": ("FluxTransformer2DModel", "DX"),
    "FluxTransformer2DModel": ("FluxTransformer2DModel", None),
    "GMQwenImageTransformer2DModel": ("QwenImageTransformer2DModel", "GMFlow"),
    "DXQwenImageTransformer2DModel": ("QwenImageTransformer2DModel", "DX"),
    "QwenImageTransformer2DModel": ("QwenImageTransformer2DModel", None),
    "GMSD3Transformer2DModel": ("SD3Transformer2DModel", "GMFlow"),
    # LakonLab's _GMFlux2Transformer2DModel: proj_out_means (K * 128 rows: k, c, 2x2 pixel), proj_out_logweights
    # (K * 4), proj_out_logstds on time_guidance_embed, norm_out.linear (no bias), LoRA on the FLUX.2 trunk
    "GMFlux2Transformer2DModel": ("Flux2Transformer2DModel", "GMFlow"),
    "GMDiTTransformer2DModelV2": ("DiTTransformer2DModel", "GMFlow"),
    # GM-DiT v1: proj_out_2 rows (pixel, [K*C means | K logweights]), the log-std MLP under gm_out.logstd_layers
    "GMDiTTransformer2DModel": ("DiTTransformer2DModel", "GMFlow"),
}
_FULL_MODEL_CLASSES = ("GMDiTTransformer2DModelV2", "GMDiTTransformer2DModel")
_GMDIT_V1 = "GMDiTTransformer2DModel"
_PREFIXES = ("transformer.", "diffusion_ema.denoising.", "diffusion.denoising.")
# the official pipelines' default adapter name, f"{target_module_name}_piflow" with target_module_name "transformer"
DEFAULT_ADAPTER_NAME = "transformer_piflow"


def _resolve(path: str | os.PathLike, subfolder: str | None) -> tuple[list[Path], dict[str, Any] | None]:
    root = Path(path)
    if subfolder:
        root = root / subfolder
    if not root.exists():
        raise FileNotFoundError(
            f"{root} does not exist: load_official_adapter reads a local folder or .safetensors file (download it first, "
            "e.g. huggingface_hub.snapshot_download('Lakonik/pi-FLUX.1', allow_patterns='gmflux_k8_piid_4step/*'))"
        )
    folder = root.parent if root.is_file() else root
    if root.is_file():
        if root.suffix != ".safetensors":
            raise ValueError(f"{root} is not a .safetensors file")
        files = [root]
    elif (root / INDEX_NAME).exists():
        index = read_json(root / INDEX_NAME, "sharded checkpoint index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise DamagedFileError(root / INDEX_NAME, "sharded checkpoint index: no 'weight_map' of tensor names to files")
        files = [root / name for name in sorted(set(weight_map.values()))]
    elif (root / WEIGHTS_NAME).exists():
        files = [root / WEIGHTS_NAME]
    else:
        found = sorted(root.glob("*.safetensors"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{root} must hold {WEIGHTS_NAME} (or one .safetensors file, or {INDEX_NAME}); found {[f.name for f in found]}"
            )
        files = found
    config_file = folder / "config.json"
    config = read_json(config_file, "checkpoint config") if config_file.exists() else None
    if config is not None and not isinstance(config, dict):
        raise DamagedFileError(config_file, f"checkpoint config: a JSON {type(config).__name__}, not an object of keys")
    return files, config


def read_policy_config(path: str | os.PathLike, subfolder: str | None = None) -> dict[str, Any]:
    """The ``policy_config`` metadata of an official checkpoint (e.g. ``{"type": "DX", "segment_size": 0.2857,
    "shift": 3.2}``), or {} when absent. DX options map to :class:`~piflow_kernels.PiFlowScheduler`'s
    ``dx_segment_size`` / ``dx_shift`` / ``dx_mode``."""
    files, _ = _resolve(path, subfolder)
    for file in files:
        meta = safetensors_metadata(file, "checkpoint weights")
        if "policy_config" in meta:
            try:
                policy = json.loads(meta["policy_config"])
            except json.JSONDecodeError as err:
                raise DamagedFileError(file, "checkpoint weights: the policy_config metadata is not JSON", err) from err
            if not isinstance(policy, dict):
                raise DamagedFileError(file, "checkpoint weights: the policy_config metadata is not a JSON object")
            return policy
    return {}


def _normalise_key(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key.replace(".base_layer.", ".")


def _dit_teacher_from_config(config: dict[str, Any]) -> nn.Module:
    import diffusers  # imported by students already (with the install hint when missing)

    params = inspect.signature(diffusers.DiTTransformer2DModel.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k in params and k != "self"}
    return diffusers.DiTTransformer2DModel(**kwargs)


def _from_gmdit_v1(state: dict[str, torch.Tensor], teacher: nn.Module, config: dict[str, Any] | None) -> None:
    """Rename a GM-DiT v1 state dict in place to the v2 head: ``proj_out_2`` (p2 * (K*C + K) rows: per sub-pixel
    the means (k, c) then the logweights (k), as the v1 ``GMOutput2D`` splits the unpatchified channels) becomes
    ``proj_out_means`` (p2 * K*C) and ``proj_out_logweights`` (p2 * K); ``gm_out.logstd_layers.i`` becomes
    ``proj_out_logstds.i`` (the same (SiLU, Linear) stack)."""
    for key in [k for k in state if k.startswith("gm_out.")]:
        if not key.startswith("gm_out.logstd_layers."):
            raise ValueError(f"GM-DiT v1 key {key!r} is not part of the v1 head (gm_out.logstd_layers.*)")
        state["proj_out_logstds." + key[len("gm_out.logstd_layers.") :]] = state.pop(key)
    if "proj_out_2.weight" not in state:
        raise ValueError("not a GM-DiT v1 checkpoint: missing proj_out_2.weight (the v1 output layer of means and logweights)")
    p2 = teacher.config.patch_size**2
    c = teacher.config.in_channels
    rows = state["proj_out_2.weight"].shape[0]
    if rows % (p2 * (c + 1)):
        raise ValueError(f"proj_out_2.weight has {rows} rows, not {p2} pixels x K * ({c} channels + 1 logweight)")
    k = rows // (p2 * (c + 1))
    if config is not None and config.get("num_gaussians", k) != k:
        raise ValueError(f"config.json says num_gaussians={config['num_gaussians']} but proj_out_2 holds {k} components")
    for part in ("weight", "bias"):
        key = f"proj_out_2.{part}"
        if key not in state:
            raise ValueError(f"not a GM-DiT v1 checkpoint: missing {key}")
        t = state.pop(key)
        t = t.reshape(p2, k * (c + 1), *t.shape[1:])
        state[f"proj_out_means.{part}"] = t[:, : k * c].reshape(p2 * k * c, *t.shape[2:])
        state[f"proj_out_logweights.{part}"] = t[:, k * c :].reshape(p2 * k, *t.shape[2:])


def _infer(
    state: dict[str, torch.Tensor],
    teacher_class: str,
    teacher: nn.Module,
    policy_type: str | None,
    constant_logstd: float | None = None,
) -> tuple[str, int, int, int]:
    """(policy_type, K or N, logstd_inner_dim, num_logstd_layers) from the tensors."""
    arch = arch_for(teacher_class)
    c, _, p = geometry(teacher_class, teacher.config)
    p2 = p * p
    has_gm = "proj_out_means.weight" in state or "proj_out_logweights.weight" in state
    if policy_type is None:
        policy_type = "GMFlow" if has_gm else "DX"
    if policy_type == "GMFlow":
        missing = [k for k in ("proj_out_means.weight", "proj_out_means.bias", "proj_out_logweights.weight") if k not in state]
        if missing:
            raise ValueError(f"not a GMFlow checkpoint in the official layout: missing {missing}")
        rows = state["proj_out_logweights.weight"].shape[0]
        if rows % p2:
            raise ValueError(
                f"proj_out_logweights.weight has {rows} rows, not a multiple of {p2} pixels per token of {teacher_class}"
            )
        k = rows // p2
        logstd = sorted(
            (int(m.group(1)), t) for key, t in state.items() if (m := re.fullmatch(r"proj_out_logstds\.(\d+)\.weight", key))
        )
        if constant_logstd is not None:
            if logstd:
                raise ValueError(
                    f"config.json sets constant_logstd={constant_logstd} but the weights hold a log-std MLP (proj_out_logstds.*)"
                )
            return policy_type, k, 1024, 2
        if not logstd:
            raise ValueError(
                "GMFlow checkpoint without proj_out_logstds.* and no constant_logstd in its config.json: "
                "the log-std is missing"
            )
        indices = [i for i, _ in logstd]
        if indices != list(range(1, 2 * len(indices), 2)):
            raise ValueError(f"proj_out_logstds layers {indices} are not the (SiLU, Linear) stack 1, 3, 5, ...")
        inner = logstd[0][1].shape[0] if len(logstd) > 1 else 1024
        return policy_type, k, inner, len(logstd)
    key = f"{arch.out_attr}.weight"
    if key not in state:
        raise ValueError(f"not a DX checkpoint in the official layout: missing {key} (the N-times widened output layer)")
    rows = state[key].shape[0]
    if rows % (p2 * c):
        raise ValueError(f"{key} has {rows} rows, not N * {p2 * c} (N grid points of {p2} pixels x {c} channels)")
    return policy_type, rows // (p2 * c), 1024, 2


def load_official_adapter(
    path: str | os.PathLike,
    teacher: nn.Module | None = None,
    *,
    subfolder: str | None = None,
    policy_type: str | None = None,
    lora_scale: float = 1.0,
    copy_teacher: bool = True,
    strict: bool = True,
    return_policy_config: bool = False,
    fuse: bool = False,
    adapter_name: str | None = None,
) -> PiFlowStudent | tuple[PiFlowStudent, dict[str, Any]]:
    """Build a student from a released pi-Flow checkpoint in the official layout (local files only).

    Args:
        path: folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a sharded
            index, or a single ``.safetensors`` file).
        teacher: the base model the adapter was trained on (FLUX.1-dev / Qwen-Image / FLUX.2-dev transformer, ...). May be
            None for a full-model checkpoint (GM-DiT): the DiT is then built from ``config.json``.
        subfolder: e.g. ``"gmflux_k8_piid_4step"``.
        policy_type: "GMFlow" or "DX"; None reads it from the metadata, the class name or the keys.
        lora_scale: multiplies the LoRA update (fused: into the weights; unfused: the adapter's weight, which
            ``student.trunk.set_adapters(name, weights=...)`` changes later).
        copy_teacher: deep-copy the teacher (False: the teacher module becomes the student's trunk).
        strict: raise on keys that map to nothing in the student (False: ignore them).
        return_policy_config: also return the checkpoint's ``policy_config`` metadata (see :func:`read_policy_config`).
        fuse: False (default) keeps the LoRA as a named PEFT adapter on ``student.trunk``, loaded with diffusers'
            ``load_lora_adapter``, as the official pipelines' ``load_lakonlab_adapter`` does; that is what users of
            the official loader expect: they stack other LoRAs with ``set_adapters([...], weights=[...])``, rescale
            or disable it (``disable_adapters`` gives the teacher's trunk back), ``delete_adapters`` it, and load
            it on quantized bases, where fusing is impossible. Needs ``peft``. A trunk without diffusers' PEFT
            support (DiT, UNet2DModel) is fused instead, with a logged warning, and so is a checkpoint without
            LoRA pairs (nothing to keep). True fuses the pairs into the weights (``W += lora_scale * alpha / r * B @ A``):
            no PEFT layers and no run-time cost, but nothing can be undone or rescaled, and plain float weights only.
            To save an unfused student with ``save_pretrained``, fuse it first
            (``student.trunk.fuse_lora(adapter_names=[name]); student.trunk.unload_lora()``).
        adapter_name: the PEFT adapter's name with ``fuse=False`` (default ``"transformer_piflow"``, the official
            pipelines' name); it must not be an adapter the teacher already has.

    Returns:
        the :class:`~piflow_kernels.PiFlowStudent` in eval mode (and the policy config dict if asked).
    """
    if not is_real(lora_scale):
        raise ValueError(f"lora_scale must be a finite float, got {lora_scale!r}")
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be True or False, got {fuse!r}")
    if adapter_name is not None and fuse:
        raise ValueError("adapter_name names the PEFT adapter of fuse=False; a fused LoRA (fuse=True) has no name")
    adapter_name = DEFAULT_ADAPTER_NAME if adapter_name is None else adapter_name
    files, config = _resolve(path, subfolder)
    meta_policy = read_policy_config(path, subfolder)
    class_name = (config or {}).get("_class_name")
    expected_teacher, class_policy = _OFFICIAL_CLASSES.get(class_name, (None, None)) if class_name else (None, None)
    if class_name is not None and expected_teacher is None:
        raise ValueError(
            f"unsupported checkpoint class {class_name!r}; supported official classes: {', '.join(_OFFICIAL_CLASSES)}"
        )
    if teacher is None:
        if class_name not in _FULL_MODEL_CLASSES:
            raise ValueError(
                f"teacher is required: {class_name or 'this checkpoint'} is an adapter holding only the policy head and "
                "LoRA weights; pass the base model it was trained on (e.g. FluxTransformer2DModel.from_pretrained(...))"
            )
        teacher = _dit_teacher_from_config(config)
        copy_teacher = False
    teacher_class = teacher_class_name(teacher)
    if expected_teacher is not None and teacher_class != expected_teacher:
        raise ValueError(f"{class_name} checkpoints are for a {expected_teacher} teacher, got a {teacher_class}")

    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, tensor in load_safetensors(file, "checkpoint weights").items():
            if "lora_magnitude_vector" in key:
                raise ValueError(f"DoRA weights ({key}) are not supported")
            state[_normalise_key(key)] = tensor
    if class_name == _GMDIT_V1 or any(k.startswith("gm_out.") for k in state):
        if teacher_class != "DiTTransformer2DModel":
            raise ValueError(f"GM-DiT v1 weights (gm_out.*) are for a DiTTransformer2DModel teacher, got a {teacher_class}")
        _from_gmdit_v1(state, teacher, config)
    # before the student is built (with copy_teacher=False it takes over the teacher): the adapter's prerequisites
    as_adapter = not fuse and any(_LORA_RE.match(key) for key in state)
    if as_adapter and not _supports_adapters(teacher):
        logger.warning(
            "load_official_adapter: %s has no PEFT adapter support in diffusers, so the LoRA is fused into its weights",
            teacher_class,
        )
        as_adapter = False
    if as_adapter:
        _require_peft()
        _check_adapter_name(teacher, adapter_name)
    else:
        _check_fusable(state, teacher)

    requested = [p for p in (policy_type, class_policy, meta_policy.get("type")) if p is not None]
    if len(set(requested)) > 1:
        raise ValueError(
            f"conflicting policy types: argument {policy_type!r}, class {class_name!r} ({class_policy}), "
            f"metadata {meta_policy.get('type')!r}"
        )
    constant_logstd = (config or {}).get("constant_logstd")
    if constant_logstd is not None and not is_real(constant_logstd):
        raise ValueError(f"config.json: constant_logstd must be a number or null, got {constant_logstd!r}")
    kind, k, inner, layers = _infer(state, teacher_class, teacher, requested[0] if requested else None, constant_logstd)
    if kind != "GMFlow":
        constant_logstd = None
    if config is not None and kind == "GMFlow" and config.get("num_gaussians", k) != k:
        raise ValueError(f"config.json says num_gaussians={config['num_gaussians']} but the weights hold {k} components")

    student = build_student(
        teacher,
        kind,
        num_components=k,
        num_points=k,
        init_noise=0.0,
        logstd_inner_dim=inner,
        num_logstd_layers=layers,
        constant_logstd=constant_logstd,
        copy_teacher=copy_teacher,
        timestep_freq_shift=0.0 if class_name in _FULL_MODEL_CLASSES else None,
    )

    targets = dict(student.named_parameters())
    targets.update(dict(student.named_buffers()))
    loras: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    with torch.no_grad():
        for key, tensor in state.items():
            if m := _LORA_RE.match(key):
                loras.setdefault(m.group("path"), {})[m.group("kind")] = tensor
                continue
            if m := _ALPHA_RE.match(key):
                loras.setdefault(m.group("path"), {})["alpha"] = tensor
                continue
            names = [n for n in _target_keys(key, student) if n in targets]
            if not names:
                unknown.append(key)
                continue
            for name in names:
                target = targets[name]
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"{key}: checkpoint tensor {tuple(tensor.shape)} does not fit the student's {name} "
                        f"{tuple(target.shape)} (a checkpoint for another model size or K/N?)"
                    )
                if type(target) in (torch.Tensor, nn.Parameter):
                    target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                else:  # a quantized base weight (e.g. norm_out): the file's plain weight replaces it
                    owner, _, attr = name.rpartition(".")
                    plain = tensor.to(device=target.device, dtype=target.dtype)
                    setattr(student.get_submodule(owner), attr, nn.Parameter(plain, requires_grad=target.requires_grad))
    if unknown and strict:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise ValueError(f"checkpoint keys with no place in the {teacher_class} student: {shown} (strict=False ignores them)")
    if as_adapter:
        _load_adapter(student, loras, adapter_name, float(lora_scale))
    else:
        for module_path, pair in loras.items():
            for module in _target_modules(module_path, student):
                _fuse_lora(module, module_path, pair, float(lora_scale))
    student.eval()
    if return_policy_config:
        return student, meta_policy
    return student
