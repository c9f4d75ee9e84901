"""Load the released pi-Flow weights (official adapter layout) into :class:`~piflow_kernels.PiFlowStudent`.

The official releases are diffusers-style folders: ``config.json`` (``_class_name`` such as
``GMFluxTransformer2DModel``) and ``diffusion_pytorch_model.safetensors`` whose metadata carries
``policy_config`` (JSON: the policy type and its options). Two kinds:

- adapters (pi-FLUX.1, pi-Qwen-Image: ``gmflux_k8_piid_4step``, ``dxflux_n10_piid_4step``,
  ``gmqwen_k8_piid_4step``, ...): the policy head (``proj_out_means``, ``proj_out_logweights``,
  ``proj_out_logstds.{1,3}`` for GMFlow; the widened ``proj_out`` for DX), ``norm_out.*``, and PEFT
  LoRA pairs ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` on the base model's layers. The
  base model (the teacher) must be given.
- full models (GM-DiT ImageNet, ``GMDiTTransformer2DModelV2``): every weight; the DiT teacher is
  built from ``config.json`` when none is given. Its time/class embedding ``emb.*`` is shared by all
  blocks (diffusers' DiT keeps one copy per block, so it is copied into each) and its sinusoidal
  timestep embedding has frequency shift 0 (diffusers' DiT: 1), which the student records.

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

import collections
import inspect
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from piflow_kernels.checks import is_real
from piflow_kernels.files import DamagedFileError, load_safetensors, read_json, safetensors_metadata
from piflow_kernels.layouts import arch_for, geometry, teacher_class_name
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
    "GMDiTTransformer2DModelV2": ("DiTTransformer2DModel", "GMFlow"),
}
_FULL_MODEL_CLASSES = ("GMDiTTransformer2DModelV2",)
_LORA_RE = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
_ALPHA_RE = re.compile(r"^(?P<path>.+)\.alpha$")
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


def _infer(
    state: dict[str, torch.Tensor], teacher_class: str, teacher: nn.Module, policy_type: str | None
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
        if not logstd:
            raise ValueError("GMFlow checkpoint without proj_out_logstds.*: constant log-std students are not supported")
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


def _target_keys(key: str, student: PiFlowStudent) -> list[str]:
    """Student state-dict keys an official key maps to."""
    out_attr = arch_for(student.teacher_class).out_attr
    head = f"trunk.{out_attr}"
    if key.startswith("proj_out_means."):
        return [f"{head}.means.{key.split('.', 1)[1]}"]
    if key.startswith("proj_out_logweights."):
        return [f"{head}.logweights.{key.split('.', 1)[1]}"]
    if key.startswith("proj_out_logstds."):
        return [key]
    if student.policy_type == "DX" and key.startswith(f"{out_attr}."):
        return [f"{head}.grid.{key.split('.', 1)[1]}"]
    if student.teacher_class == "DiTTransformer2DModel" and key.startswith("emb."):
        n = len(student.trunk.transformer_blocks)
        return [f"trunk.transformer_blocks.{i}.norm1.{key}" for i in range(n)]
    return [f"trunk.{key}"]


def _target_modules(path: str, student: PiFlowStudent) -> list[nn.Module]:
    """The student's layers a LoRA on the official module ``path`` applies to (several for GM-DiT's shared ``emb``)."""
    modules = []
    for key in _target_keys(f"{path}.weight", student):
        module_path = key[: -len(".weight")]
        try:
            module = student.get_submodule(module_path)
        except AttributeError as err:
            raise ValueError(f"LoRA weights for {path!r}, but the student has no module {module_path!r}") from err
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"LoRA weights for {path!r}: {module_path} is a {type(module).__name__}, not Linear/Conv2d")
        modules.append(module)
    return modules


def _lora_factors(path: str, pair: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(down, up, rank, alpha) of one LoRA pair, with the file's ``.alpha`` or alpha = rank."""
    down = pair.get("lora_A", pair.get("lora_down"))
    up = pair.get("lora_B", pair.get("lora_up"))
    if down is None or up is None:
        raise ValueError(f"LoRA for {path!r} needs both lora_A (down) and lora_B (up) weights, got {sorted(pair)}")
    rank = down.shape[0]
    if up.dim() < 2 or up.shape[1] != rank:
        raise ValueError(f"LoRA for {path!r}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} ranks differ")
    alpha = float(pair["alpha"]) if "alpha" in pair else float(rank)
    return down, up, rank, alpha


