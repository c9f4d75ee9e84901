"""``python -m bench.sass [--arch 90] [--kernels fwd,bwd,rollout] [--shape B,K,C,L]``: static evidence, no GPU.

Compiles the GM Triton kernels for an NVIDIA architecture on a machine without a GPU, through Triton's
own launch path (so pointers and integers get the specialization a real launch gives them: 16-byte
alignment where not switched off, strides equal to 1 as constants), and prints per kernel the registers,
local-memory stack (spills), static instruction mix of the machine code, and the instructions of its
longest loop body (for the rollout one substep of one pixel, as one thread owns a pixel; "-" where the
compiler unrolled every loop).

    $ python -m bench.sass
    kernel            regs  stack  instr   loop  FFMA  FMUL  FADD  MUFU  SHFL  BAR  LDL  STL
    fwd               ...

How: the CUDA driver is replaced by a stub that names the target, and ``JITFunction.run`` compiles
without launching (Triton's warm-up mode); CPU tensors stand in for device tensors. The machine code is
read with the ``nvdisasm`` / ``cuobjdump`` shipped in the Triton wheel. Shuffles (SHFL) and barriers (BAR)
in a kernel whose thread owns whole pixels mean that the compiler spread a pixel over threads.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager

_OP = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_COLUMNS = ("FFMA", "FMUL", "FADD", "MUFU", "SHFL", "BAR", "LDL", "STL")


@contextmanager
def offline_target(arch: int):
    """Make Triton compile (not launch) every kernel call for ``sm_<arch>``; yields {kernel name: compiled}."""
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    compiled: dict = {}
    touched = []
    run = jit.JITFunction.run

    def _compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled[self.fn.__name__] = kernel
        touched.append(self)
        return kernel

    old_driver = driver._active  # None until a real driver was made; reading .active would make one
    driver.set_active(_Driver())
    jit.JITFunction.run = _compile_only
    try:
        yield compiled
    finally:
        jit.JITFunction.run = run
        driver._active = old_driver
        for fn in touched:  # their per-device caches name the offline target: a real launch must start afresh
            fn.device_caches.clear()


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def machine_code_stats(kernel) -> dict:
    """Registers, stack bytes, instruction counts (whole kernel) and the instructions of the longest loop
    body (for the rollout: one substep of one pixel) of one compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    lines = sass.splitlines()
    ops = collections.Counter(m.group(1) for line in lines if (m := _OP.search(line)))
    # loops: a label ".L_x_N:" with a later branch back to it; the longest body (the trailing one-instruction
    # self-branch that ends every kernel is not a loop of the program)
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loop = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = sum(1 for line2 in lines[labels[m.group(1)] : i + 1] if _OP.search(line2))
            if body > 1:
                loop = max(loop or 0, body)
    return dict(regs=int(regs.group(1)) if regs else None, stack=int(stack.group(1)) if stack else None,
                instr=sum(ops.values()), loop=loop, **{c: ops[c] for c in _COLUMNS})  # fmt: skip


def compile_gm_kernels(arch: int = 90, shape: tuple[int, int, int, int] = (4, 32, 4, 1024), per_component: bool = False,
                       kernels: tuple[str, ...] = ("fwd", "bwd", "rollout")) -> dict[str, dict]:  # fmt: skip
    """Compile the GM kernels at a (B, K, C, L) float32 shape for sm_<arch>; {kernel: machine_code_stats}."""
    from bench.cases import gm_kernel_launches
    from piflow_kernels.ops.gm import triton_common

    b, k, c, length = shape
    fast_rcp = triton_common.fast_rcp
    triton_common.fast_rcp = lambda t: True  # as on an NVIDIA GPU
    out = {}
    try:
        with offline_target(arch) as compiled:
            calls = gm_kernel_launches(b, k, c, length, 128, "cpu", per_component)
            for name in kernels:
                fn_name, call = calls[name]
                call()
                out[name] = machine_code_stats(compiled[fn_name])
    finally:
        triton_common.fast_rcp = fast_rcp
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (90 = H100/H200)")
    parser.add_argument("--kernels", default="fwd,bwd,rollout")
    parser.add_argument("--shape", default="4,32,4,1024", help="B,K,C,L (the launch config depends on K, C, L)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")
    import triton

    shape = tuple(int(v) for v in args.shape.split(","))
    kernels = tuple(args.kernels.split(","))
    print(f"triton {triton.__version__}, sm_{args.arch}, B,K,C,L = {shape}, float32")
    print(f"{'kernel':<22} {'regs':>4} {'stack':>5} {'instr':>6} {'loop':>5} " + " ".join(f"{c:>5}" for c in _COLUMNS))
    for per in (False, True):
        for name, st in compile_gm_kernels(args.arch, shape, per, kernels).items():
            label = f"{name} ({'std/k' if per else 'std/sample'})"
            loop = "-" if st["loop"] is None else str(st["loop"])
            print(f"{label:<22} {st['regs']:>4} {st['stack']:>5} {st['instr']:>6} {loop:>5} "
                  + " ".join(f"{st[c]:>5}" for c in _COLUMNS))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
