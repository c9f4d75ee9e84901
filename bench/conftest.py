"""Benchmark-suite set-up: without CUDA the Triton kernels can only run in the interpreter, which must be
selected before any kernel module is imported (as in tests/conftest.py)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
