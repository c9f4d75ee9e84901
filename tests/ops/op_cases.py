"""What the op tests share: implementations by name, input makers, float64 references, CUDA helpers.

Each op's equation lives in ``piflow_kernels.reference`` and its fast twins in ``piflow_kernels.ops.<gm,dx>``,
named ``<op>_<implementation>``; :func:`implementation` looks them up by those names:

    implementation("gm_velocity", "torch")      piflow_kernels.ops.gm.torch_twin.gm_velocity_torch
    implementation("gm_rollout", "native")      piflow_kernels.ops.gm.native.gm_rollout_native
    implementation("dx_velocity", "triton")     piflow_kernels.ops.dx.triton_velocity.dx_velocity_triton
    implementation("dx_rollout", "reference")   piflow_kernels.ops.dx.oracle.dx_rollout_reference

Inputs are fresh random tensors (never zeros) with batch-varying sigmas, in the flat layout of
:mod:`piflow_kernels.ops.records` (``gm_inputs``, ``dx_inputs``, ``*_flat``) or in the policies'
(B, C, *spatial) layout (``make_gm``, ``ref_gm_velocity``, ``ref_gm_rollout``, ``*_nd_*``, ``ref_dx_*``).
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from conftest import capture_cuda_graph, compiled_step_error, rel_err

import piflow_kernels as pk
from piflow_kernels import reference
from piflow_kernels.constants import DX_EPS
from piflow_kernels.ops.dx import triton_common as dx_common
from piflow_kernels.ops.gm import triton_common as gm_common
from piflow_kernels.ops.records import DXSegment, DXTensors, GMTensors
from piflow_kernels.timesteps import unwarp

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_IDS = {dt: name for name, dt in DTYPES.items()}
# with a GPU the Triton kernels are compiled and need CUDA tensors; without one they run in the interpreter on CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# the implementations of each op, by the suffix of their function names
IMPLEMENTATIONS = {
    "gm_velocity": ("torch", "triton", "reference"),
    "gm_rollout": ("torch", "native", "triton", "reference"),
    "dx_velocity": ("torch", "triton", "reference"),
    "dx_rollout": ("torch", "triton", "reference"),
}
_MODULES = {"torch": "torch_twin", "native": "native", "triton": "triton_{kind}", "reference": "oracle"}


def implementation(op: str, name: str):
    """The function ``<op>_<name>`` of ``piflow_kernels.ops.<family>``; skips the test where it cannot run."""
    family, kind = op.split("_")
    module = importlib.import_module(f"piflow_kernels.ops.{family}.{_MODULES[name].format(kind=kind)}")
    if name == "native" and not module.available():
        pytest.skip("no C compiler for the native CPU rollout")
    return getattr(module, f"{op}_{name}")


def device_for(name: str) -> str:
    """Where an implementation (or backend) is tested: Triton on DEVICE, the CPU paths on the CPU."""
    return DEVICE if name == "triton" else "cpu"


def skip_if_interpreted() -> None:
    """The CUDA tests need compiled kernels."""
    if gm_common.INTERPRET or dx_common.interpreted():
        pytest.skip("kernels were loaded for the interpreter; run the CUDA tests with TRITON_INTERPRET=0")


def assert_per_pixel_pointers_unaligned(kernel) -> None:
    """Every pointer to a per-pixel tensor is in UNALIGNED: one 16-byte-aligned per-pixel pointer lets Triton
    vectorize along L, and the compute layout then spreads pixels over threads (shuffles and barriers in the
    substep loop). Only per-sample (B,) or (B, K) vectors (the variances) and the logstds partials may be aligned."""
    per_sample = {"p_sigma", "p_ssrc", "p_var", "p_s0", "p_n", "p_h", "p_r0", "p_dls"}
    pointers = {p for p in inspect.signature(kernel.fn).parameters if p.startswith("p_")}
    assert pointers - per_sample <= set(gm_common.UNALIGNED), kernel.fn.__name__


# (budget, num_warps) per GM kernel: the GPU check's sweep points at their extremes
LAUNCH_KNOBS = [
    {"fwd": (16, 1), "bwd": (16, 8), "rollout": (128, 1)},
    {"fwd": (128, 8), "bwd": (64, 2), "rollout": (64, 8)},
]
LAUNCH_KNOB_IDS = ["small-chunks", "large-chunks"]


def set_launch_knobs(monkeypatch, knobs: dict, kernels: tuple[str, ...]) -> None:
    for name in kernels:
        budget, warps = knobs[name]
        monkeypatch.setitem(gm_common.LAUNCH, name, {"budget": budget, "num_warps": warps})


# ------------------------------------------------------------------------------------------------ GM


def _strided(shape, gen, noncontig):
    """A random float32 tensor of ``shape``; with ``noncontig`` a permuted view whose last axis has stride > 1."""
    if not noncontig:
        return torch.randn(shape, generator=gen)
    *lead, c, n = shape
    return torch.randn(*lead, n, c, generator=gen).transpose(-1, -2)


def gm_inputs(b, k, c, length, *, per_component, neg_inf, dtype, noncontig=False, scale=1.0, seed=0, device="cpu"):
    """A flat GM policy and a query point: (x, sigma, GMTensors), sigma (B,) batch-varying below sigma_src."""
    gen = torch.Generator().manual_seed(seed)
    means = (scale * _strided((b, k, c, length), gen, noncontig)).to(dtype)
    lw = torch.randn(b, k, length, generator=gen)
    if neg_inf and k > 1:
        lw[:, 0] = float("-inf")  # a component dropped everywhere
        lw[0, -1, 0] = float("-inf")  # and another at a single pixel
    lw = lw.log_softmax(1).to(dtype)
    ls = (torch.randn(b, k if per_component else 1, generator=gen) * 0.3 - 0.7).to(dtype)
    x_src = _strided((b, c, length), gen, noncontig).to(dtype)
    x = (x_src.float() + 0.5 * torch.randn(b, c, length, generator=gen)).to(dtype)
    if noncontig:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    sigma_src = torch.rand(b, generator=gen) * 0.5 + 0.45
    sigma = sigma_src * (torch.rand(b, generator=gen) * 0.6 + 0.3)  # batch-varying, below sigma_src
    policy = GMTensors(*(t.to(device) for t in (means, lw, ls, x_src, sigma_src)))
    return x.to(device), sigma.to(device), policy


def gm_rollout_inputs(b, k, c, length, *, seed=0, **kwargs):
    """(x_start, GMTensors, sigma_start, sigma_end): batch-varying substep counts, the last sample to sigma 0."""
    x, _, policy = gm_inputs(b, k, c, length, seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    sigma_src = policy.sigma_src.cpu()
    sigma_start = sigma_src * (torch.rand(b, generator=gen) * 0.3 + 0.7)
    sigma_end = sigma_start * torch.rand(b, generator=gen) * 0.8
    sigma_end[-1] = 0.0  # one sample integrates all the way to the data
    return x, policy, sigma_start.to(x.device), sigma_end.to(x.device)


def gm_case_id(case) -> str:
    """(B, K, C, L, std per component, -inf logweights, non-contiguous) -> B2-K3-C5-L63-std-per-comp-neginf."""
    b, k, c, length, per, neg, nc = case
    std = "std-per-comp" if per else "std-per-sample"
    return f"B{b}-K{k}-C{c}-L{length}-{std}" + ("-neginf" if neg else "") + ("-noncontig" if nc else "")


def ref_gm_velocity_flat(x, sigma, policy: GMTensors):
    """reference.gm_velocity in float64 on the flat layout (float64 leaves keep their autograd graph)."""
    means, lw, ls, x_src, sigma_src = (t.double() for t in policy)
    return reference.gm_velocity(x.double(), sigma.double(), means, lw[:, :, None], ls[:, :, None, None], x_src, sigma_src)


def ref_gm_rollout_flat(x_start, policy: GMTensors, sigma_start, sigma_end, total, shift):
    """reference.rollout of the float64 reference GM velocity."""
    velocity = lambda x, s: ref_gm_velocity_flat(x, s, policy)  # noqa: E731
    return reference.rollout(velocity, x_start.double(), sigma_start.double(), sigma_end.double(), total, shift)


# (B, K, C, spatial): policies in the (B, K, C, *spatial) layout
GM_ND_CASES = [
    (2, 1, 1, (7, 9)),
    (2, 3, 5, (7, 9)),
    (3, 8, 16, (4, 5)),
    (2, 32, 4, (6, 6)),
    (2, 3, 5, (2, 3, 5)),  # 5D video latent
    (1, 8, 1, (3, 11)),
]


def gm_nd_case_id(case) -> str:
    b, k, c, sp = case
    return f"B{b}-K{k}-C{c}-{'x'.join(map(str, sp))}"


def make_gm(b, k, c, spatial, dtype=torch.float32, per_component=True, neg_inf=False, seed=0):
    """[means, logweights, logstds, x_src, sigma_src] of a GM policy in the policies' (B, K, C, *spatial) layout."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(b, k, c, *spatial, generator=g)
    lw = torch.randn(b, k, 1, *spatial, generator=g)
    if neg_inf and k > 1:
        lw[:, 0] = float("-inf")  # a dropped component everywhere
        lw[0, -1, 0, ..., 0] = float("-inf")  # and one more at a single pixel
    lw = lw.log_softmax(1)
    ls = torch.randn(b, k if per_component else 1, 1, *([1] * len(spatial)), generator=g) * 0.3 - 0.7
    x_src = torch.randn(b, c, *spatial, generator=g)
    sigma_src = torch.rand(b, generator=g) * 0.6 + 0.4
    return [t.to(dtype) for t in (means, lw, ls, x_src)] + [sigma_src]


