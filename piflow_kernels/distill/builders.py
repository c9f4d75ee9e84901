"""Builders of the trainer's models from a :class:`TrainConfig`: the teacher (``[teacher]``) and the student (``[student]``).

    >>> teacher, teacher_model, exact_data = build_teacher(cfg)
    >>> student = build_training_student(cfg, teacher_model)

``build_training_student`` wraps :func:`piflow_kernels.build_student` (students of diffusers teachers)
and the toy students; it is named apart so that it never shadows the public ``pk.build_student``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from piflow_kernels.distill.config import ConfigError, TrainConfig
from piflow_kernels.distill.data import exact_mixture
from piflow_kernels.distill.teachers import CFGTeacher, DiffusersTeacher, ExactGMTeacher, GaussianMixtureData
from piflow_kernels.files import read_json

__all__ = ["NullClassLabels", "build_teacher", "build_training_student"]


class NullClassLabels(nn.Module):
    """Teacher wrapper mapping ``class_labels=None`` (the CFG unconditional branch) to the null class."""

    def __init__(self, teacher: nn.Module, null_class: int) -> None:
        super().__init__()
        self.teacher = teacher
        self.null_class = int(null_class)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None, **kw: Any):
        """x_t (B, C, H, W), timestep (B,), class_labels (B,) or None -> the teacher's velocity (B, C, H, W)."""
        if class_labels is None:
            class_labels = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long, device=x_t.device)
        return self.teacher(x_t, timestep, class_labels=class_labels, **kw)


