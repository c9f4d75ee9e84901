"""Benchmark cases: shapes, random inputs and the cost model of docs/design.md#performance-model.

A case is one workload (a GM rollout, a DX rollout or a GM velocity forward+backward) at one shape.
Its cost model gives the bytes a fused kernel must move at least once and the flops it must do,
from which the roofline time is max(bytes / copy bandwidth, flops / fp32 peak).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

KINDS = ("gm_rollout", "dx_rollout", "gm_velocity_fwd_bwd")


@dataclass(frozen=True)
class Case:
    """One benchmark workload.

    Args:
        name: short label ("imagenet-train", "flux-1024", ...).
        kind: one of ``KINDS``.
        batch, components (K for GM, N grid points for DX), channels, spatial: the latent shape.
        substeps: substeps of the rollout from sigma 1 to 0 (total_substeps); 1 for a velocity.
        shift: the rollout's time shift (and the DX policy's).
    """

    name: str
    kind: str
    batch: int
    components: int
    channels: int
    spatial: tuple[int, ...]
    substeps: int = 1
    shift: float = 1.0
    tags: tuple[str, ...] = field(default=())

    @property
    def pixels(self) -> int:
        """B * prod(spatial): the number of independent per-pixel problems."""
        return self.batch * math.prod(self.spatial)

    @property
    def shape(self) -> str:
        letter = "N" if self.kind == "dx_rollout" else "K"
        return f"B{self.batch}-{letter}{self.components}-C{self.channels}-{'x'.join(map(str, self.spatial))}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = self.shape
        return d


def cost(case: Case, element_size: int = 4) -> tuple[float, float]:
    """(bytes, flops) a fused kernel needs for the case, docs/design.md#performance-model.

    GM rollout: means K*C, logweights K, x_start, x_src and x_end C each per pixel, moved once;
    K*(4C + 10) flops per pixel and substep (two K x C contractions plus the softmax).
    DX rollout: grid N*C plus 3C per pixel once; the substep recurrence is per-sample scalar work, so
    about C*(2N + 4) flops per pixel.
    GM velocity forward+backward: the forward reads the policy, x and x_src and writes u; the backward
    reads them again with grad_u and writes the policy gradients: 3(K*C + K) + 6C per pixel, and about
    three times the forward's K*(4C + 10) flops.
    """
    k, c, px = case.components, case.channels, case.pixels
    if case.kind == "gm_rollout":
        return px * (k * c + k + 3 * c) * element_size, px * case.substeps * k * (4 * c + 10)
    if case.kind == "dx_rollout":
        return px * (k * c + 3 * c) * element_size, px * c * (2 * k + 4)
    if case.kind == "gm_velocity_fwd_bwd":
        return px * (3 * (k * c + k) + 6 * c) * element_size, 3 * px * k * (4 * c + 10)
    raise ValueError(f"unknown case kind {case.kind!r}")


def _table(train: Case, flux: Case, video: Case, dx_grid: int, velocity_tags: tuple[str, ...] = ()) -> list[Case]:
    """A table's five workloads in its order: the GM rollouts at the training, FLUX and video shapes, then a DX
    rollout (``dx_grid`` grid points) and a GM velocity forward+backward at the training shape."""
    return [
        train,
        flux,
        video,
        replace(train, kind="dx_rollout", components=dx_grid, tags=()),
        replace(train, kind="gm_velocity_fwd_bwd", substeps=1, tags=velocity_tags),
    ]


def case_list(device: str, quick: bool) -> list[Case]:
    """The benchmark table's cases for a device ("cpu" or "cuda"), full or quick."""
    if device == "cuda" and not quick:
        return _table(
            Case("imagenet-train", "gm_rollout", 512, 32, 4, (32, 32), 128, tags=("target-train",)),
            Case("flux-1024", "gm_rollout", 1, 8, 16, (128, 128), 32, shift=3.0, tags=("target-flux",)),
            Case("video-5d", "gm_rollout", 1, 8, 16, (8, 40, 40), 32, shift=3.0),
            dx_grid=10,
            velocity_tags=("target-velocity",),
        )
    if device == "cuda":
        return _table(
            Case("imagenet-train-q", "gm_rollout", 64, 32, 4, (32, 32), 128),
            Case("flux-512", "gm_rollout", 1, 8, 16, (64, 64), 32, shift=3.0),
            Case("video-5d-q", "gm_rollout", 1, 8, 16, (4, 20, 20), 32, shift=3.0),
            dx_grid=10,
        )
    if not quick:
        return [
            Case("cpu-target", "gm_rollout", 16, 32, 4, (32, 32), 128, tags=("target-cpu",)),
            *_table(
                Case("imagenet-train", "gm_rollout", 64, 32, 4, (32, 32), 128),
                Case("flux-1024", "gm_rollout", 1, 8, 16, (128, 128), 32, shift=3.0),
                Case("video-5d", "gm_rollout", 1, 8, 16, (8, 40, 40), 32, shift=3.0),
                dx_grid=10,
            ),
        ]
    return _table(
        Case("tiny-train", "gm_rollout", 4, 8, 4, (16, 16), 32),
        Case("tiny-flux", "gm_rollout", 1, 8, 16, (24, 24), 8, shift=3.0),
        Case("tiny-video", "gm_rollout", 1, 4, 16, (2, 8, 8), 8, shift=3.0),
        dx_grid=5,
    )


