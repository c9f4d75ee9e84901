"""GPU check, part 2: every Triton kernel against the float64 reference on the device.

GM velocity forward/backward, GM rollout, DX velocity forward/backward and DX rollout at several shapes
(the benchmark shapes included) and dtypes (fp32, bf16); max relative errors and PASS/FAIL against the
test tolerances, or within twice the error of the library's own float32 torch path on the same inputs.
"""

from __future__ import annotations

import os
import time
import traceback
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

from bench.gpu_common import TOL, time_limit


@dataclass(frozen=True)
class Check:
    """One correctness configuration. ``components`` is K (GM) or N (DX)."""

    op: str  # "gm" or "dx"
    batch: int
    components: int
    channels: int
    spatial: tuple[int, ...]
    dtype: str = "float32"
    substeps: int = 128
    shift: float = 1.0
    per_component_std: bool = False
    neg_inf: bool = False
    non_contiguous: bool = False
    polynomial: bool = False
    rollout: bool = True

    @property
    def label(self) -> str:
        letter = "K" if self.op == "gm" else "N"
        extra = [self.dtype]
        if self.shift != 1.0:
            extra.append(f"shift{self.shift}")
        for flag, name in ((self.per_component_std, "std/k"), (self.neg_inf, "-inf"), (self.non_contiguous, "strided"),
                           (self.polynomial, "poly")):  # fmt: skip
            if flag:
                extra.append(name)
        sp = "x".join(map(str, self.spatial))
        return f"{self.op}-B{self.batch}-{letter}{self.components}-C{self.channels}-{sp}-" + "-".join(extra)


def correctness_checks(device: str, quick: bool) -> list[Check]:
    if quick:
        return [
            Check("gm", 2, 3, 5, (7, 9), substeps=16, shift=3.2, neg_inf=True),
            Check("gm", 2, 4, 4, (2, 3, 5), "bfloat16", substeps=8, per_component_std=True, non_contiguous=True),
            Check("dx", 2, 5, 5, (7, 9), substeps=16, shift=3.2),
            Check("dx", 2, 3, 4, (2, 3, 5), "bfloat16", substeps=8, polynomial=True, non_contiguous=True),
        ]
    return [
        # odd shapes and the edges of the range (cheap: first)
        Check("gm", 3, 3, 5, (7, 9), substeps=128, shift=3.2, neg_inf=True, per_component_std=True),
        Check("gm", 3, 8, 16, (3, 7, 9), "bfloat16", substeps=64, non_contiguous=True),
        Check("gm", 2, 64, 64, (9, 7), substeps=32, per_component_std=True, neg_inf=True),
        Check("gm", 2, 1, 1, (7, 9), substeps=16),
        Check("gm", 2, 65, 4, (8, 8), substeps=8),  # outside the range: must fall back, still right
        Check("dx", 3, 5, 5, (7, 9), substeps=128, shift=3.2, non_contiguous=True),
        Check("dx", 3, 4, 16, (3, 7, 9), "bfloat16", substeps=64, polynomial=True),
        Check("dx", 2, 64, 8, (9, 7), substeps=32),
        # the benchmark shapes
        Check("gm", 512, 32, 4, (32, 32), substeps=128),
        Check("gm", 1, 8, 16, (128, 128), substeps=32, shift=3.0),
        Check("dx", 512, 10, 4, (32, 32), substeps=128),
        Check("gm", 512, 32, 4, (32, 32), "bfloat16", substeps=128, rollout=False),
        Check("gm", 1, 8, 16, (8, 40, 40), "bfloat16", substeps=32, shift=3.0),
        Check("dx", 1, 10, 16, (128, 128), "bfloat16", substeps=32, shift=3.0),
    ]


def _rel_err(out, ref) -> float:
    import torch

    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _record(records, log, check, quantity, err, tol_kind, torch_err=None):
    """One error figure. PASS within the test tolerance, or (as flash-attention bounds its kernels) within
    twice the error of the library's own float32 torch path on the same inputs, when the fixed tolerance
    is beyond float32 for those inputs."""
    tol = TOL[tol_kind][check.dtype]
    ok = err <= tol
    verdict = "PASS" if ok else "FAIL"
    if not ok and torch_err is not None and err <= 2.0 * torch_err:
        ok, verdict = True, "PASS (<= 2x torch fp32 error)"
    records.append(dict(check=check.label, op=check.op, quantity=quantity, dtype=check.dtype, rel_err=err, tol=tol,
                        torch_rel_err=torch_err, passed=ok))  # fmt: skip
    extra = f"  torch {torch_err:9.2e}" if torch_err is not None else ""
    log(f"    {check.label:<52} {quantity:<18} rel err {err:9.2e}  tol {tol:.0e}{extra}  {verdict}")


