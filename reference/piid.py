"""pi-ID segment loss written literally (docs/design.md#pi-id-loss, the official ``piid_segment``).

The random draws are passed in explicitly so a test can replay those of the fast path:

- ``student_intervals`` (B, M): raw-time lengths walked by the detached policy before each state;
- ``teacher_intervals`` (B, M): raw-time lengths of the teacher Euler step after each state;
- ``keep_mask`` (B, K) bool or None: components kept in the detached GM policy (dropout).

Shapes: x_src (B, C, *S); GM output ``means`` (B, K, C, *S), ``logweights`` (B, K, 1, *S), ``logstds``
(B, 1|K, 1, *1); DX output ``grid`` (B, N, C, *S). Runs in the dtype of its inputs (tests use float64)
and is differentiable w.r.t. the output tensors.
"""

import torch

from .dx import dx_velocity
from .gm import gm_apply_dropout, gm_velocity
from .rollout import num_substeps, rollout
from .timesteps import warp


def _policy_velocity(policy_type, output, x_src, sigma_src, keep_mask, dx_segment_size, dx_shift, dx_mode, rows=None):
    """velocity(x, sigma) of the policy, optionally restricted to the samples ``rows`` (a slice).

    Implements [eq:dropout] with [eq:gm-velocity], or [eq:dx-velocity] (docs/design.md#gmflow-policy,
    docs/design.md#dx-policy).
    """
    rows = slice(None) if rows is None else rows
    if policy_type == "GMFlow":
        logweights = output["logweights"]
        if keep_mask is not None:
            logweights = gm_apply_dropout(logweights, keep_mask)
        means, logstds = output["means"][rows], output["logstds"][rows]
        logweights = logweights[rows]

        def velocity(x, sigma):
            return gm_velocity(x, sigma, means, logweights, logstds, x_src[rows], sigma_src[rows])

    elif policy_type == "DX":
        grid = output["grid"][rows]

        def velocity(x, sigma):
            return dx_velocity(x, sigma, grid, x_src[rows], sigma_src[rows], dx_segment_size, dx_shift, dx_mode)

    else:
        raise ValueError(f"unknown policy type {policy_type!r}")
    return velocity


def _mean_velocity(velocity_of_sample, x_a, raw_a, sigma_a, raw_end, total_substeps, shift, eps, substep_rule="ceil"):
    """Mean policy velocity over [raw_end, raw_a], one sample at a time (the official ``policy_average_u``).

    round(length * total_substeps) < 2 (round under either rule): the local velocity at the start. Otherwise an
    Euler rollout in raw time of n = num_substeps(length) substeps under ``substep_rule`` (a rollout's count),
    and (x_a - x_end) / max(sigma_a - sigma_end, eps).
    Implements [eq:mean-velocity] (docs/design.md#pi-id-loss).
    """
    rows = []
    for b in range(x_a.shape[0]):
        velocity = velocity_of_sample(b)
        x_start = x_a[b : b + 1]
        s_start = sigma_a[b : b + 1]
        length = raw_a[b] - raw_end[b]
        if int(torch.round(length * total_substeps)) < 2:
            rows.append(velocity(x_start, s_start)[0])
            continue
        n = int(num_substeps(length, total_substeps, substep_rule))
        h = length / n
        x, r, s = x_start, raw_a[b], s_start
        for _ in range(n):
            u = velocity(x, s)
            r = torch.clamp(r - h, min=0)
            s_next = warp(r, shift).reshape(1)
            x = x + u * (s_next - s)
            s = s_next
        rows.append(((x_start - x) / torch.clamp(s_start - s, min=eps))[0])
    return torch.stack(rows)


def piid_segment_loss(
    policy_type,
    output,
    x_src,
    raw_src,
    segment_size,
    teacher_fn,
    student_intervals,
    teacher_intervals,
    keep_mask=None,
    total_substeps=128,
    window_substeps=0,
    shift=1.0,
    num_train_timesteps=1000,
    loss_scale=1.0,
    dx_segment_size=1.0,
    dx_shift=1.0,
    dx_mode="grid",
    eps=1e-4,
    return_x_dst=False,
    substep_rule="ceil",
):
    """The loss of one pi-ID segment; returns (loss, x_dst or None, raw_dst).

    Args:
        policy_type: "GMFlow" or "DX"; output: dict of the student's output tensors at (x_src, warp(raw_src)).
        raw_src, segment_size: (B,) raw times.
        teacher_fn: ``teacher_fn(x_t, timestep) -> velocity`` with timestep = sigma * num_train_timesteps.
        shift: the raw-time -> sigma shift of the rollouts (the dynamic one, if any, already applied).
        substep_rule: how the rollouts count substeps ("ceil" or "round"); the window rounds under either.

    Implements [eq:piid-window], [eq:piid-states] and [eq:piid-loss] (docs/design.md#pi-id-loss); the draws of
    [eq:piid-draws] are given.
    """
    batch = x_src.shape[0]
    dtype = x_src.dtype
    raw_src = torch.as_tensor(raw_src, dtype=dtype).expand(batch)
    segment_size = torch.as_tensor(segment_size, dtype=dtype).expand(batch)
    student_intervals = student_intervals.to(dtype)
    teacher_intervals = teacher_intervals.to(dtype)
    sigma_src = warp(raw_src, shift)

    # window: window_substeps substeps of the segment's own substep size, at most the segment
    n_segment = torch.clamp(torch.round(segment_size * total_substeps), min=1)
    window = torch.minimum(window_substeps * segment_size / n_segment, segment_size)

    detached_output = {k: v.detach() for k, v in output.items()}
    detached_velocity = _policy_velocity(
        policy_type, detached_output, x_src, sigma_src, keep_mask, dx_segment_size, dx_shift, dx_mode
    )

    def live_velocity_of_sample(b):
        return _policy_velocity(
            policy_type, output, x_src, sigma_src, None, dx_segment_size, dx_shift, dx_mode, rows=slice(b, b + 1)
        )

    x_last, raw_last = x_src.detach(), raw_src
    sigma_last = sigma_src
    squared_errors = []
    for i in range(student_intervals.shape[1]):
        raw_a = torch.clamp(raw_last - student_intervals[:, i], min=0)
        raw_b = torch.clamp(raw_a - teacher_intervals[:, i], min=0)
        sigma_a = warp(raw_a, shift)
        with torch.no_grad():
            x_a = rollout(detached_velocity, x_last, sigma_last, sigma_a, total_substeps, shift, substep_rule)
            target = teacher_fn(x_a, sigma_a * num_train_timesteps)
        pred = _mean_velocity(
            live_velocity_of_sample, x_a, raw_a, sigma_a, raw_b - window, total_substeps, shift, eps, substep_rule
        )
        squared_errors.append((pred - target) ** 2)
        sigma_b = warp(raw_b, shift)
        x_last = x_a + target * (sigma_b - sigma_a).reshape(batch, *([1] * (x_a.dim() - 1)))
        raw_last, sigma_last = raw_b, sigma_b

    # the official DiffusionMSELoss: 0.5 * mean squared error, times a constant scale
    loss = 0.5 * loss_scale * torch.cat(squared_errors).mean()

    raw_dst = torch.clamp(raw_src - segment_size, min=0)
    x_dst = None
    if return_x_dst:
        with torch.no_grad():
            x_dst = rollout(detached_velocity, x_last, sigma_last, warp(raw_dst, shift), total_substeps, shift, substep_rule)
    return loss, x_dst, raw_dst
