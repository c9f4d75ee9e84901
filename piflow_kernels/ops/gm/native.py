"""GM rollout on the CPU as one fused native loop: the policy tile stays in L1 over every substep.

The torch twin (:mod:`piflow_kernels.ops.gm.torch_twin`) runs a rollout as one compiled substep per call,
and each call streams the whole (B, K, C, L) policy through memory: at B=16, K=32, C=4, 32x32 that is 12 MB
per substep. This module does what the Triton rollout kernel does on a GPU, on CPU cores: 16 pixels at a
time (one AVX-512 register per quantity; 8, one AVX2 register, on x86 without AVX-512), their (K, C) policy
slice (8 KB at K=32, C=4) loaded once and kept in L1, every substep of the rollout run on it, x written once.
The algebra is the torch twin's substep (centred on x_src, u formed without x0, per-component stds about the
per-pixel pivot component), in float32 and log2 units.

The C source is ``native.c`` beside this file (its ``@GM_EPS@`` and ``@LOG2E@`` come from
:mod:`piflow_kernels.constants`), compiled at first use with the system C compiler into a cache folder
(``$PIFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/piflow_kernels``, else ``~/.cache/piflow_kernels``),
loaded with ctypes, and run on ``torch.get_num_threads()`` threads (ctypes releases the GIL). No
compiler, a failed build or ``PIFLOW_NATIVE=0``: :func:`available` is False (the reason is logged once)
and the dispatcher uses the torch twin.

The cache verifies what it loads: beside ``gm_native_<key>.so`` a ``gm_native_<key>.so.sha256`` holds the
library's sha256 (each moved into place atomically, the hash first); a cached build whose bytes do not
match it (or without one) is rebuilt with the same flags before ``ctypes.CDLL`` sees it, and the reason
is logged once. A damaged file therefore never changes which flags run, nor the output bits.

    >>> x_end = gm_rollout_native(x_start, GMTensors(means, logweights, logstds, x_src, sigma_src), plan)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from piflow_kernels.constants import GM_EPS, LOG2E
from piflow_kernels.files import DamagedFileError, read_text, sha256_file
from piflow_kernels.ops.gm.torch_twin import variances
from piflow_kernels.ops.records import GMTensors, RolloutPlan
from piflow_kernels.timesteps import sigma_table

logger = logging.getLogger(__name__)

_PIXELS_PER_ITEM = 256  # pixels of one sample per work item handed to a thread


def _read_source() -> str:
    source = read_text(os.path.join(os.path.dirname(os.path.abspath(__file__)), "native.c"), "native rollout source")
    return source.replace("@GM_EPS@", repr(GM_EPS)).replace("@LOG2E@", repr(LOG2E))


_SOURCE = _read_source()

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded function or None, "reason": why not, "pool": the thread pool


def _cache_dir() -> str:
    root = os.environ.get("PIFLOW_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "piflow_kernels")
    return root


def _cpu_signature() -> str:
    """What -march=native depends on: the machine type and its instruction-set flags."""
    flags = ""
    try:
        lines = read_text("/proc/cpuinfo", "CPU description").splitlines()
        flags = next((line for line in lines if line.startswith(("flags", "Features"))), "")
    except (OSError, DamagedFileError):
        pass
    return platform.machine() + flags


def _flag_sets() -> list[list[str]]:
    common = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-std=gnu11"]
    if platform.machine() in ("x86_64", "AMD64"):
        return [common + ["-march=native", "-mprefer-vector-width=512"], common]
    return [common + ["-mcpu=native"], common]


def _hash_file(path: str) -> str:
    return path + ".sha256"


def _cached_build_problem(path: str) -> str | None:
    """Why the cached library at ``path`` cannot be loaded as it is (None: its sha256 matches the recorded one)."""
    try:
        recorded = read_text(_hash_file(path), "native build hash").strip()
    except FileNotFoundError:
        return "no recorded sha256 beside it"
    except (OSError, DamagedFileError) as err:
        return f"its recorded sha256 is unreadable ({err})"
    try:
        actual = sha256_file(path, "native build")
    except (OSError, DamagedFileError) as err:
        return f"unreadable ({err})"
    if actual != recorded:
        return f"sha256 {actual[:16]}... differs from the recorded {recorded[:16]}..."
    return None


def _compile(cc: str, flags: list[str], path: str) -> str | None:
    """Build the library into ``path`` with its sha256 beside it; None, or the compiler's complaint."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "gm_native.c"), "w") as fh:
            fh.write(_SOURCE)
        # a relative source name in the build folder: the library's bytes do not depend on the temporary path
        # (a compiler named by a relative path is resolved first, against the caller's folder)
        cmd = [os.path.abspath(cc) if os.sep in cc else cc, *flags, "gm_native.c", "-o", "gm_native.so"]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return proc.stderr.strip()[-300:]
        out = os.path.join(tmp, "gm_native.so")
        # each file through a temporary name and os.replace (a concurrent process sees all of it or none);
        # the hash first, so a process that finds the library finds its hash too (the first builds of
        # several ranks at once then never take one another's library for a damaged one)
        staged = f"{_hash_file(path)}.{os.getpid()}.tmp"
        with open(staged, "w") as fh:
            fh.write(sha256_file(out, "native build") + "\n")
        os.replace(staged, _hash_file(path))
        staged = f"{path}.{os.getpid()}.tmp"
        shutil.copyfile(out, staged)
        os.replace(staged, path)
    return None