def _is_plain(weight: torch.Tensor) -> bool:
    """False for quantized / tensor-subclass weights (TorchAO, bitsandbytes, ...), which cannot be added to."""
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point()


@torch.no_grad()
def _fuse_lora(module: nn.Module, path: str, pair: dict[str, torch.Tensor], scale: float) -> None:
    down, up, rank, alpha = _lora_factors(path, pair)
    delta = up.flatten(1).double() @ down.flatten(1).double() * (scale * alpha / rank)
    weight = module.weight
    if delta.numel() != weight.numel() or delta.shape[0] != weight.shape[0]:
        raise ValueError(f"LoRA for {path!r}: lora_B @ lora_A is {tuple(delta.shape)} but the weight is {tuple(weight.shape)}")
    if not _is_plain(weight):
        raise ValueError(
            f"LoRA for {path!r}: cannot fuse into a {type(weight).__name__} weight of dtype {weight.dtype} (a quantized "
            "base?); load it as a PEFT adapter with fuse=False"
        )
    weight.add_(delta.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))


def _check_fusable(state: dict[str, torch.Tensor], teacher: nn.Module) -> None:
    """Refuse to fuse into quantized base weights before the student takes over the teacher."""
    for key in state:
        if (m := _LORA_RE.match(key)) is None:
            continue
        try:
            weight = teacher.get_submodule(m.group("path")).weight
        except AttributeError:
            continue  # head layers, missing modules: checked once the student is built
        if isinstance(weight, torch.Tensor) and not _is_plain(weight):
            raise ValueError(
                f"LoRA for {m.group('path')!r}: cannot fuse into a {type(weight).__name__} weight of dtype {weight.dtype} "
                "(a quantized base?); load it as a PEFT adapter with fuse=False"
            )


def _supports_adapters(trunk: nn.Module) -> bool:
    from diffusers.loaders.peft import PeftAdapterMixin

    return isinstance(trunk, PeftAdapterMixin)


# load_lora_adapter takes the adapter config (``metadata``) from diffusers 0.34; PEFT anchors "^" patterns from 0.15
_MIN_DIFFUSERS_FOR_ADAPTERS = "0.34"
_MIN_PEFT = "0.15"


def _require_peft() -> None:
    import diffusers
    from packaging.version import Version  # a dependency of diffusers

    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "load_official_adapter(..., fuse=False) keeps the LoRA as a PEFT adapter and needs the peft package: "
            f"pip install peft ({_MIN_PEFT} or newer), or pass fuse=True to fuse the LoRA into the weights"
        ) from err
    if Version(peft.__version__) < Version(_MIN_PEFT) or Version(diffusers.__version__) < Version(_MIN_DIFFUSERS_FOR_ADAPTERS):
        raise ImportError(
            f"load_official_adapter(..., fuse=False) needs peft>={_MIN_PEFT} and diffusers>={_MIN_DIFFUSERS_FOR_ADAPTERS} "
            f"(found peft {peft.__version__}, diffusers {diffusers.__version__}): "
            f"pip install -U 'peft>={_MIN_PEFT}' 'diffusers>={_MIN_DIFFUSERS_FOR_ADAPTERS}', or pass fuse=True"
        )
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:  # diffusers decides this at import time from the peft and transformers versions
        raise ImportError(
            "diffusers' PEFT backend is off (transformers too old, or peft installed after diffusers was imported): "
            "pip install -U peft transformers and restart, or pass fuse=True"
        )


def _adapter_names(trunk: nn.Module) -> set[str]:
    return set(getattr(trunk, "peft_config", None) or {})