def gm_flat(means, lw, ls, x_src, sigma_src) -> GMTensors:
    """The flat record of policy tensors in the (B, K, C, *spatial) layout."""
    b, k, c = means.shape[:3]
    return GMTensors(means.reshape(b, k, c, -1), lw.reshape(b, k, -1), ls.reshape(b, ls.shape[1]), x_src.reshape(b, c, -1),
                     torch.as_tensor(sigma_src, dtype=torch.float32).expand(b))  # fmt: skip


def ref_gm_velocity(x, sigma, means, lw, ls, x_src, sigma_src):
    """reference.gm_velocity in float64 on the (B, C, *spatial) layout; sigmas may be floats."""
    d = lambda t: torch.as_tensor(t).double()  # noqa: E731
    return reference.gm_velocity(d(x), d(sigma), d(means), d(lw), d(ls), d(x_src), d(sigma_src))


def ref_gm_rollout(x_start, sigma_start, sigma_end, total, shift, means, lw, ls, x_src, sigma_src):
    """reference.rollout of :func:`ref_gm_velocity` (sigmas may be floats)."""
    velocity = lambda x, s: ref_gm_velocity(x, s, means, lw, ls, x_src, sigma_src)  # noqa: E731
    d = lambda t: torch.as_tensor(t).double()  # noqa: E731
    return reference.rollout(velocity, x_start.double(), d(sigma_start), d(sigma_end), total, shift)


