"""The few-step pi-Flow sampling loop, written literally (docs/design.md#flowmapsde-sampler).

One step: build the policy from the student's output at (x, sigma_src), sharpen a GM policy by the
temperature on every step but the last, roll it out to sigma_dst with uniform raw-time substeps,
then re-noise as FlowMapSDE. Dtype-agnostic (tests run it in float64); no imports from
``piflow_kernels``.
"""

from collections.abc import Mapping

from .dx import dx_velocity
from .flowmap_sde import flowmap_sde_dst, flowmap_sde_sigmas, flowmap_sde_step
from .gm import gm_apply_temperature, gm_velocity
from .rollout import rollout


def _field(output, name):
    if isinstance(output, Mapping):
        return output[name]
    return getattr(output, name)


def policy_velocity_fn(
    output, x_src, sigma_src, policy_type="GMFlow", temperature=1.0, segment_size=1.0, dx_shift=1.0, dx_mode="grid"
):
    """velocity_fn(x, sigma) of the policy a student output describes at (x_src, sigma_src).

    GMFlow: ``output`` has means (B, K, C, *S), logweights (B, K, 1, *S), logstds (B, 1|K, 1, *1),
    sharpened by ``temperature`` (< 1). DX: ``output`` is the grid (B, N, C, *S) or has a ``grid`` field.
    All tensors are cast to the dtype of ``x_src``.
    Implements [eq:temperature] with [eq:gm-velocity], or [eq:dx-velocity] (docs/design.md#gmflow-policy,
    docs/design.md#dx-policy).
    """
    dtype = x_src.dtype
    if policy_type == "GMFlow":
        means = _field(output, "means").to(dtype)
        logweights = _field(output, "logweights").to(dtype)
        logstds = _field(output, "logstds").to(dtype)
        logweights, logstds = gm_apply_temperature(logweights, logstds, temperature)
        return lambda x, s: gm_velocity(x, s, means, logweights, logstds, x_src, sigma_src)
    if policy_type == "DX":
        grid = output if hasattr(output, "dim") else _field(output, "grid")
        grid = grid.to(dtype)
        return lambda x, s: dx_velocity(x, s, grid, x_src, sigma_src, segment_size, dx_shift, dx_mode)
    raise ValueError(f"unknown policy type {policy_type!r}")


def flowmap_sde_policy_step(
    output,
    x,
    sigma_src,
    sigma_to,
    h=0.0,
    noise=None,
    policy_type="GMFlow",
    temperature=1.0,
    total_substeps=128,
    shift=1.0,
    segment_size=1.0,
    dx_shift=1.0,
    dx_mode="grid",
    substep_rule="ceil",
):
    """One sampler step from (x, sigma_src) to sigma_to: rollout to sigma_dst, then FlowMapSDE re-noising.

    ``sigma_src``, ``sigma_to`` are Python floats; ``noise`` has the shape of x (needed when h != 0).
    Implements [eq:rollout] then [eq:flowmap-sde] (docs/design.md#flowmapsde-sampler).
    """
    velocity_fn = policy_velocity_fn(output, x, sigma_src, policy_type, temperature, segment_size, dx_shift, dx_mode)
    sigma_dst, m = flowmap_sde_dst(sigma_src, sigma_to, h)
    x_dst = rollout(velocity_fn, x, sigma_src, sigma_dst, total_substeps, shift, substep_rule)
    if noise is None:
        noise = 0 * x
    return flowmap_sde_step(x_dst, sigma_to, m, noise)


def flowmap_sde_sample(
    student,
    noise,
    num_steps,
    h=0.0,
    step_noises=None,
    policy_type="GMFlow",
    temperature=1.0,
    total_substeps=128,
    shift=1.0,
    final_step_size_scale=1.0,
    segment_size=1.0,
    dx_shift=1.0,
    dx_mode="grid",
    num_train_timesteps=1000,
    substep_rule="ceil",
    min_raw_t=0.0,
    max_raw_t=1.0,
    raw_sigmas=None,
):
    """The whole loop: x = sigmas[0] * noise; for each step, output = student(x, t) and one policy step.

    ``student(x, timestep)`` gets ``timestep = sigma_src * num_train_timesteps`` as a Python float.
    ``step_noises[i]`` is the re-noising noise of step i (shape of ``noise``; needed when h != 0).
    ``raw_sigmas`` (custom raw levels) replaces the grid of num_steps, min_raw_t and max_raw_t.
    Returns the final sample.
    Implements [eq:flowmap-sigmas], [eq:step-temperature] and [eq:flowmap-sde] (docs/design.md#flowmapsde-sampler).
    """
    sigmas = [float(s) for s in flowmap_sde_sigmas(num_steps, shift, final_step_size_scale, min_raw_t, max_raw_t, raw_sigmas)]
    num_steps = len(sigmas) - 1
    x = sigmas[0] * noise
    for i in range(num_steps):
        output = student(x, sigmas[i] * num_train_timesteps)
        step_temperature = temperature if i < num_steps - 1 else 1.0
        x = flowmap_sde_policy_step(
            output,
            x,
            sigmas[i],
            sigmas[i + 1],
            h,
            None if step_noises is None else step_noises[i],
            policy_type,
            step_temperature,
            total_substeps,
            shift,
            segment_size,
            dx_shift,
            dx_mode,
            substep_rule,
        )
    return x
