"""``python -m bench.fuzz --n 20000 [--triton-n 600] [--seed 0] [--json PATH]``: random valid policy inputs against
the float64 reference, every backend.

Draws ``--n`` random GM and DX policies with their queries from the policies' whole valid domain
(docs/design.md#domain-of-the-inputs; the domain and its edges as in tests/test_properties.py): B 1..3, K or N
1..5, C 1..4, 4D or 5D tiny latents, fp32/bf16/fp16 tensors, logweights with -inf entries (at least one finite per
pixel), logstds per sample or per component in [-10, 3], sigma_src in [0, 1] with the edges 0, 1e-6, 1e-4 and 1
drawn often, sigma and sigma_start in [0, sigma_src], sigma_end in [0, sigma_start], rollout shift in [0.5, 5],
total_substeps 1..16, DX segment_size in [1e-4, 2], policy shift in [0.5, 5], mode grid or polynomial.

Runs the velocity (forward and the gradients w.r.t. every policy tensor, x and x_src) and the rollout of every
backend: "torch" (its GM rollout on CPU is the native loop, row "native"), the torch twin's own GM rollout in eager
(row "twin": the path without a C compiler), "reference" (the literal equations in float32) and "triton" (on CPU
the interpreter, on the first ``--triton-n`` inputs whose shapes are tiny). Each output is compared with the
float64 reference by the rule of tests/test_properties.py (its docstring gives the details: overflow, the logweights
gradient's scale): finite, and ``err <= TOL`` or ``err <= 2 * err32 + 1e-6`` or ``err32 >= 1``, with err32 the
error of the literal reference run in float32 (cast to the output dtype). The report gives, per family, backend
and dtype: the count, NaN/inf outputs, the worst relative error of each output, rule failures, and the parameters of
the worst input (by err / bound). Any input is reproduced by ``--seed S --only I`` (its index).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# tests/conftest.py TOL (bench.gpu_common.TOL has no fp16 row): max |out - ref| / max |ref|
TOL = {
    "velocity": {"fp32": 2e-5, "bf16": 1e-2, "fp16": 1e-2},
    "rollout": {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2},
    "grad": {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2},
}
FLOOR = 1e-6
EDGE_SIGMAS = (0.0, 1e-6, 1e-4, 1.0)
GM_GRADS = ("means", "logweights", "logstds", "x", "x_src")
DX_GRADS = ("grid", "x", "x_src")
COLUMNS = ("velocity", "d_means|grid", "d_logweights", "d_logstds", "d_x", "d_x_src", "rollout")
TRITON_LIMITS = {"b": 2, "k": 4, "c": 3, "side": 3}  # tiny shapes: the interpreter runs about 0.5 s an input


# ------------------------------------------------------------------------------------------------ drawing inputs


@dataclass
class Case:
    """One random policy and its queries (JSON-able: the report prints the worst ones)."""

    index: int
    family: str  # "gm" or "dx"
    b: int
    k: int  # K (GM) or N (DX)
    c: int
    spatial: tuple[int, ...]
    dtype: str
    sigma_src: list[float]
    sigma: list[float]
    sigma_start: list[float]
    sigma_end: list[float]
    total_substeps: int
    shift: float
    x_offset: float
    seed: int
    gm: dict = field(default_factory=dict)  # per_component, logstd_range, mean_scale, logweight_scale, drop, ...
    dx: dict = field(default_factory=dict)  # grid_scale, segment_size, policy_shift, mode

    @property
    def tiny(self) -> bool:
        lim = TRITON_LIMITS
        return self.b <= lim["b"] and self.k <= lim["k"] and self.c <= lim["c"] and max(self.spatial) <= lim["side"]


def _pick(rng: np.random.Generator, edges, lo: float, hi: float, p_edge: float = 0.3) -> float:
    """One of ``edges`` with probability p_edge, else uniform in [lo, hi]."""
    return float(rng.choice(edges)) if rng.random() < p_edge else float(rng.uniform(lo, hi))


def _fractions(rng: np.random.Generator, b: int) -> np.ndarray:
    return np.array([_pick(rng, (0.0, 1.0), 0.0, 1.0) for _ in range(b)], dtype=np.float32)


def draw_case(seed: int, index: int) -> Case:
    """The ``index``-th input of the run with ``seed``: drawn from its own generator, so any one is reproducible."""
    rng = np.random.default_rng([seed, index])
    family = "gm" if index % 2 == 0 else "dx"
    b, k, c = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 5))
    nd = 2 if rng.random() < 0.5 else 3  # 4D or 5D latents, at most 3 per axis in 5D
    spatial = tuple(int(v) for v in rng.integers(1, 5 if nd == 2 else 4, size=nd))
    # float32 sigmas, products in float32 so that sigma <= sigma_src and sigma_end <= sigma_start hold exactly
    s_src = np.array([_pick(rng, EDGE_SIGMAS, 0.0, 1.0, 0.4) for _ in range(b)], dtype=np.float32)
    s_start = s_src * _fractions(rng, b)
    case = Case(
        index, family, b, k, c, spatial,
        dtype=str(rng.choice(list(DTYPES))),
        sigma_src=s_src.tolist(),
        sigma=(s_src * _fractions(rng, b)).tolist(),
        sigma_start=s_start.tolist(),
        sigma_end=(s_start * _fractions(rng, b)).tolist(),
        total_substeps=int(rng.integers(1, 17)),
        shift=_pick(rng, (0.5, 1.0, 5.0), 0.5, 5.0),
        x_offset=_pick(rng, (0.0,), 0.0, 3.0, 0.2),
        seed=int(rng.integers(0, 2**31 - 1)),
    )  # fmt: skip
    if family == "gm":
        case.gm = dict(
            per_component=bool(rng.random() < 0.5),
            logstd_range=sorted(_pick(rng, (-10.0, 3.0), -10.0, 3.0) for _ in range(2)),
            mean_scale=float(rng.uniform(0.05, 4.0)),
            logweight_scale=_pick(rng, (0.0,), 0.0, 8.0, 0.1),
            drop=_pick(rng, (0.0,), 0.0, 0.9),
            drop_components=bool(rng.random() < 0.5),
            normalised=bool(rng.random() < 0.5),
        )
    else:
        case.dx = dict(
            grid_scale=float(rng.uniform(0.05, 4.0)),
            segment_size=_pick(rng, (1e-4, 1.0, 2.0), 1e-4, 2.0),
            policy_shift=_pick(rng, (0.5, 1.0, 5.0), 0.5, 5.0),
            mode=str(rng.choice(["grid", "polynomial"])),
        )
    return case


def gm_tensors(case: Case) -> dict[str, torch.Tensor]:
    """means, logweights, logstds, x_src, x, grad_u of a GM case, in its dtype."""
    g = torch.Generator().manual_seed(case.seed)
    p, (b, k, c, sp) = case.gm, (case.b, case.k, case.c, case.spatial)
    ones = [1] * len(sp)
    means = p["mean_scale"] * torch.randn(b, k, c, *sp, generator=g)
    lw = p["logweight_scale"] * torch.randn(b, k, 1, *sp, generator=g)
    drop_shape = (b, k, 1, *ones) if p["drop_components"] else lw.shape
    dropped = (torch.rand(drop_shape, generator=g) < p["drop"]).expand(lw.shape).clone()
    lonely = dropped.all(dim=1, keepdim=True)  # pixels left without a finite entry keep one, drawn at random
    keep = torch.randint(k, (b, 1, 1, *sp), generator=g)
    dropped &= ~(lonely & (torch.arange(k).reshape(1, k, 1, *ones) == keep))
    lw = lw.masked_fill(dropped, float("-inf"))
    if p["normalised"]:
        lw = lw.log_softmax(1)
    lo, hi = p["logstd_range"]
    ls = lo + (hi - lo) * torch.rand(b, k if p["per_component"] else 1, 1, *ones, generator=g)
    x_src = torch.randn(b, c, *sp, generator=g)
    x = x_src + case.x_offset * torch.randn(b, c, *sp, generator=g)
    grad_u = torch.randn(b, c, *sp, generator=g)
    dt = DTYPES[case.dtype]
    names = ("means", "logweights", "logstds", "x_src", "x", "grad_u")
    return {n: t.to(dt) for n, t in zip(names, (means, lw, ls, x_src, x, grad_u))}


def dx_tensors(case: Case) -> dict[str, torch.Tensor]:
    """grid, x_src, x, grad_u of a DX case, in its dtype."""
    g = torch.Generator().manual_seed(case.seed)
    grid = case.dx["grid_scale"] * torch.randn(case.b, case.k, case.c, *case.spatial, generator=g)
    x_src = torch.randn(case.b, case.c, *case.spatial, generator=g)
    x = x_src + case.x_offset * torch.randn(x_src.shape, generator=g)
    grad_u = torch.randn(x_src.shape, generator=g)
    dt = DTYPES[case.dtype]
    return {n: t.to(dt) for n, t in zip(("grid", "x_src", "x", "grad_u"), (grid, x_src, x, grad_u))}


# ------------------------------------------------------------------------------------------------ running one input


def _sigmas(case: Case, dtype=torch.float32) -> list[torch.Tensor]:
    values = (case.sigma_src, case.sigma, case.sigma_start, case.sigma_end)
    return [torch.tensor(v, dtype=torch.float32).to(dtype) for v in values]


def _reference(case: Case, t: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """velocity, d_<name> and rollout of the literal reference computed in ``dtype`` (float32 results cast to the
    case's dtype: the yardstick of the rule)."""
    from piflow_kernels import reference as R

    s_src, sigma, s0, s1 = _sigmas(case, dtype)
    names = GM_GRADS if case.family == "gm" else DX_GRADS
    leaves = {n: t[n].detach().to(dtype).requires_grad_() for n in names}
    if case.family == "gm":
        pol = lambda d: (d["means"], d["logweights"], d["logstds"], d["x_src"], s_src)  # noqa: E731
        velocity_of = lambda y, s, d: R.gm_velocity(y, s, *pol(d))  # noqa: E731
    else:
        p = case.dx
        args = (p["segment_size"], p["policy_shift"], p["mode"])
        velocity_of = lambda y, s, d: R.dx_velocity(y, s, d["grid"], d["x_src"], s_src, *args)  # noqa: E731
    u = velocity_of(leaves["x"], sigma, leaves)
    grads = torch.autograd.grad(u, list(leaves.values()), t["grad_u"].to(dtype))
    fixed = {n: v.detach() for n, v in leaves.items()}
    with torch.no_grad():
        x_end = R.rollout(lambda y, s: velocity_of(y, s, fixed), t["x"].to(dtype), s0, s1, case.total_substeps, case.shift)
    out = {"velocity": u.detach(), **{f"d_{n}": g for n, g in zip(names, grads)}, "rollout": x_end}
    if dtype == torch.float32:
        out = {n: v.to(DTYPES[case.dtype]) for n, v in out.items()}
    return out


def _policy_outputs(case: Case, t: dict, backend: str) -> tuple[object, dict[str, torch.Tensor]]:
    import piflow_kernels as pk

    s_src, sigma, s0, s1 = _sigmas(case)
    names = GM_GRADS if case.family == "gm" else DX_GRADS
    leaves = {n: t[n].clone().requires_grad_() for n in names}
    if case.family == "gm":
        pol = pk.GMFlowPolicy(leaves["means"], leaves["logweights"], leaves["logstds"], leaves["x_src"], s_src, backend=backend)
    else:
        p = case.dx
        pol = pk.DXPolicy(leaves["grid"], leaves["x_src"], s_src, segment_size=p["segment_size"], shift=p["policy_shift"],
                          mode=p["mode"], backend=backend)  # fmt: skip
    u = pol.velocity(leaves["x"], sigma)
    grads = torch.autograd.grad(u, list(leaves.values()), t["grad_u"])
    x_end = pol.rollout(t["x"], s0, s1, total_substeps=case.total_substeps, shift=case.shift)
    return pol, {"velocity": u.detach(), **{f"d_{n}": g for n, g in zip(names, grads)}, "rollout": x_end}


def _twin_rollout(case: Case, t: dict, pol) -> torch.Tensor:
    """The torch twin's own GM rollout (eager: PIFLOW_COMPILE=0 for the call; each new shape would compile)."""
    from piflow_kernels.ops.gm.torch_twin import gm_rollout_torch
    from piflow_kernels.ops.records import RolloutPlan

    _, _, s0, s1 = _sigmas(case)
    plan = RolloutPlan.build(s0, s1, case.total_substeps, case.shift)
    old = os.environ.get("PIFLOW_COMPILE")
    os.environ["PIFLOW_COMPILE"] = "0"
    try:
        return gm_rollout_torch(pol._flat(t["x"]), pol._tensors(), plan).reshape(t["x"].shape)
    finally:
        if old is None:
            del os.environ["PIFLOW_COMPILE"]
        else:
            os.environ["PIFLOW_COMPILE"] = old


@dataclass
class Verdict:
    """One output of one backend on one input under the rule."""

    err: float
    err32: float
    bound: float
    nonfinite: int  # NaN/inf elements where the float64 value fits the dtype, plus wrong overflows

    @property
    def ok(self) -> bool:
        return self.nonfinite == 0 and self.err <= self.bound

    @property
    def ratio(self) -> float:
        return math.inf if self.nonfinite else self.err / self.bound


def _max_rel(out: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """max |out - ref| / max(max |ref|, scale) (tests/conftest.py rel_err with a floor under the denominator); inf
    when out has NaN/inf."""
    out, ref = out.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).abs().max()) / max(float(ref.abs().max()), scale, 1e-30)


