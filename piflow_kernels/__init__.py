"""piflow_kernels: fast pi-Flow policies (GMFlow, DX), a diffusers-compatible sampler and a pi-ID trainer.

    >>> import piflow_kernels as pk
    >>> pol = pk.GMFlowPolicy(means, logweights, logstds, x_src, sigma_src)
    >>> x_end = pol.rollout(x_src, sigma_src, 0.0, total_substeps=128)

Names that need diffusers (the scheduler, students, pipelines) are imported lazily, on first
access, so the policies and kernels work on machines without diffusers.
"""

from __future__ import annotations

import importlib

from piflow_kernels import _mount_reference  # noqa: F401  (first: makes piflow_kernels.reference importable)
from piflow_kernels.ops.dispatch import BACKENDS, resolve_backend
from piflow_kernels.outputs import DXOutput, GMFlowOutput, make_policy
from piflow_kernels.policies import DXPolicy, GMFlowPolicy
from piflow_kernels.timesteps import dynamic_shift, unwarp, warp

__version__ = "0.1.0"

# public name -> module that defines it, imported on first access
_LAZY = {
    "PiFlowScheduler": "piflow_kernels.scheduler",
    "sample": "piflow_kernels.sampling",
    "build_student": "piflow_kernels.students",
    "PiFlowStudent": "piflow_kernels.students",
    "load_official_adapter": "piflow_kernels.official_weights",
    "export_official": "piflow_kernels.official_export",
    "to_piflow": "piflow_kernels.pipelines",
    "load_piflow_pipeline": "piflow_kernels.pipelines",
    "PiIDConfig": "piflow_kernels.distill",
    "ExactGMTeacher": "piflow_kernels.distill",
    "TrainConfig": "piflow_kernels.distill",
    "Trainer": "piflow_kernels.distill",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'piflow_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "BACKENDS",
    "DXOutput",
    "DXPolicy",
    "GMFlowOutput",
    "GMFlowPolicy",
    "dynamic_shift",
    "make_policy",
    "resolve_backend",
    "unwarp",
    "warp",
    *_LAZY,
]