def _build() -> tuple[object | None, str | None]:
    """(the ctypes function, None) or (None, why not)."""
    if os.environ.get("PIFLOW_NATIVE", "1") == "0":
        return None, "PIFLOW_NATIVE=0"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, _cpu_signature()]).encode()).hexdigest()[:20]
        path = os.path.join(_cache_dir(), f"gm_native_{key}.so")
        try:
            problem = _cached_build_problem(path) if os.path.exists(path) else None
            if problem is not None:
                logger.warning("piflow_kernels: the cached native build %s does not verify (%s); rebuilding it", path, problem)
            if problem is not None or not os.path.exists(path):
                complaint = _compile(cc, flags, path)
                if complaint is not None:
                    errors.append(f"{' '.join(flags)}: {complaint}")
                    continue
            fn = ctypes.CDLL(path).piflow_gm_rollout
        except (OSError, subprocess.SubprocessError, DamagedFileError) as err:
            errors.append(f"{' '.join(flags)}: {err}")
            continue
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr] * 7 + [i64] * 4 + [ctypes.c_int] + [i64] * 3
        fn.restype = ctypes.c_int
        return fn, None
    return None, "the C build failed: " + " | ".join(errors)


def available() -> bool:
    """Whether the native rollout can run here (builds it on the first call)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["reason"] = _build()
            if _state["lib"] is None:
                logger.warning("piflow_kernels: native CPU rollout unavailable (%s); using the torch twin", _state["reason"])
    return _state["lib"] is not None


def _pool(workers: int) -> ThreadPoolExecutor:
    """The worker threads (made again after a fork: a child inherits the pool but not its threads)."""
    with _lock:
        pool = _state.get("pool")
        if pool is None or _state.get("workers") != workers or _state.get("pid") != os.getpid():
            if pool is not None and _state.get("pid") == os.getpid():
                pool.shutdown(wait=False)
            pool = _state["pool"] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="piflow-native")
            _state["workers"] = workers
            _state["pid"] = os.getpid()
    return pool


def gm_rollout_native(x_start: torch.Tensor, policy: GMTensors, plan: RolloutPlan) -> torch.Tensor:
    """Run a whole GM rollout natively on CPU tensors (the caller checked :func:`available`).

    Args:
        x_start: (B, C, L) CPU, any float dtype; policy: the flat GM policy (CPU); plan: the substep plan.
    Returns:
        x_end (B, C, L) in x_start.dtype, a new tensor.
    """
    means = policy.means
    b, k, c, length = means.shape
    table = torch.stack(sigma_table(*plan.kernel_args), 1)  # (B, T): a finished sample repeats its last sigma
    var = variances(policy.logstds, policy.sigma_src).expand(b, k)  # per-sample std: the kernel reads var[:, 0]
    inputs = (means, policy.logweights, policy.x_src, var, policy.sigma_src, table)
    args = [t.detach().float().contiguous() for t in inputs]
    out = x_start.detach().float().contiguous().clone()
    ptrs = [t.data_ptr() for t in args] + [out.data_ptr()]
    fn = _state["lib"]
    items = [(i, l0, min(l0 + _PIXELS_PER_ITEM, length)) for i in range(b) for l0 in range(0, length, _PIXELS_PER_ITEM)]
    shape = (k, c, length, table.shape[1], int(policy.per_component_std))

    def run(item):
        return fn(*ptrs, *shape, *item)

    workers = max(1, min(torch.get_num_threads(), len(items)))
    codes = list(map(run, items)) if workers == 1 else list(_pool(workers).map(run, items))
    if any(codes):
        raise MemoryError("piflow_kernels: the native rollout could not allocate its tile buffer")
    return out.to(x_start.dtype)


__all__ = ["available", "gm_rollout_native"]