def logweights_grad_scale(case: Case, t: dict) -> float:
    """max |e_k| over the finite components, e_k = dL/dw_k (w the posterior weights): dL/dlogweights_k =
    w_k (e_k - sum_j w_j e_j) is formed to about eps * max |e| (float64 autograd of the reference included), so
    this floors its errors' denominator. e_k = <g, u_k - x / s'>, u_k the velocity of component k alone."""
    from piflow_kernels import reference as R

    d = {n: v.double() for n, v in t.items()}
    s_src, sigma, _, _ = _sigmas(case, torch.float64)
    s = sigma.clamp(min=R.gm.EPS).reshape(-1, *([1] * (d["x"].dim() - 1)))
    e = []
    for k in range(case.k):
        ls = d["logstds"][:, k : k + 1] if case.gm["per_component"] else d["logstds"]
        u_k = R.gm_velocity(d["x"], sigma, d["means"][:, k : k + 1], torch.zeros_like(d["logweights"][:, :1]), ls,
                            d["x_src"], s_src)  # fmt: skip
        e.append((d["grad_u"] * (u_k - d["x"] / s)).sum(1))
    e = torch.stack(e, 1)
    return float(e[torch.isfinite(d["logweights"][:, :, 0])].abs().max())


def velocity_floor(case: Case, t: dict) -> float:
    """The float64 reference's own rounding of the velocity (x - x0) / max(sigma, eps), as in tests/test_properties.py:
    4 * 2^-52 * max_b (|x| + n_terms (|x_src| + s_src |means or grid|)) / s'."""
    from piflow_kernels import reference as R

    points, eps, n_terms = (t["means"], R.gm.EPS, 1) if case.family == "gm" else (t["grid"], R.dx.EPS, case.k)
    s_src, sigma, _, _ = _sigmas(case, torch.float64)
    per_sample = lambda v: v.double().abs().flatten(1).amax(1)  # noqa: E731
    size = per_sample(t["x"]) + n_terms * (per_sample(t["x_src"]) + s_src * per_sample(points))
    return float((4 * 2.0**-52 * size / sigma.clamp(min=eps)).max())


