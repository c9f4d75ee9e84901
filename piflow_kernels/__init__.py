"""piflow_kernels: fast pi-Flow policies (GMFlow, DX), a diffusers-compatible sampler and a pi-ID trainer.

    >>> import piflow_kernels as pk
    >>> pol = pk.GMFlowPolicy(means, logweights, logstds, x_src, sigma_src)
    >>> x_end = pol.rollout(x_src, sigma_src, 0.0, total_substeps=128)
"""

from piflow_kernels.backend import BACKENDS, resolve_backend
from piflow_kernels.outputs import DXOutput, GMFlowOutput, make_policy
from piflow_kernels.policies import DXPolicy, GMFlowPolicy
from piflow_kernels.timesteps import dynamic_shift, unwarp, warp

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DXOutput",
    "DXPolicy",
    "GMFlowOutput",
    "make_policy",
    "GMFlowPolicy",
    "dynamic_shift",
    "resolve_backend",
    "unwarp",
    "warp",
]