def _sample_size(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


_MODEL_SUBFOLDERS = ("transformer", "unet")  # where a pipeline folder keeps its denoiser, tried in order


def teacher_folder(cfg: TrainConfig) -> Path:
    """The folder of the teacher's weights: ``teacher.pretrained``, or its ``subfolder`` (named, or the pipeline's
    ``transformer`` / ``unet`` when ``pretrained`` is a pipeline folder with a ``model_index.json``)."""
    t = cfg.teacher
    root = Path(t.pretrained)
    if not root.is_dir():
        raise ConfigError(f"config key teacher.pretrained: {t.pretrained!r} is not a folder")
    if t.subfolder:
        folder = root / t.subfolder
        if not (folder / "config.json").is_file():
            raise ConfigError(f"config key teacher.subfolder: {folder} has no config.json")
        return folder
    if (root / "config.json").is_file():
        return root
    if (root / "model_index.json").is_file():
        for name in _MODEL_SUBFOLDERS:
            if (root / name / "config.json").is_file():
                return root / name
        raise ConfigError(
            f"config key teacher.pretrained: the pipeline folder {root} has no {' or '.join(_MODEL_SUBFOLDERS)} "
            "subfolder with a config.json; name it with teacher.subfolder"
        )
    raise ConfigError(f"config key teacher.pretrained: {root} has neither a config.json nor a model_index.json")


def teacher_class_of(cfg: TrainConfig) -> str:
    """The teacher's diffusers class: the ``_class_name`` of its ``config.json`` (checked against
    ``teacher.model_class`` when both are given), ``teacher.model_class`` for a ``model`` dict (default DiT)."""
    t = cfg.teacher
    if not t.pretrained:
        return t.model_class or "DiTTransformer2DModel"
    folder = teacher_folder(cfg)
    saved = read_json(folder / "config.json", "teacher config").get("_class_name")
    if not isinstance(saved, str):
        if not t.model_class:
            raise ConfigError(f"config key teacher.model_class: {folder / 'config.json'} names no _class_name; give the class")
        return t.model_class
    if t.model_class and t.model_class != saved:
        raise ConfigError(f"config key teacher.model_class = {t.model_class!r} but {folder / 'config.json'} holds a {saved!r}")
    return saved


def _diffusers_model(cfg: TrainConfig) -> nn.Module:
    """The teacher's diffusers model, randomly initialised from ``teacher.seed`` or loaded from ``teacher.pretrained``,
    its weights in ``teacher.dtype``."""
    t, d = cfg.teacher, cfg.data
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - diffusers is a dependency
        raise ImportError("teacher.kind = 'diffusers' needs the diffusers package") from err
    name = teacher_class_of(cfg)
    model_cls = getattr(diffusers, name, None)
    if model_cls is None or not isinstance(model_cls, type):
        raise ConfigError(f"config key teacher.model_class: diffusers has no model class {name!r}")
    dtype = getattr(torch, t.dtype)
    if t.pretrained:
        model = model_cls.from_pretrained(teacher_folder(cfg), local_files_only=True, torch_dtype=dtype)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            try:
                model = model_cls(**t.model)
            except TypeError as err:
                raise ConfigError(f"config key teacher.model: {name}(**model) failed: {err}") from None
        model = model.to(dtype)
    conf = getattr(model, "config", None)
    if conf is not None:
        in_ch = _latent_channels(name, conf)
        if in_ch is not None and in_ch != d.channels:
            raise ConfigError(f"config key data.channels = {d.channels} but the teacher takes {in_ch} latent channels")
        size = getattr(conf, "sample_size", None)
        if size is not None and name in _FIXED_SIZE and _sample_size(size) != (d.height, d.width):
            raise ConfigError(
                f"config keys data.height, data.width = ({d.height}, {d.width}) but the teacher's sample_size is {size}"
            )
    return model.eval().requires_grad_(False)


# teachers whose sample_size fixes the latent size (the others take any size that is a multiple of the patch)
_FIXED_SIZE = ("UNet2DModel", "DiTTransformer2DModel")


def _latent_channels(name: str, conf: Any) -> int | None:
    """Latent channels per pixel the teacher takes (FLUX / Qwen-Image pack 2x2 pixels into a token)."""
    from piflow_kernels.layouts import ARCHS, geometry

    if name not in ARCHS:
        return getattr(conf, "in_channels", None)
    return geometry(name, conf)[0]


def build_teacher(cfg: TrainConfig) -> tuple[nn.Module, nn.Module | None, GaussianMixtureData | None]:
    """Teacher from ``cfg.teacher``: (teacher callable, the raw diffusers model or None, exact data or None).

    The exact teacher's data doubles as the data source and the evaluation reference.
    """
    t, d = cfg.teacher, cfg.data
    if t.kind == "exact":
        data = exact_mixture(cfg)
        return ExactGMTeacher(data, num_train_timesteps=cfg.piid.num_train_timesteps), None, data
    model = _diffusers_model(cfg)
    teacher: nn.Module = DiffusersTeacher(model, num_train_timesteps=cfg.piid.num_train_timesteps)
    if t.guidance_scale != 1.0:
        teacher = CFGTeacher(
            NullClassLabels(teacher, d.num_classes),
            t.guidance_scale,
            tuple(t.guidance_interval) if t.guidance_interval else None,
            interval_unit="timestep",
            num_train_timesteps=cfg.piid.num_train_timesteps,
            uncond_kwargs={"class_labels": None},
        )
    data = exact_mixture(cfg) if (d.mode == "data_dependent" and d.source == "exact") else None
    return teacher, model, data


def build_training_student(cfg: TrainConfig, teacher_model: nn.Module | None) -> nn.Module:
    """Student from ``cfg.student``, initialised from ``cfg.seed`` (identical on every rank).

    ``kind = "toy"``: a ToyGMStudent / ToyDXStudent of the latent shape; ``kind = "diffusers"``:
    :func:`piflow_kernels.build_student` on ``teacher_model`` (or ``PiFlowStudent.from_pretrained(init_from)``).
    """
    s, d = cfg.student, cfg.data
    policy_type = cfg.piid.policy_type
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if s.kind == "toy":
            from piflow_kernels.distill.toy import ToyDXStudent, ToyGMStudent

            common = {"hidden": s.hidden, "num_train_timesteps": cfg.piid.num_train_timesteps}
            if policy_type == "GMFlow":
                return ToyGMStudent(d.channels, d.height, d.width, num_components=s.num_components, **common)
            return ToyDXStudent(d.channels, d.height, d.width, num_points=s.num_points, **common)
        from piflow_kernels import students

        if s.init_from:
            student = students.PiFlowStudent.from_pretrained(s.init_from)
        else:
            extra = dict(s.kwargs)
            if policy_type == "GMFlow":
                extra.setdefault("num_components", s.num_components)
            else:
                extra.setdefault("num_points", s.num_points)
            student = students.build_student(teacher_model, policy_type=policy_type, **extra)
        student.requires_grad_(True)  # the trunk is a copy of the frozen teacher
    return student