def verdict(out, ref64, ref32, kind: str, dtype: str, scale: float = 0.0, literal: bool = False) -> Verdict:
    """The rule of tests/test_properties.py. Elements within a factor 2 of overflowing the output dtype (in float64)
    may be an infinity of the right sign and are left out of both errors; ``scale`` floors the errors' denominator;
    ``literal`` (the "reference" backend, the float32 equations themselves) may be non-finite where the float32
    reference is."""
    out, ref64, ref32 = out.detach(), ref64.detach(), ref32.detach()
    near = ref64.abs() > torch.finfo(out.dtype).max / 2
    wrong_inf = torch.isinf(out) & (out.double().sign() != ref64.sign())
    allowed = near & ~torch.isnan(out) & ~wrong_inf
    if literal:
        allowed |= ~torch.isfinite(ref32)
    nonfinite = int((~torch.isfinite(out) & ~allowed).sum())
    keep = ~near & torch.isfinite(out) & torch.isfinite(ref32) if literal else ~near & torch.isfinite(out)
    err, err32 = _max_rel(out[keep], ref64[keep], scale), _max_rel(ref32[~near], ref64[~near], scale)
    bound = math.inf if err32 >= 1 else max(TOL[kind][dtype], 2 * err32 + FLOOR)
    return Verdict(err, err32, bound, nonfinite)