def gm_cuda_policy(b, k, c, spatial, dtype=torch.float32, per_component=False, seed=0, scale=1.0):
    """A CUDA GMFlowPolicy on backend="triton" with one dropped component, and the generator that made it
    (skips the test where the kernels run in the interpreter)."""
    skip_if_interpreted()
    gen = torch.Generator().manual_seed(seed)
    means = (scale * torch.randn(b, k, c, *spatial, generator=gen)).to("cuda", dtype)
    lw = torch.randn(b, k, 1, *spatial, generator=gen)
    if k > 1:
        lw[:, 0] = float("-inf")  # one dropped component
    lw = lw.log_softmax(1).to("cuda", dtype)
    ls = (torch.randn(b, k if per_component else 1, 1, *([1] * len(spatial)), generator=gen) * 0.3 - 0.7).to("cuda", dtype)
    x_src = torch.randn(b, c, *spatial, generator=gen).to("cuda", dtype)
    sigma_src = (0.5 + 0.45 * torch.rand(b, generator=gen)).cuda()
    return pk.GMFlowPolicy(means, lw, ls, x_src, sigma_src, backend="triton"), gen


def gm_cuda_case_id(case) -> str:
    """(B, K, C, spatial, std per component, scale, ...) -> B64-K32-C4-32x32-std-per-sample."""
    b, k, c, sp, per = case[:5]
    return f"B{b}-K{k}-C{c}-{'x'.join(map(str, sp))}-{'std-per-comp' if per else 'std-per-sample'}"


def ref_gm_velocity_of(pol, x, sigma):
    """The float64 reference velocity of a GMFlowPolicy's own tensors."""
    return ref_gm_velocity(x, sigma, pol.means, pol.logweights, pol.logstds, pol.x_src, pol.sigma_src)


# ------------------------------------------------------------------------------------------------ DX

DX_B = 3
DX_SIGMA_SRC = [0.93, 0.61, 1.0]
DX_SIGMA = [0.71, 0.27, 0.88]  # batch-varying, inside each sample's segment or not


def vec(values, dtype=torch.float32, device=DEVICE):
    return torch.tensor(values, dtype=dtype, device=device)


