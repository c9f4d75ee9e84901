"""What the parts of the GPU check share: the test tolerances, the log, a per-part time limit."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

# tolerances of the test suite (tests/conftest.py TOL): max |out - ref| / max |ref|
TOL = {
    "velocity": {"float32": 2e-5, "bfloat16": 1e-2},
    "rollout": {"float32": 1e-4, "bfloat16": 1e-2},
    "grad": {"float32": 1e-4, "bfloat16": 1e-2},
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Log:
    """print() to stdout and to the log file, flushed line by line."""

    def __init__(self, path: str):
        self.fh = open(path, "a", buffering=1)

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.fh.write(line + "\n")


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (checked between Python bytecodes)."""
    if seconds <= 0:
        raise TimeoutError("no time left in the budget")
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError(f"part exceeded its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
