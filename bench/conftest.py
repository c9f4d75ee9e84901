"""Benchmark-suite set-up: without CUDA the Triton kernels can only run in the interpreter, which must be
selected before any kernel module is imported (as in tests/conftest.py)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def isolated_torch_state():
    """The step scripts and the trainer set the thread count and seed torch's RNG: give both back to the rest of
    the session."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)
