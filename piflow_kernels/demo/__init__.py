"""The demo: distill few-step pi-Flow students from an exact teacher and compare them with the teacher's sampler.

    python -m piflow_kernels demo [--out DIR] [--quick] [--seed N]

Data (:mod:`.data`): a Gaussian mixture over 8x8 single-channel images, one component per template
picture (bars, a ring, a cross, ...) with per-pixel noise, so its flow velocity is known in closed form
(the exact teacher, :class:`~piflow_kernels.distill.ExactGMTeacher`).

Students (:mod:`.training`): pi-ID (data-dependent) at 4, 2 and 1 NFE, with the GMFlow and with the DX
policy (:class:`SkipStudent` around the toy MLP students), each trained by the
:class:`~piflow_kernels.distill.Trainer` from its own :class:`~piflow_kernels.distill.TrainConfig`
(sizes in :mod:`.settings`). Each policy's students are trained in the order 4, 2, 1 NFE, each starting
from the previous one's weights.

Evaluation (:mod:`.evaluation`) on held-out exact samples: the energy distance, k-NN precision and
recall (:mod:`piflow_kernels.distill.metrics`) and the wall time of sampling, for exact data, the
teacher's Euler sampler at 128, 4, 2 and 1 steps and every student. :mod:`.run` prints a table and
writes ``DIR/results.json`` and a figure of samples ``DIR/samples.png`` (:mod:`.plot`). CPU only,
deterministic for a given ``--seed``.

    >>> from piflow_kernels.demo import main
    >>> main(["--quick", "--out", "demo_out"])
    0
"""

from __future__ import annotations

from piflow_kernels.demo.data import demo_data, teacher_euler, template_images
from piflow_kernels.demo.evaluation import EvalDraw, eval_draws, evaluate_method, evaluate_samples, format_table, sample_student
from piflow_kernels.demo.run import build_parser, main, run_demo
from piflow_kernels.demo.settings import FULL, QUICK, DemoSettings, StudentSettings
from piflow_kernels.demo.training import SkipStudent, distill_student, piid_config, train_config

__all__ = [
    "DemoSettings",
    "StudentSettings",
    "FULL",
    "QUICK",
    "template_images",
    "demo_data",
    "teacher_euler",
    "SkipStudent",
    "piid_config",
    "train_config",
    "distill_student",
    "sample_student",
    "evaluate_samples",
    "EvalDraw",
    "eval_draws",
    "evaluate_method",
    "format_table",
    "run_demo",
    "build_parser",
    "main",
]
