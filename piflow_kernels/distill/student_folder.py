"""The usable student a run leaves: the EMA weights as a ``PiFlowStudent.save_pretrained`` folder with its sampling settings.

    >>> state = model_state_dict(trainer.ema.module, ctx)          # the EMA weights (a LoRA student's unmerged)
    >>> write_student_folder(trainer.ema.module, state, "runs/x/students/iter_00000100", sampling, nfe=4)
    >>> student = PiFlowStudent.from_pretrained("runs/x/students/iter_00000100")   # a plain student, LoRA merged

A LoRA student's adapters are merged into the weights they adapt (``W + (alpha / r) B A``, peft's LoRA scaling),
so the folder loads into a plain :class:`~piflow_kernels.PiFlowStudent` with no ``peft`` involved; the tied teacher's
output layer is left out. The folder is written beside its final name and renamed into place, so a folder that
exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["merged_state_dict", "write_student_folder", "prune_student_folders"]

WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' own weights file name


def _lora_scalings(module: nn.Module) -> dict[str, float]:
    """{module prefix in ``module``'s state dict: LoRA scaling} for every peft LoRA layer under ``module``."""
    out = {}
    for name, m in module.named_modules():
        scaling = getattr(m, "scaling", None)
        if isinstance(scaling, dict) and hasattr(m, "base_layer"):
            if len(scaling) != 1:
                raise ValueError(f"{name} carries {len(scaling)} adapters ({sorted(scaling)}); a student folder merges one")
            out[name] = float(next(iter(scaling.values())))
    return out


def merged_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a state dict of ``module``) with every LoRA layer merged and renamed as the plain layer's.

    ``<p>.base_layer.weight`` + ``scaling * <p>.lora_B.<a>.weight @ <p>.lora_A.<a>.weight`` becomes ``<p>.weight``
    (computed in float32, stored in the base weight's dtype), ``<p>.base_layer.bias`` becomes ``<p>.bias``; the tied
    teacher's ``teacher_modules.*`` are dropped.
    """
    scalings = _lora_scalings(module)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for prefix, scaling in scalings.items():
        base = state[f"{prefix}.base_layer.weight"]
        a = [k for k in state if k.startswith(f"{prefix}.lora_A.") and k.endswith(".weight")]
        b = [k for k in state if k.startswith(f"{prefix}.lora_B.") and k.endswith(".weight")]
        if len(a) != 1 or len(b) != 1:
            raise ValueError(f"{prefix}: expected one lora_A and one lora_B weight, found {a + b}")
        delta = scaling * (state[b[0]].float() @ state[a[0]].float())
        out[f"{prefix}.weight"] = (base.float() + delta).to(base.dtype)
        used.update({f"{prefix}.base_layer.weight", a[0], b[0]})
        if f"{prefix}.base_layer.bias" in state:
            out[f"{prefix}.bias"] = state[f"{prefix}.base_layer.bias"]
            used.add(f"{prefix}.base_layer.bias")
    for key, value in state.items():
        if key in used or key.startswith("teacher_modules."):
            continue
        if ".lora_" in key or ".base_layer." in key:
            raise ValueError(f"{key}: a LoRA weight outside the layers peft reports")
        out[key] = value
    return out


def write_student_folder(
    student: nn.Module,
    state: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    sampling: dict[str, Any] | None = None,
    num_inference_steps: int | None = None,
    max_shard_size: str = "10GB",
) -> Path:
    """Write ``state`` (the weights of ``student``, a :class:`~piflow_kernels.PiFlowStudent`) as a folder that
    ``PiFlowStudent.from_pretrained`` loads, recording ``sampling`` (PiFlowScheduler settings) and
    ``num_inference_steps`` in its config; LoRA merged (:func:`merged_state_dict`). Replaces an existing folder."""
    from huggingface_hub import save_torch_state_dict

    from piflow_kernels.students import PiFlowStudent, _check_sampling

    if not isinstance(student, PiFlowStudent):
        raise TypeError(f"student must be a PiFlowStudent, got {type(student).__name__}")
    folder = Path(folder)
    config = {k: v for k, v in dict(student.config).items() if not k.startswith("_")}
    if sampling is not None:
        config["sampling"] = _check_sampling(sampling, student.policy_type)
    if num_inference_steps is not None:
        config["num_inference_steps"] = int(num_inference_steps)
    weights = {k: v.contiguous() for k, v in merged_state_dict(student, state).items()}
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # the config as diffusers' save_config writes it: the class name and version beside the registered keys
    import diffusers

    doc = {"_class_name": type(student).__name__, "_diffusers_version": diffusers.__version__, **config}
    (tmp / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_torch_state_dict(weights, tmp, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def prune_student_folders(root: str | os.PathLike, keep: int) -> None:
    """Keep the ``keep`` newest ``iter_*`` folders under ``root`` (by iteration), remove the others."""
    root = Path(root)
    if not root.is_dir():
        return
    found = sorted((int(p.name[5:]), p) for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    for _, path in found[:-keep] if keep > 0 else found:
        shutil.rmtree(path, ignore_errors=True)
