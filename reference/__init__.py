"""Pure-PyTorch reference of the pi-Flow equations of docs/design.md: #conventions, #gmflow-policy,
#dx-policy, #rollout, #flowmapsde-sampler and #pi-id-loss.

Written literally and readably, dtype-agnostic (tests run it in float64), with no
imports from ``piflow_kernels``. Every fast path of the library is tested against it. Each function's
docstring names the equation tags (``[eq:...]``) of docs/design.md it implements.
"""

from .dx import dx_velocity
from .flowmap_sde import flowmap_sde_dst, flowmap_sde_sigmas, flowmap_sde_step
from .gm import gm_apply_dropout, gm_apply_temperature, gm_velocity
from .rollout import rollout
from .timesteps import dynamic_shift, unwarp, warp

__all__ = [
    "warp",
    "unwarp",
    "dynamic_shift",
    "gm_velocity",
    "gm_apply_temperature",
    "gm_apply_dropout",
    "dx_velocity",
    "rollout",
    "flowmap_sde_sigmas",
    "flowmap_sde_dst",
    "flowmap_sde_step",
]