def run_case(case: Case, triton: bool) -> dict[str, dict[str, Verdict]]:
    """{backend row: {output: Verdict}} for one input."""
    t = gm_tensors(case) if case.family == "gm" else dx_tensors(case)
    ref64 = _reference(case, t, torch.float64)
    ref32 = _reference(case, t, torch.float32)
    kind = lambda name: "velocity" if name == "velocity" else "rollout" if name == "rollout" else "grad"  # noqa: E731
    scales = {"velocity": velocity_floor(case, t)}
    if case.family == "gm":
        scales["d_logweights"] = logweights_grad_scale(case, t)

    def judge(outs: dict, literal: bool = False) -> dict[str, Verdict]:
        return {n: verdict(o, ref64[n], ref32[n], kind(n), case.dtype, scales.get(n, 0.0), literal) for n, o in outs.items()}

    rows = {}
    for backend in ("torch", "reference") + (("triton",) if triton else ()):
        pol, outs = _policy_outputs(case, t, backend)
        if case.family == "gm" and backend == "torch":
            from piflow_kernels.ops.gm import native

            if native.available():  # the torch backend's GM rollout on CPU is the native loop
                rows["native"] = judge({"rollout": outs.pop("rollout")})
            rows["twin"] = judge({"rollout": _twin_rollout(case, t, pol)})
        rows[backend] = judge(outs, backend == "reference")
    return rows


