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
from piflow_kernels.distill.teachers import CFGTeacher, DiffusersTeacher, ExactGMTeacher, GaussianMixtureData, TiedTeacher
from piflow_kernels.files import read_json

__all__ = [
    "NullClassLabels",
    "build_teacher",
    "build_training_student",
    "embedded_guidance",
    "guided_teacher",
    "teacher_conventions",
    "tied_teacher",
]


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


def teacher_conventions(cfg: TrainConfig, teacher_class: str) -> tuple[str, float, bool]:
    """(prediction type, timestep divisor, flip) of the teacher: what :class:`DiffusersTeacher` takes.

    ``teacher.timestep_convention`` "auto" is "sigma" for FLUX / Qwen-Image (their transformers take sigma) and
    "timestep" (``sigma * num_train_timesteps``) for the others; ``teacher.prediction_type`` "auto" is "velocity".
    """
    from piflow_kernels.layouts import ARCHS

    t = cfg.teacher
    convention = t.timestep_convention
    if convention == "auto":
        arch = ARCHS.get(teacher_class)
        convention = "sigma" if arch is not None and arch.timestep_divisor != 1.0 else "timestep"
    divisor = float(cfg.piid.num_train_timesteps) if convention == "sigma" else 1.0
    prediction = "velocity" if t.prediction_type == "auto" else t.prediction_type
    return prediction, divisor, convention == "reversed"


def embedded_guidance(cfg: TrainConfig, model: nn.Module) -> float | None:
    """The guidance value a guidance-distilled teacher takes as an input, None for a model without that input.

    A model with ``guidance_embeds`` (FLUX.1-dev, FLUX.2) takes ``teacher.embedded_guidance`` (0: the official
    recipes' value, :data:`DEFAULT_EMBEDDED_GUIDANCE`); a value set for a model without it is a :class:`ConfigError`.
    """
    g = cfg.teacher.embedded_guidance
    takes = bool(getattr(getattr(model, "config", None), "guidance_embeds", False))
    if not takes:
        if g:
            raise ConfigError(
                f"config key teacher.embedded_guidance = {g}: the {type(model).__name__} teacher has no guidance input "
                "(guidance_embeds is off); use teacher.guidance_scale for classifier-free guidance"
            )
        return None
    return g or DEFAULT_EMBEDDED_GUIDANCE.get(type(model).__name__, DEFAULT_EMBEDDED_GUIDANCE["FluxTransformer2DModel"])


#: the distilled guidance of the official recipes: pi-FLUX.1 3.5, pi-FLUX.2 4.0
DEFAULT_EMBEDDED_GUIDANCE = {"FluxTransformer2DModel": 3.5, "Flux2Transformer2DModel": 4.0}


def guided_teacher(cfg: TrainConfig, inner: Any) -> nn.Module | Any:
    """``inner`` (a velocity teacher) with the classifier-free guidance of ``[teacher]``, if any.

    Class-conditional teachers guide against the null class ``data.num_classes``; text teachers (a prompt cache)
    against the cached negative prompt embeddings, passed as ``negative_<argument>`` keywords.
    """
    t, d = cfg.teacher, cfg.data
    if t.guidance_scale == 1.0:
        return inner
    interval = tuple(t.guidance_interval) if t.guidance_interval else None
    common = {"interval_unit": "timestep", "num_train_timesteps": cfg.piid.num_train_timesteps,
              "orthogonal_guidance": t.orthogonal_guidance}  # fmt: skip
    if d.prompt_cache:
        return CFGTeacher(inner, t.guidance_scale, interval, negative_prefix=NEGATIVE_PREFIX, **common)
    return CFGTeacher(NullClassLabels(inner, d.num_classes), t.guidance_scale, interval,
                      uncond_kwargs={"class_labels": None}, **common)  # fmt: skip


NEGATIVE_PREFIX = "negative_"


