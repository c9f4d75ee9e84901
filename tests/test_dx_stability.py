"""DX pi-ID stays as stable as GM's at the end of trajectory mixing (teacher ratio -> 0).

A DX velocity (x - x0) / sigma read where the detached rollout ends carries that last substep's change of
x0 divided by sigma. With a window of 0 substeps, once the teacher ratio is 0 the matched states are drawn
down to the segment's end at sigma = 0, and the loss's gradient jumps by two orders of magnitude; the DX
default window (``DX_WINDOW_SUBSTEPS`` substeps) keeps every state that far above sigma = 0.
bench/dx_stability.py shows the same on the demo's DX student.
"""

from __future__ import annotations

import math

import pytest
import torch

from piflow_kernels.distill import ExactGMTeacher, GaussianMixtureData, PiIDConfig
from piflow_kernels.distill.piid import piid_segment_loss
from piflow_kernels.distill.piid_config import DX_WINDOW_SUBSTEPS
from piflow_kernels.distill.toy import ToyDXStudent, ToyGMStudent
from piflow_kernels.policies import DXPolicy

SHAPE = (1, 4, 4)
BATCH = 512  # enough states that some land within 1e-3 of sigma = 0 when nothing keeps them away
# gradient norm at teacher ratio 0 over that at 0.25 (same batch and draws), seeds 0-2: 0.65-0.69 for GM,
# 1.03-1.06 for DX with the default window, 1.04-1.17 with one substep, 280-400 with a window of 0
MAX_GRAD_JUMP = 3.0


@pytest.fixture(scope="module")
def teacher():
    data = GaussianMixtureData.random(SHAPE, num_components=3, spread=1.0, std=0.3, generator=torch.Generator().manual_seed(0))
    return ExactGMTeacher(data)


def grad_norm_jump(teacher, policy_type: str, window_substeps: int | None, seed: int) -> float:
    """Gradient norm of the final segment's pi-ID loss at teacher ratio 0 over that at ratio 0.25 (same batch, same draws)."""
    cfg = PiIDConfig(nfe=2, policy_type=policy_type, total_substeps=32, window_substeps=window_substeps, backend="torch")
    torch.manual_seed(seed)
    if policy_type == "DX":
        student = ToyDXStudent(*SHAPE, num_points=4, hidden=16)
    else:
        student = ToyGMStudent(*SHAPE, num_components=3, hidden=16)
    params = list(student.parameters())
    g = torch.Generator().manual_seed(100 + seed)
    x0 = teacher.data.sample(BATCH, generator=g).float()
    raw_src = torch.full((BATCH,), cfg.final_segment_size)  # the segment that ends at sigma = 0
    s = raw_src[:, None, None, None]
    x_src = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    norms = []
    for q in (0.25, 0.0):
        draws = torch.Generator().manual_seed(7)  # the same segment draws at both ratios
        loss, _, _ = piid_segment_loss(student, teacher, x_src, raw_src, cfg.final_segment_size, cfg, q, draws)
        grads = torch.autograd.grad(loss, params)
        norms.append(math.sqrt(sum(float(gr.square().sum()) for gr in grads)))
    return norms[1] / norms[0]


def test_window_default_by_policy():
    assert PiIDConfig(policy_type="DX").window_substeps == DX_WINDOW_SUBSTEPS >= 1
    assert PiIDConfig(policy_type="GMFlow").window_substeps == 0  # GM unchanged: the official default
    assert PiIDConfig(policy_type="DX", window_substeps=0).window_substeps == 0  # an explicit value is kept
    assert PiIDConfig.from_dict(PiIDConfig(policy_type="DX").to_dict()).window_substeps == DX_WINDOW_SUBSTEPS


def test_dx_velocity_at_a_rollout_end_grows_as_one_over_sigma():
    """The mechanism: after Euler substeps of size h, u(x_a, s_a) of a DX policy is about slope * h / s_a once s_a << h."""
    g = torch.Generator().manual_seed(0)
    x_src = torch.randn((4, *SHAPE), generator=g)
    policy = DXPolicy(torch.randn((4, 6, *SHAPE), generator=g), x_src, 0.25, segment_size=0.25, backend="torch")

    def rms_velocity_at(sigma: float) -> float:
        x_a = policy.rollout(x_src, 0.25, sigma, total_substeps=64)
        return float(policy.velocity(x_a, sigma).square().mean().sqrt())

    near_zero = [rms_velocity_at(s) for s in (1e-2, 1e-3, 1e-4)]
    assert near_zero[1] > 5 * near_zero[0] and near_zero[2] > 5 * near_zero[1], near_zero  # ~10x per decade
    # one substep (1/64) above sigma = 0 the velocity is of the order of the grid's (its slope over the substep)
    assert rms_velocity_at(1 / 64) < 0.1 * near_zero[2]


@pytest.mark.parametrize(
    "policy_type, window_substeps",
    [("DX", None), ("DX", 1), ("GMFlow", None)],
    ids=["DX-default-window", "DX-window1", "GM"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_no_gradient_jump_at_the_end_of_mixing(teacher, policy_type, window_substeps, seed):
    jump = grad_norm_jump(teacher, policy_type, window_substeps, seed)
    assert jump < MAX_GRAD_JUMP, f"gradient norm x{jump:.1f} when the teacher ratio reaches 0"


def test_dx_window0_shows_the_jump(teacher):
    """The quantity above detects the blow-up: DX with a window of 0 substeps (the DX default before)."""
    assert grad_norm_jump(teacher, "DX", 0, seed=0) > 30 * MAX_GRAD_JUMP