def _check_adapter_name(trunk: nn.Module, adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    if adapter_name in _adapter_names(trunk):
        raise ValueError(
            f"adapter_name {adapter_name!r} is already an adapter of the {type(trunk).__name__} "
            f"(adapters: {sorted(_adapter_names(trunk))}): pass another adapter_name, or delete_adapters({adapter_name!r}) first"
        )


def _base_layer(module: nn.Module) -> nn.Module:
    """The layer a PEFT wrapper (from an adapter the teacher already carries) wraps, else the module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _adapter_state(
    loras: dict[str, dict[str, torch.Tensor]], student: PiFlowStudent
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """The LoRA pairs as a PEFT state dict relative to ``student.trunk`` (``<module>.lora_A.weight`` /
    ``<module>.lora_B.weight``), checked against the layers they wrap; and each module's rank and alpha."""
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, pair in loras.items():
        down, up, rank, alpha = _lora_factors(path, pair)
        keys = _target_keys(f"{path}.weight", student)
        if len(keys) != 1 or not keys[0].startswith("trunk."):
            raise ValueError(
                f"LoRA weights for {path!r} apply to {[k[: -len('.weight')] for k in keys]}, which a PEFT adapter on the "
                "student's trunk cannot hold: load with fuse=True"
            )
        module_path = keys[0][len("trunk.") : -len(".weight")]
        try:
            module = _base_layer(student.trunk.get_submodule(module_path))
        except AttributeError as err:
            raise ValueError(f"LoRA weights for {path!r}, but the student has no module 'trunk.{module_path}'") from err
        if isinstance(module, nn.Linear):
            want_down, want_up = (rank, module.in_features), (module.out_features, rank)
        elif isinstance(module, nn.Conv2d):  # PEFT's Conv2d LoRA: A is a conv like the layer, B a 1x1 conv
            want_down = (rank, module.in_channels // module.groups, *module.kernel_size)
            want_up = (module.out_channels, rank, 1, 1)
        else:
            raise ValueError(f"LoRA weights for {path!r}: trunk.{module_path} is a {type(module).__name__}, not Linear/Conv2d")
        if down.numel() != math.prod(want_down) or up.numel() != math.prod(want_up) or up.shape[0] != want_up[0]:
            raise ValueError(
                f"LoRA for {path!r}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not fit trunk.{module_path} "
                f"(lora_A {want_down}, lora_B {want_up}: a checkpoint for another model size?)"
            )
        weight = module.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        # PEFT keeps the LoRA factors in the layer's dtype, as the official loader (which casts the file to it)
        state[f"{module_path}.lora_A.weight"] = down.reshape(want_down).to(device=weight.device, dtype=dtype)
        state[f"{module_path}.lora_B.weight"] = up.reshape(want_up).to(device=weight.device, dtype=dtype)
        ranks[module_path], alphas[module_path] = rank, alpha
    return state, ranks, alphas


def _lora_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` arguments for these modules (the most common rank / alpha, patterns for the others).

    diffusers' ``load_lora_adapter`` only takes ``network_alphas`` together with a key prefix, so the alphas
    travel as the adapter's config (its ``metadata`` argument, as saved by ``save_lora_adapter``); the
    patterns are anchored full module paths, as diffusers writes them."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {f"^{re.escape(m)}": v for m, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(m)}": v for m, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
    }


def _load_adapter(student: PiFlowStudent, loras: dict[str, dict[str, torch.Tensor]], adapter_name: str, scale: float) -> None:
    state, ranks, alphas = _adapter_state(loras, student)
    trunk = student.trunk
    trunk.load_lora_adapter(state, prefix=None, adapter_name=adapter_name, metadata=_lora_config(ranks, alphas))
    missing = [m for m in ranks if adapter_name not in getattr(trunk.get_submodule(m), "lora_A", {})]
    if missing:
        trunk.delete_adapters(adapter_name)
        raise ValueError(f"PEFT did not wrap {missing} with the adapter {adapter_name!r}")
    # as after diffusers' load_lora_adapter, the new adapter is the only active one; its weight is lora_scale
    trunk.set_adapters(adapter_name, weights=scale)


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
        teacher: the base model the adapter was trained on (FLUX.1-dev / Qwen-Image transformer, ...). May be
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
    if any(k.startswith("gm_out.") for k in state):
        raise ValueError("GM-DiT v1 checkpoints (gm_out.*) are not supported; the v2 layout has proj_out_means/logweights")
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
    kind, k, inner, layers = _infer(state, teacher_class, teacher, requested[0] if requested else None)
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