@contextmanager
def _eager_torch_path():
    """The torch path without torch.compile (its compile would cost tens of seconds of the budget)."""
    old = os.environ.get("PIFLOW_COMPILE")
    os.environ["PIFLOW_COMPILE"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PIFLOW_COMPILE", None)
        else:
            os.environ["PIFLOW_COMPILE"] = old


def check_and_record(check: Check, device: str, log, records: list) -> None:
    """Run one check on the Triton backend; for figures over tolerance, also measure the torch path."""
    run = run_gm_check if check.op == "gm" else run_dx_check
    results = run(check, device, "triton")
    over = [q for q, err, kind in results if not err <= TOL[kind][check.dtype]]
    torch_errs: dict[str, float] = {}
    if over:
        try:
            with _eager_torch_path():
                torch_errs = {q: err for q, err, _ in run(check, device, "torch")}
        except Exception as err:  # the comparison is a courtesy: the fixed-tolerance verdict stands
            log(f"    {check.label:<52} torch-path comparison failed: {type(err).__name__}: {err}"[:300])
    for quantity, err, kind in results:
        _record(records, log, check, quantity, err, kind, torch_errs.get(quantity) if quantity in over else None)


def _sigmas(batch, gen, lo, hi):
    import torch

    return lo + (hi - lo) * torch.rand(batch, generator=gen)


def run_gm_check(check: Check, device: str, backend: str = "triton") -> list[tuple[str, float, str]]:
    """(quantity, max rel err vs float64, tolerance kind) of the GM velocity, its gradients and a rollout."""
    import torch

    import piflow_kernels as pk
    from piflow_kernels import reference

    dt = getattr(torch, check.dtype)
    results: list[tuple[str, float, str]] = []
    gen = torch.Generator().manual_seed(zlib.crc32(check.label.encode()))
    b, k, c, sp = check.batch, check.components, check.channels, check.spatial
    ones = (1,) * len(sp)

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen)

    if check.non_contiguous:  # channels-last storage: the flat (.., C, L) views have stride_c = 1
        means = rnd(b, k, *sp, c).movedim(-1, 2)
        x_src = rnd(b, *sp, c).movedim(-1, 1)
    else:
        means, x_src = rnd(b, k, c, *sp), rnd(b, c, *sp)
    logweights = torch.log_softmax(rnd(b, k, 1, *sp, scale=2.0), dim=1)
    if check.neg_inf and k > 1:
        drop = torch.rand(b, k, generator=gen) < 0.3
        drop[:, 0] = False  # never all of a sample's components
        logweights = logweights.masked_fill(drop.reshape(b, k, 1, *ones), float("-inf"))
    logstds = rnd(b, k if check.per_component_std else 1, 1, *ones, scale=0.3) - 1.0
    sigma_src = _sigmas(b, gen, 0.6, 1.0)
    sigma = sigma_src * _sigmas(b, gen, 0.05, 0.95)  # the policy's domain: sigma <= sigma_src
    x = x_src + 0.5 * rnd(*x_src.shape)

    to_dev = lambda t: t.to(device=device, dtype=dt)  # noqa: E731 (keeps strides of the non-contiguous views)
    means_d, lw_d, ls_d, xs_d, x_d = map(to_dev, (means, logweights, logstds, x_src, x))
    ss_d, s_d = sigma_src.to(device), sigma.to(device)
    leaves = [t.detach().requires_grad_(True) for t in (means_d, lw_d, ls_d, x_d, xs_d)]
    pol = pk.GMFlowPolicy(leaves[0], leaves[1], leaves[2], leaves[4], ss_d, backend=backend)
    u = pol.velocity(leaves[3], s_d)
    grad_u = rnd(*x.shape).to(device)
    grads = torch.autograd.grad(u, leaves, grad_u.to(dt))

    leaves64 = [t.detach().double().requires_grad_(True) for t in (means_d, lw_d, ls_d, x_d, xs_d)]
    u64 = reference.gm_velocity(leaves64[3], s_d.double(), leaves64[0], leaves64[1], leaves64[2], leaves64[4], ss_d.double())
    grads64 = torch.autograd.grad(u64, leaves64, grad_u.double())
    results.append(("velocity", _rel_err(u, u64), "velocity"))
    for name, g, g64 in zip(("grad means", "grad logweights", "grad logstds", "grad x", "grad x_src"), grads, grads64):
        finite = torch.isfinite(g64)  # -inf logweights: reference gradients there may be NaN
        results.append((name, _rel_err(g[finite], g64[finite]), "grad"))
    del u, grads, u64, grads64, leaves64

    if check.rollout:
        with torch.no_grad():
            s_end = (ss_d * torch.rand(b, generator=gen).to(device) * 0.8).clamp(0.0, 1.0)
            s_end[0] = 0.0  # one full-length rollout; the others stop at different sigmas
            pol_r = pk.GMFlowPolicy(means_d, lw_d, ls_d, xs_d, ss_d, backend=backend)
            x_end = pol_r.rollout(xs_d, ss_d, s_end, total_substeps=check.substeps, shift=check.shift)
            m64, lw64, ls64, xs64, ss64 = means_d.double(), lw_d.double(), ls_d.double(), xs_d.double(), ss_d.double()
            vel = lambda xx, s: reference.gm_velocity(xx, s, m64, lw64, ls64, xs64, ss64)  # noqa: E731
            x_ref = reference.rollout(vel, xs64, ss64, s_end.double(), check.substeps, check.shift)
            results.append((f"rollout({check.substeps})", _rel_err(x_end, x_ref), "rollout"))
    return results


