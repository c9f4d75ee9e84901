"""Fixtures of the op tests (tests/ops is a package, so this file does not shadow tests/conftest.py, whose
TOL and rel_err the test modules import with ``from conftest import ...``)."""

import pytest
import torch

from piflow_kernels.ops.dx import triton_rollout as dx_triton_rollout
from piflow_kernels.ops.dx import triton_velocity as dx_triton_velocity
from piflow_kernels.ops.gm import triton_common as gm_common

from .op_cases import NaNEmptyTorch


@pytest.fixture
def poisoned(monkeypatch, poison):
    """Every buffer the Triton launchers allocate starts as NaN, so an element a kernel never writes fails the
    comparison: the GM launchers allocate through triton_common.alloc, the DX ones with their module's torch.empty.
    Eager calls only (torch.compile would trace the stand-in module)."""
    monkeypatch.setattr(gm_common, "alloc", lambda shape, dtype, device: poison(torch.empty(shape, dtype=dtype, device=device)))
    for module in (dx_triton_velocity, dx_triton_rollout):
        monkeypatch.setattr(module, "torch", NaNEmptyTorch())
