"""Fixtures of the op tests (tests/ops is a package, so this file does not shadow tests/conftest.py, whose
TOL and rel_err the test modules import with ``from conftest import ...``)."""

import pytest
import torch

from piflow_kernels.ops import utils


@pytest.fixture
def poisoned(monkeypatch, poison):
    """Every buffer the Triton launchers allocate (through ``piflow_kernels.ops.utils.alloc``) starts as NaN, so an
    element a kernel never writes fails the comparison."""
    monkeypatch.setattr(utils, "alloc", lambda shape, dtype, device: poison(torch.empty(shape, dtype=dtype, device=device)))