def run_dx_check(check: Check, device: str, backend: str = "triton") -> list[tuple[str, float, str]]:
    """(quantity, max rel err vs float64, tolerance kind) of the DX velocity, its gradients and a rollout."""
    import torch

    import piflow_kernels as pk
    from piflow_kernels import reference

    dt = getattr(torch, check.dtype)
    results: list[tuple[str, float, str]] = []
    gen = torch.Generator().manual_seed(zlib.crc32(check.label.encode()))
    b, n, c, sp = check.batch, check.components, check.channels, check.spatial
    if check.non_contiguous:
        grid = torch.randn(b, n, *sp, c, generator=gen).movedim(-1, 2)
        x_src = torch.randn(b, *sp, c, generator=gen).movedim(-1, 1)
    else:
        grid = torch.randn(b, n, c, *sp, generator=gen)
        x_src = torch.randn(b, c, *sp, generator=gen)
    x = x_src + 0.5 * torch.randn(x_src.shape, generator=gen)
    sigma_src = _sigmas(b, gen, 0.6, 1.0)
    sigma = sigma_src * _sigmas(b, gen, 0.05, 0.95)  # the policy's domain: sigma <= sigma_src
    mode = "polynomial" if check.polynomial else "grid"
    seg_size = 0.6

    to_dev = lambda t: t.to(device=device, dtype=dt)  # noqa: E731
    grid_d, xs_d, x_d = map(to_dev, (grid, x_src, x))
    ss_d, s_d = sigma_src.to(device), sigma.to(device)
    leaves = [t.detach().requires_grad_(True) for t in (grid_d, x_d, xs_d)]
    pol = pk.DXPolicy(leaves[0], leaves[2], ss_d, segment_size=seg_size, shift=check.shift, mode=mode, backend=backend)
    u = pol.velocity(leaves[1], s_d)
    grad_u = torch.randn(x.shape, generator=gen).to(device)
    grads = torch.autograd.grad(u, leaves, grad_u.to(dt))
    leaves64 = [t.detach().double().requires_grad_(True) for t in (grid_d, x_d, xs_d)]
    u64 = reference.dx_velocity(leaves64[1], s_d.double(), leaves64[0], leaves64[2], ss_d.double(), seg_size, check.shift, mode)
    grads64 = torch.autograd.grad(u64, leaves64, grad_u.double())
    results.append(("velocity", _rel_err(u, u64), "velocity"))
    for name, g, g64 in zip(("grad grid", "grad x", "grad x_src"), grads, grads64):
        results.append((name, _rel_err(g, g64), "grad"))
    del u, grads, u64, grads64, leaves64

    if check.rollout:
        with torch.no_grad():
            s_end = (ss_d * torch.rand(b, generator=gen).to(device) * 0.8).clamp(0.0, 1.0)
            s_end[0] = 0.0
            pol_r = pk.DXPolicy(grid_d, xs_d, ss_d, segment_size=seg_size, shift=check.shift, mode=mode, backend=backend)
            x_end = pol_r.rollout(xs_d, ss_d, s_end, total_substeps=check.substeps, shift=check.shift)
            g64, xs64, ss64 = grid_d.double(), xs_d.double(), ss_d.double()
            vel = lambda xx, s: reference.dx_velocity(xx, s, g64, xs64, ss64, seg_size, check.shift, mode)  # noqa: E731
            x_ref = reference.rollout(vel, xs64, ss64, s_end.double(), check.substeps, check.shift)
            results.append((f"rollout({check.substeps})", _rel_err(x_end, x_ref), "rollout"))
    return results


def part_correctness(state: dict, device: str, quick: bool, deadline: float, log) -> None:
    import torch

    records = state.setdefault("correctness", [])
    failures = state.setdefault("correctness_errors", {})
    for check in correctness_checks(device, quick):
        if time.monotonic() > deadline:
            failures[check.label] = "skipped: time budget spent"
            log(f"    {check.label:<52} skipped (time budget)")
            continue
        try:
            with time_limit(deadline - time.monotonic()):
                check_and_record(check, device, log, records)
        except Exception as err:
            failures[check.label] = f"{type(err).__name__}: {err}"[:400]
            state.setdefault("tracebacks", {})[check.label] = traceback.format_exc(limit=8)
            log(f"    {check.label:<52} ERROR {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
