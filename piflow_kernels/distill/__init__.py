"""pi-ID distillation: the loss (data-dependent and data-free), teachers and toy students.

    >>> from piflow_kernels.distill import PiIDConfig, ExactGMTeacher, GaussianMixtureData, piid_loss_data_dependent
    >>> teacher = ExactGMTeacher(GaussianMixtureData.random((4, 8, 8), num_components=8))
    >>> loss, logs = piid_loss_data_dependent(student, teacher, x0, PiIDConfig(nfe=2), iteration=0)

``TrainConfig`` and ``Trainer`` are imported lazily from the trainer modules, on first access.
"""

from __future__ import annotations

import importlib

from piflow_kernels.distill.piid import (
    PiIDConfig,
    SegmentDraws,
    draw_segment,
    piid_data_free_segments,
    piid_loss_data_dependent,
    piid_segment_loss,
    piid_segment_loss_from_draws,
    policy_mean_velocity,
    sample_segment_start,
    segment_window,
    student_policy,
    teacher_ratio,
)
from piflow_kernels.distill.teachers import CFGTeacher, DiffusersTeacher, ExactGMTeacher, GaussianMixtureData, as_velocity
from piflow_kernels.distill.toy import ToyDXStudent, ToyGMStudent, sinusoidal_embedding

# public name -> candidate modules (first that defines it wins), imported on first access
_LAZY = {
    "TrainConfig": ("piflow_kernels.distill.config", "piflow_kernels.distill.trainer"),
    "Trainer": ("piflow_kernels.distill.trainer",),
}


def __getattr__(name: str):
    if name in _LAZY:
        errors = []
        for module_name in _LAZY[name]:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name != module_name:  # the module exists but one of its imports is missing
                    raise
                errors.append(module_name)
                continue
            if hasattr(module, name):
                value = getattr(module, name)
                globals()[name] = value
                return value
            errors.append(module_name)
        raise AttributeError(f"piflow_kernels.distill.{name} is not available (looked in {', '.join(errors)})")
    raise AttributeError(f"module 'piflow_kernels.distill' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "PiIDConfig",
    "SegmentDraws",
    "teacher_ratio",
    "sample_segment_start",
    "segment_window",
    "draw_segment",
    "student_policy",
    "policy_mean_velocity",
    "piid_segment_loss",
    "piid_segment_loss_from_draws",
    "piid_loss_data_dependent",
    "piid_data_free_segments",
    "GaussianMixtureData",
    "ExactGMTeacher",
    "CFGTeacher",
    "DiffusersTeacher",
    "as_velocity",
    "ToyGMStudent",
    "ToyDXStudent",
    "sinusoidal_embedding",
]  # the lazy names stay out of __all__ so that a star import never fails before the trainer lands