def dx_inputs(n, c, spatial, dtype, seed, device=DEVICE):
    """(grid (B, N, C, *spatial), x_src, x) for B = DX_B samples; x near x_src."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randn(DX_B, n, c, *spatial, generator=gen).to(device, dtype)
    x_src = torch.randn(DX_B, c, *spatial, generator=gen).to(device, dtype)
    x = (x_src.float() + 0.3 * torch.randn(DX_B, c, *spatial, generator=gen).to(device)).to(dtype)
    return grid, x_src, x


def dx_segment(sigma_src, segment_size, shift, mode="grid") -> DXSegment:
    """The segment record a DXPolicy builds for these settings."""
    r_src = unwarp(sigma_src, shift)
    r_dst = (r_src - segment_size).clamp(min=0.0)
    seg = (r_src - r_dst).clamp(min=DX_EPS)
    return DXSegment(r_src, r_dst, seg, float(shift), mode == "polynomial", float(segment_size))


def dx_flat(grid, x_src, sigma_src, segment_size, shift, mode="grid") -> DXTensors:
    """The flat record of a DX policy given in the (B, N, C, *spatial) layout."""
    b, n, c = grid.shape[:3]
    sigma_src = torch.as_tensor(sigma_src, dtype=torch.float32, device=grid.device)
    return DXTensors(grid.reshape(b, n, c, -1), x_src.reshape(b, c, -1), sigma_src,
                     dx_segment(sigma_src, segment_size, shift, mode))  # fmt: skip


def dx_case_id(case, first: str, second: str) -> str:
    """(N, C, spatial, mode, a, b, dtype) -> N5-C16-7x9-grid-<first>3.2-<second>0.5-fp32."""
    n, c, spatial, mode, a, b, dtype = case
    return f"N{n}-C{c}-{'x'.join(map(str, spatial))}-{mode}-{first}{a}-{second}{b}-{DTYPE_IDS[dtype]}"


# (B, N, C, spatial): policies in the (B, N, C, *spatial) layout
DX_ND_CASES = [(2, 1, 3, (7, 9)), (2, 2, 5, (7, 9)), (3, 5, 16, (4, 5)), (2, 4, 1, (2, 3, 5))]


def dx_nd_case_id(case) -> str:
    b, n, c, sp = case
    return f"B{b}-N{n}-C{c}-{'x'.join(map(str, sp))}"


def dx_nd_inputs(b, n, c, spatial, seed, device="cpu"):
    """(grid (B, N, C, *spatial), x_src, sigma_src) on ``device`` and the (CPU) generator for what the test draws next."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randn(b, n, c, *spatial, generator=gen)
    x_src = torch.randn(b, c, *spatial, generator=gen)
    sigma_src = torch.rand(b, generator=gen) * 0.6 + 0.4
    return grid.to(device), x_src.to(device), sigma_src.to(device), gen


def parametrize_dx_policies(test):
    """Over DX_ND_CASES, both modes, policy shifts 1 and 3.2 and the three backends
    (ids: torch-B2-N1-C3-7x9-grid-shift1.0)."""
    marks = [
        pytest.mark.parametrize("shift", [1.0, 3.2], ids=lambda s: f"shift{s}"),
        pytest.mark.parametrize("mode", ["grid", "polynomial"]),
        pytest.mark.parametrize("case", DX_ND_CASES, ids=dx_nd_case_id),
        pytest.mark.parametrize("backend", ("torch", "triton", "reference")),
    ]
    for mark in reversed(marks):  # as decorators stack: the backend first in the id
        test = mark(test)
    return test


def ref_dx_velocity(x, sigma, grid, x_src, sigma_src, segment_size, shift, mode="grid"):
    """reference.dx_velocity in float64; sigmas may be lists, floats or tensors."""
    d = lambda t: torch.as_tensor(t, dtype=torch.float64, device=x.device)  # noqa: E731
    return reference.dx_velocity(x.double(), d(sigma), grid.double(), x_src.double(), d(sigma_src), segment_size, shift, mode)


def ref_dx_rollout(x_start, sigma_start, sigma_end, total, shift, grid, x_src, sigma_src, segment_size, policy_shift,
                   mode="grid"):  # fmt: skip
    """reference.rollout of :func:`ref_dx_velocity` (policy_shift: the policy's own shift)."""
    velocity = lambda x, s: ref_dx_velocity(x, s, grid, x_src, sigma_src, segment_size, policy_shift, mode)  # noqa: E731
    d = lambda t: torch.as_tensor(t, dtype=torch.float64, device=x_start.device)  # noqa: E731
    return reference.rollout(velocity, x_start.double(), d(sigma_start), d(sigma_end), total, shift)