def build_teacher(cfg: TrainConfig) -> tuple[nn.Module, nn.Module | None, GaussianMixtureData | None]:
    """Teacher from ``cfg.teacher``: (teacher callable, the raw diffusers model or None, exact data or None).

    The exact teacher's data doubles as the data source and the evaluation reference. A diffusers teacher is
    called as its pipeline calls it (:class:`DiffusersTeacher` with its class), in its own prediction type and
    timestep convention (:func:`teacher_conventions`), guided as ``[teacher]`` says (:func:`guided_teacher`).
    """
    t, d = cfg.teacher, cfg.data
    if t.kind == "exact":
        data = exact_mixture(cfg)
        return ExactGMTeacher(data, num_train_timesteps=cfg.piid.num_train_timesteps), None, data
    from piflow_kernels.layouts import ARCHS

    model = _diffusers_model(cfg)
    name = type(model).__name__
    prediction, divisor, flip = teacher_conventions(cfg, name)
    teacher: nn.Module = DiffusersTeacher(
        model, prediction, num_train_timesteps=cfg.piid.num_train_timesteps, timestep_divisor=divisor,
        flip_timesteps=flip, teacher_class=name if name in ARCHS else None,
    )  # fmt: skip
    data = exact_mixture(cfg) if (d.mode == "data_dependent" and d.source == "exact") else None
    return guided_teacher(cfg, teacher), model, data


def tied_teacher(cfg: TrainConfig, student: Any) -> Any:
    """The teacher of a LoRA student with ``student.tie_teacher``: the student (or its DDP / FSDP wrapper) run with
    ``as_teacher=True``, converted and guided as :func:`build_teacher` does."""
    t = cfg.teacher
    prediction = "velocity" if t.prediction_type == "auto" else t.prediction_type
    return guided_teacher(cfg, TiedTeacher(student, prediction, cfg.piid.num_train_timesteps))


def build_training_student(cfg: TrainConfig, teacher_model: nn.Module | None) -> nn.Module:
    """Student from ``cfg.student``, initialised from ``cfg.seed`` (identical on every rank).

    ``kind = "toy"``: a ToyGMStudent / ToyDXStudent of the latent shape; ``kind = "diffusers"``:
    :func:`piflow_kernels.build_student` on ``teacher_model`` (or ``PiFlowStudent.from_pretrained(init_from)``),
    in ``teacher.timestep_convention``. With ``student.lora_rank`` > 0, LoRA adapters on the trunk
    (:func:`~piflow_kernels.distill.lora.add_lora`); with ``student.tie_teacher`` too, the trunk *is*
    ``teacher_model`` (not a copy) and the student keeps the teacher's output layer (``as_teacher=True``, see
    :func:`tied_teacher`). The trained parameters are cast to ``student.trainable_dtype``.
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
        from piflow_kernels.layouts import arch_for

        tie = s.lora_rank > 0 and s.tie_teacher
        if s.init_from:
            student = students.PiFlowStudent.from_pretrained(s.init_from)
        else:
            extra = dict(s.kwargs)
            if policy_type == "GMFlow":
                extra.setdefault("num_components", s.num_components)
            else:
                extra.setdefault("num_points", s.num_points)
            divisor = _student_timestep_divisor(cfg)
            if divisor is not None:
                extra.setdefault("timestep_divisor", divisor)
            out_layer = getattr(teacher_model, arch_for(type(teacher_model).__name__).out_attr) if tie else None
            student = students.build_student(teacher_model, policy_type=policy_type, copy_teacher=not tie, **extra)
            if tie:
                student.attach_teacher_head(out_layer)
        if s.lora_rank > 0:
            from piflow_kernels.distill.lora import add_lora

            add_lora(student, s.lora_rank, s.lora_alpha, s.lora_dropout, s.lora_target_modules, s.train_modules)
        else:
            student.requires_grad_(True)  # the trunk is a copy of the frozen teacher
        dtype = getattr(torch, s.trainable_dtype)
        for p in student.parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)  # in place: the optimizer and EMA see the trained dtype
        if s.gradient_checkpointing:
            student.trunk.enable_gradient_checkpointing()
    return student


def _student_timestep_divisor(cfg: TrainConfig) -> float | None:
    """The student's trunk timestep divisor for ``teacher.timestep_convention`` (None: the architecture's own)."""
    convention = cfg.teacher.timestep_convention
    if convention == "auto":
        return None
    if convention == "reversed":
        raise ConfigError(
            "config key teacher.timestep_convention = 'reversed' cannot be used with a diffusers student: the student "
            "takes sigma * num_train_timesteps, divided by a constant"
        )
    return float(cfg.piid.num_train_timesteps) if convention == "sigma" else 1.0
