"""The LoRA pairs of the official pi-Flow adapters: where they apply, fused into the weights, or loaded as a named
PEFT adapter (see :func:`piflow_kernels.official_weights.load_official_adapter`).

Official keys map onto the student by :func:`_target_keys` (the policy head, the trunk, GM-DiT's shared
``emb``). A pair ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (``lora_down``/``lora_up`` too, with
an optional ``<module>.alpha``) is either fused, ``W += scale * alpha / r * B @ A`` (:func:`_fuse_lora`), or
handed to diffusers' ``load_lora_adapter`` on the student's trunk with its ranks and alphas as the adapter's
config (:func:`_load_adapter`).
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

import torch
from torch import nn

from piflow_kernels.layouts import arch_for
from piflow_kernels.students import PiFlowStudent

_LORA_RE = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
_ALPHA_RE = re.compile(r"^(?P<path>.+)\.alpha$")


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