def dx_cuda_policy(b, n, c, spatial, dtype=torch.float32, seed=0, shift=3.0, mode="grid"):
    """A CUDA DXPolicy on backend="triton" (segment size 0.6), and the generator that made it (skips the test
    where the kernels run in the interpreter)."""
    skip_if_interpreted()
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randn(b, n, c, *spatial, generator=gen).to("cuda", dtype)
    x_src = torch.randn(b, c, *spatial, generator=gen).to("cuda", dtype)
    sigma_src = (0.6 + 0.4 * torch.rand(b, generator=gen)).cuda()
    pol = pk.DXPolicy(grid, x_src, sigma_src, segment_size=0.6, shift=shift, mode=mode, backend="triton")
    return pol, gen


# ------------------------------------------------------------------------------------------------ both


def cuda_compiled_step_error(pol, gen) -> float:
    """conftest.compiled_step_error of ``pol`` (a CUDA policy of batch 4) from a random x, sigma 0.7 to 0.2."""
    x = torch.randn(pol.x_src.shape, generator=gen).cuda()
    sigma, s_end = torch.full((4,), 0.7, device="cuda"), torch.full((4,), 0.2, device="cuda")
    return compiled_step_error(pol, x, sigma, s_end)


def cuda_graph_replay_error(pol, gen, total: int, new_target: bool) -> float:
    """rel_err between a rollout of ``pol`` recorded into a CUDA graph, then replayed on a new x_start (and with
    ``new_target`` a new sigma_end: new substep counts, on the device only), and the same rollout run eagerly."""
    x_in = torch.randn(pol.x_src.shape, generator=gen).cuda()
    s0 = (0.5 + 0.5 * torch.rand(pol.x_src.shape[0], generator=gen)).cuda()
    s1 = s0 * 0.3
    graph, x_out = capture_cuda_graph(lambda: pol.rollout(x_in, s0, s1, total_substeps=total, shift=3.0))
    x_in.copy_(torch.randn(x_in.shape, generator=gen).cuda())
    if new_target:
        s1.copy_(s0 * 0.1)
    graph.replay()
    return rel_err(x_out, pol.rollout(x_in, s0, s1, total_substeps=total, shift=3.0))


def peak_bytes(fn) -> int:
    """Peak CUDA memory allocated by ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ------------------------------------------------------------------------------------------------ GM: the edges of the domain

GM_GRAD_NAMES = ("means", "logweights", "logstds", "x_src", "x")


def gm_edge_inputs(b, k, c, length, sigma_src, sigma_ratio, *, per_component, seed, logstd_range=(-10.0, 3.0)):
    """(x, sigma, GMTensors), float32 on the CPU: a policy at sigma_src with logstds uniform in ``logstd_range``
    (per component or one per sample) and x drawn apart from x_src, queried at sigma = sigma_ratio * sigma_src."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(b, k, c, length, generator=gen)
    lw = torch.randn(b, k, length, generator=gen).log_softmax(1)
    lo, hi = logstd_range
    ls = torch.rand(b, k if per_component else 1, generator=gen) * (hi - lo) + lo
    x_src = torch.randn(b, c, length, generator=gen)
    x = torch.randn(b, c, length, generator=gen)
    s_src = torch.full((b,), float(sigma_src))
    return x, s_src * sigma_ratio, GMTensors(means, lw, ls, x_src, s_src)


def gm_value_and_grads(fn, x, sigma, policy: GMTensors, grad_u, dtype, device="cpu") -> list[torch.Tensor]:
    """[u, dL/dmeans, dL/dlogweights, dL/dlogstds, dL/dx_src, dL/dx] on the CPU, L = <grad_u, fn(x, sigma, policy)>,
    with every leaf (and sigma, for float64) cast to ``dtype`` on ``device``; u in the dtype ``fn`` returns."""
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in (*policy[:4], x)]
    s64 = dtype == torch.float64
    sig, s_src = (t.to(device, torch.float64 if s64 else torch.float32) for t in (sigma, policy.sigma_src))
    u = fn(leaves[4], sig, GMTensors(*leaves[:4], s_src))
    grads = torch.autograd.grad(u, leaves, grad_u.to(device, u.dtype))
    return [t.detach().cpu() for t in (u, *grads)]


def rel_err_floored(out: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    """rel_err with max |ref| floored at ``floor`` (a reference that is 0 in exact arithmetic is only rounding noise)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / max(float(ref.abs().max()), floor, 1e-30))