# ------------------------------------------------------------------------------------------------ the report


@dataclass
class Row:
    """What the report keeps per (family, backend, dtype)."""

    n: int = 0
    nonfinite: int = 0  # inputs with a NaN/inf output where the float64 value fits the dtype
    failures: int = 0  # inputs failing the rule
    beyond_fp32: int = 0  # inputs with an output the float32 reference gets wholly wrong (err32 >= 1)
    worst_err: dict = field(default_factory=dict)  # output -> worst err where err32 < 1
    worst_err_any: dict = field(default_factory=dict)  # output -> worst err over every input
    worst_ratio: float = 0.0  # worst err / bound over outputs and inputs
    worst: dict | None = None  # the input with the worst ratio, its output and figures

    def add(self, case: Case, verdicts: dict[str, Verdict]) -> None:
        self.n += 1
        self.nonfinite += any(v.nonfinite for v in verdicts.values())
        self.failures += not all(v.ok for v in verdicts.values())
        self.beyond_fp32 += any(v.err32 >= 1 for v in verdicts.values())
        for name, v in verdicts.items():
            self.worst_err_any[name] = max(self.worst_err_any.get(name, 0.0), v.err)
            if v.err32 < 1:
                self.worst_err[name] = max(self.worst_err.get(name, 0.0), v.err)
            if self.worst is None or v.ratio > self.worst_ratio:
                self.worst_ratio = max(self.worst_ratio, v.ratio)
                self.worst = {"output": name, **asdict(v), "case": asdict(case)}


def _column(name: str) -> str:
    return "d_means|grid" if name in ("d_means", "d_grid") else name


def format_table(rows: dict[tuple[str, str, str], Row]) -> str:
    head = ["family", "backend", "dtype", "n", "NaN/inf", "fails", "beyond", *COLUMNS, "worst err/bound"]
    lines = [head]
    for (family, backend, dtype), row in sorted(rows.items()):
        errs = {_column(n): e for n, e in row.worst_err.items()}
        cells = [f"{errs[c]:.1e}" if c in errs else "-" for c in COLUMNS]
        lines.append([family, backend, dtype, str(row.n), str(row.nonfinite), str(row.failures), str(row.beyond_fp32), *cells,
                      f"{row.worst_ratio:.2f}"])  # fmt: skip
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def worst_cases(rows: dict[tuple[str, str, str], Row]) -> str:
    out = []
    for (family, backend, dtype), row in sorted(rows.items()):
        w = row.worst
        if w is None:
            continue
        c = w["case"]
        extra = c["gm"] if family == "gm" else c["dx"]
        out.append(
            f"{family} {backend} {dtype}: input {c['index']} {w['output']} err {w['err']:.3g} fp32-ref {w['err32']:.3g} "
            f"bound {w['bound']:.3g} nonfinite {w['nonfinite']} | B{c['b']} {'K' if family == 'gm' else 'N'}{c['k']} "
            f"C{c['c']} {'x'.join(map(str, c['spatial']))} sigma_src {c['sigma_src']} sigma {c['sigma']} "
            f"start {c['sigma_start']} end {c['sigma_end']} T{c['total_substeps']} shift {c['shift']:.3g} "
            f"x_offset {c['x_offset']:.3g} {extra}"
        )
    return "\n".join(out)


