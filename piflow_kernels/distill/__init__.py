"""pi-ID distillation: the loss (data-dependent and data-free), teachers, toy students and the trainer.

    >>> from piflow_kernels.distill import PiIDConfig, ExactGMTeacher, GaussianMixtureData, piid_loss_data_dependent
    >>> teacher = ExactGMTeacher(GaussianMixtureData.random((4, 8, 8), num_components=8))
    >>> loss, logs = piid_loss_data_dependent(student, teacher, x0, PiIDConfig(nfe=2), iteration=0)
    >>> Trainer(TrainConfig.from_file("examples/distill_exact_teacher.toml")).train()

Modules, one concern each: ``piid`` (the loss), ``teachers``, ``toy`` (students), ``config``
(TrainConfig), ``trainer`` (the loop) and its components ``builders``, ``data``, ``seeding``,
``optim``, ``lr_scheduler``, ``ema``, ``ddp``, ``run_log``, ``checkpoint``, ``evaluation`` and
``metrics`` (sample-based distances).
"""

from __future__ import annotations

from piflow_kernels.distill import piid
from piflow_kernels.distill.config import TrainConfig
from piflow_kernels.distill.data import ExactDataSource, TensorDataSource
from piflow_kernels.distill.metrics import energy_distance, knn_precision_recall, sliced_w2
from piflow_kernels.distill.piid import *  # noqa: F403  (the names of piid.__all__, re-exported below)
from piflow_kernels.distill.teachers import CFGTeacher, DiffusersTeacher, ExactGMTeacher, GaussianMixtureData, as_velocity
from piflow_kernels.distill.toy import ToyDXStudent, ToyGMStudent, sinusoidal_embedding
from piflow_kernels.distill.trainer import Trainer

__all__ = [
    *piid.__all__,
    "GaussianMixtureData",
    "ExactGMTeacher",
    "CFGTeacher",
    "DiffusersTeacher",
    "as_velocity",
    "ToyGMStudent",
    "ToyDXStudent",
    "sinusoidal_embedding",
    "TrainConfig",
    "Trainer",
    "ExactDataSource",
    "TensorDataSource",
    "energy_distance",
    "sliced_w2",
    "knn_precision_recall",
]
