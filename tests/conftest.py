"""Test set-up shared by every test module.

- Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET=1 must be set before any
  kernel module is imported, so it is set here, first (with a GPU the kernels are compiled).
- ``cuda`` marker: tests that need a GPU are skipped when none is present (decided lazily, without
  CUDA calls at import time).
- ``one_thread`` (per test) and ``one_thread_per_module`` run with one intra-op torch thread; ``eager_cpu`` also
  turns torch.compile off (PIFLOW_COMPILE=0). Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``.
- ``poison`` makes NaN-filled output buffers so an element a kernel never writes fails the test.
- ``capture_cuda_graph`` records a callable into a CUDA graph after a warm-up call off the graph;
  ``compiled_step_error`` compiles a sampling step (velocity, then a rollout) with fullgraph=True.
"""

import os

import pytest  # noqa: E402
import torch  # noqa: E402

# torch.cuda.is_available() asks the driver (NVML) without creating a CUDA context
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# per-dtype tolerances (relative error, ||out - ref|| / ||ref|| or max-abs over max-abs as stated in each test)
TOL = {
    "velocity": {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2},
    "rollout": {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2},
    "grad": {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2},
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, NaN anywhere in ``out`` gives inf."""
    out = out.double()
    ref = ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def pytest_collection_modifyitems(config, items):
    if any("cuda" in item.keywords for item in items) and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


def _single_intra_op_thread():
    """Tiny tensors: intra-op threads only add overhead, and stall badly on a busy machine (on a loaded 2-core
    machine torch.softmax over a (2, 3, 1, 3, 3) tensor took 15 ms with two threads, 4 us with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (restored after it)."""
    yield from _single_intra_op_thread()


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One intra-op torch thread for the whole module, its module-scoped fixtures included."""
    yield from _single_intra_op_thread()


@pytest.fixture
def eager_cpu(monkeypatch, one_thread):
    """torch.compile off (PIFLOW_COMPILE=0: what is tested does not depend on it, and a first compilation takes
    about 30 s on a CPU) and one intra-op thread."""
    monkeypatch.setenv("PIFLOW_COMPILE", "0")


@pytest.fixture
def poison():
    """poison(t) -> t filled with NaN in place (the output buffer a fast path must overwrite)."""

    def _poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan"))

    return _poison


def capture_cuda_graph(fn):
    """(graph, out): ``fn()`` run once on a side stream (kernel compilation, allocator warm-up), then
    recorded into a CUDA graph; ``graph.replay()`` rewrites ``out`` from the current input buffers."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def compiled_step_error(pol, x: torch.Tensor, sigma: torch.Tensor, sigma_end: torch.Tensor) -> float:
    """rel_err between a sampling step of ``pol`` (velocity at sigma, then a rollout to sigma_end) under
    torch.compile(fullgraph=True) and the same step in eager; any graph break raises."""

    def step(x):
        u = pol.velocity(x, sigma)
        return pol.rollout(x - 0.01 * u, sigma, sigma_end, total_substeps=64, shift=3.0)

    return rel_err(torch.compile(step, fullgraph=True)(x), step(x))