def gm_inputs(case: Case, device: str | torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random GM policy for a case: means (B,K,C,*S), logweights (B,K,1,*S), logstds (B,1,1,*1),
    x_src (B,C,*S), sigma_src (B,) = 1 (a policy predicted from pure noise)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, k, c, sp = case.batch, case.components, case.channels, case.spatial
    ones = (1,) * len(sp)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    return dict(
        means=rnd(b, k, c, *sp),
        logweights=torch.log_softmax(rnd(b, k, 1, *sp, scale=2.0).float(), dim=1).to(dtype),
        logstds=(rnd(b, 1, 1, *ones, scale=0.2).float() - 1.0).to(dtype),
        x_src=rnd(b, c, *sp),
        sigma_src=torch.ones(b, device=device),
    )


def dx_inputs(case: Case, device: str | torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random DX policy for a case: grid (B,N,C,*S), x_src (B,C,*S), sigma_src (B,) = 1."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, n, c, sp = case.batch, case.components, case.channels, case.spatial
    return dict(
        grid=torch.randn(b, n, c, *sp, generator=gen).to(device=device, dtype=dtype),
        x_src=torch.randn(b, c, *sp, generator=gen).to(device=device, dtype=dtype),
        sigma_src=torch.ones(b, device=device),
    )


def gm_kernel_launches(
    b: int, k: int, c: int, length: int, substeps: int, device: str | torch.device, per_component: bool = False, seed: int = 3
) -> dict[str, tuple[str, object]]:
    """Each GM Triton kernel launched alone through its launcher, at a (B, K, C, L) float32 shape:
    {"fwd" | "bwd" | "rollout": (kernel function name, zero-argument call)}. The machine-code report
    (``bench.sass``) compiles these calls; the GPU check's sweep times them."""
    from piflow_kernels.ops.gm import triton_rollout, triton_velocity
    from piflow_kernels.ops.records import GMTensors, RolloutPlan

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device)

    means, x_src = rnd(b, k, c, length), rnd(b, c, length)
    lw = torch.log_softmax(rnd(b, k, length, scale=2.0), dim=1)
    ls = rnd(b, k if per_component else 1, scale=0.2) - 1.0
    sigma_src = torch.ones(b, device=device)
    sigma = (0.2 + 0.7 * torch.rand(b, generator=gen)).to(device)
    x = x_src + 0.5 * rnd(b, c, length)
    grad_u = rnd(b, c, length)
    policy = GMTensors(means, lw, ls, x_src, sigma_src)
    plan = RolloutPlan.build(sigma_src, torch.zeros(b, device=device), substeps, 1.0)
    _, ybar, stats = triton_velocity._gm_velocity_fwd(x, sigma, policy, True)
    return {
        "fwd": ("_gm_velocity_fwd_kernel", lambda: triton_velocity._gm_velocity_fwd(x, sigma, policy, True)),
        "bwd": (
            "_gm_velocity_bwd_kernel",
            lambda: triton_velocity._gm_velocity_bwd(grad_u, x, sigma, policy, ybar, stats, False, False),
        ),
        "rollout": ("_gm_rollout_kernel", lambda: triton_rollout._gm_rollout(x_src, policy, plan)),
    }