def run(n: int, triton_n: int, seed: int, only: list[int] | None = None, progress: bool = True,
        on_case: Callable[[Case, dict], None] | None = None) -> tuple[dict, list[dict], float]:  # fmt: skip
    """Run inputs 0..n-1 (or ``only``); returns (rows, failures, seconds)."""
    from tqdm.auto import tqdm

    rows: dict[tuple[str, str, str], Row] = {}
    failures: list[dict] = []
    triton_left = triton_n
    t0 = time.perf_counter()
    indices = only if only is not None else range(n)
    for i in tqdm(indices, disable=not progress, desc="fuzz", smoothing=0.05):
        case = draw_case(seed, i)
        use_triton = triton_left > 0 and case.tiny
        triton_left -= use_triton
        try:
            result = run_case(case, use_triton)
        except Exception as err:  # a valid input must never raise: record it as a failure of every row
            failures.append({"case": asdict(case), "error": f"{type(err).__name__}: {err}"})
            continue
        for backend, verdicts in result.items():
            rows.setdefault((case.family, backend, case.dtype), Row()).add(case, verdicts)
            bad = {k: asdict(v) for k, v in verdicts.items() if not v.ok}
            if bad and len(failures) < 500:
                failures.append({"backend": backend, "outputs": bad, "case": asdict(case)})
        if on_case is not None:
            on_case(case, result)
    return rows, failures, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="random inputs (half GM, half DX)")
    parser.add_argument("--triton-n", type=int, default=600, help="inputs (tiny shapes) also run on the Triton backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="comma-separated input indices to rerun (e.g. a reported worst case)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows, the failures and the run's settings")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the inputs are tiny, and two "
        "threads made one softmax over a (2, 3, 1, 3, 3) tensor take 15 ms on a loaded 2-core machine)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    from bench.timing import device_name, git_commit, versions

    only = [int(i) for i in args.only.split(",")] if args.only else None
    rows, failures, seconds = run(args.n, args.triton_n, args.seed, only, progress=not args.no_progress)
    n_inputs = len(only) if only else args.n
    print(f"{n_inputs} inputs in {seconds:.0f} s ({seconds / max(n_inputs, 1) * 1e3:.0f} ms each), seed {args.seed}")
    print("worst relative error vs float64 per output, over the inputs where the float32 reference keeps a digit (err32 < 1);\n"
          "NaN/inf: inputs with a non-finite output the dtype could hold; fails: inputs failing the rule; beyond: inputs\n"
          "with an output the float32 reference gets wholly wrong (only finiteness is checked there)")  # fmt: skip
    print(format_table(rows))
    print("\nworst input per row (by err / bound):")
    print(worst_cases(rows))
    raised = [f for f in failures if "error" in f]
    if raised:
        print(f"\n{len(raised)} inputs raised:")
        for f in raised[:20]:
            print(f"  input {f['case']['index']}: {f['error']}")
    if args.json:
        doc = {
            "settings": {"n": args.n, "triton_n": args.triton_n, "seed": args.seed, "only": only, "floor": FLOOR, "tol": TOL},
            "device": device_name("cpu"), "versions": versions(), "commit": git_commit(), "seconds": seconds,
            "rows": [{"family": f, "backend": b, "dtype": d, **asdict(r)} for (f, b, d), r in sorted(rows.items())],
            "failures": failures,
        }  # fmt: skip
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 1 if any(r.failures for r in rows.values()) or raised else 0


if __name__ == "__main__":
    sys.exit(main())
