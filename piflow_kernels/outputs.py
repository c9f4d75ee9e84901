"""Typed student outputs and the one function that turns them into a policy.

A GMFlow student returns :class:`GMFlowOutput` (means, logweights, logstds); a DX student returns a
:class:`DXOutput` (grid). Unlike a diffusers ``ModelOutput`` (or the official code's tuple), these
refuse integer indexing: ``out[0]`` raises instead of silently handing a stock pipeline the ``means``
tensor, which it would broadcast against the latents without error.

    >>> out = GMFlowOutput(means=m, logweights=lw, logstds=ls)
    >>> pol = make_policy(out, x_t, sigma)           # a GMFlowPolicy
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from piflow_kernels.policies import DXPolicy, GMFlowPolicy

__all__ = ["GMFlowOutput", "DXOutput", "make_policy", "POLICY_TYPES"]

POLICY_TYPES = ("GMFlow", "DX")


class _NoIntIndex:
    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        raise TypeError(
            f"{type(self).__name__} is a pi-Flow policy output and cannot be indexed by {key!r}: a stock "
            "diffusers pipeline expects a velocity tensor, not a policy. Use piflow_kernels.PiFlowScheduler "
            "(or piflow_kernels.sample) to turn it into latents, or read its fields by name."
        )

    def __iter__(self):
        raise TypeError(f"{type(self).__name__} cannot be unpacked; read its fields by name")

    def keys(self):
        return [f.name for f in fields(self)]

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.keys()}


@dataclass
class GMFlowOutput(_NoIntIndex):
    """GMFlow student output: means (B, K, C, *S), logweights (B, K, 1, *S), logstds (B, 1|K, 1, *1)."""

    means: torch.Tensor
    logweights: torch.Tensor
    logstds: torch.Tensor


@dataclass
class DXOutput(_NoIntIndex):
    """DX student output: grid (B, N, C, *S) of velocities at N grid points."""

    grid: torch.Tensor


def make_policy(
    output: object,
    x_t: torch.Tensor,
    sigma: float | torch.Tensor,
    policy_type: str | None = None,
    *,
    segment_size: float = 1.0,
    shift: float = 1.0,
    mode: str = "grid",
    backend: str | None = None,
) -> GMFlowPolicy | DXPolicy:
    """Build the policy of a student output at (x_t, sigma).

    Accepts :class:`GMFlowOutput`, :class:`DXOutput`, a mapping with keys ``means, logweights, logstds``
    (GMFlow) or ``grid`` (DX), an object with those attributes (e.g. a diffusers ModelOutput), or a bare
    tensor (the DX grid). ``policy_type`` ("GMFlow" or "DX"), when given, must agree with the output.
    The DX-only keywords are ignored for GMFlow.
    """
    if policy_type is not None and policy_type not in POLICY_TYPES:
        raise ValueError(f"policy_type must be one of {POLICY_TYPES}, got {policy_type!r}")
    gm_keys = ("means", "logweights", "logstds")
    if isinstance(output, Mapping):
        get = output.get
        has = lambda k: k in output  # noqa: E731
    else:
        get = lambda k: getattr(output, k, None)  # noqa: E731
        has = lambda k: getattr(output, k, None) is not None  # noqa: E731
    if isinstance(output, torch.Tensor):
        kind = "DX"
    elif all(has(k) for k in gm_keys):
        kind = "GMFlow"
    elif has("grid"):
        kind = "DX"
    else:
        found = list(output.keys()) if isinstance(output, Mapping) else type(output).__name__
        raise TypeError(
            "model output must be a GMFlowOutput / mapping with keys 'means', 'logweights', 'logstds' (GMFlow) "
            f"or a DXOutput / mapping with key 'grid' / a grid tensor (DX); got {found}"
        )
    if policy_type is not None and policy_type != kind:
        raise TypeError(f"expected a {policy_type} policy output, got a {kind} one")
    if kind == "GMFlow":
        return GMFlowPolicy(get("means"), get("logweights"), get("logstds"), x_t, sigma, backend=backend)
    grid = output if isinstance(output, torch.Tensor) else get("grid")
    return DXPolicy(grid, x_t, sigma, segment_size=segment_size, shift=shift, mode=mode, backend=backend)
