"""The few-step pi-Flow sampler (FlowMapSDE, docs/design.md#flowmapsde-sampler): the schedule, one step, the loop.

    >>> import piflow_kernels as pk
    >>> noise = torch.randn(2, 4, 32, 32, device="cuda")
    >>> x0 = pk.sample(student, noise, num_inference_steps=4, encoder_hidden_states=emb)

``student(x_t, timestep, **model_kwargs)`` returns a policy output (GMFlowOutput, DXOutput, a mapping
or a ModelOutput with the policy's fields). Each step builds the policy at the current noise level, rolls
it out with many substeps down to the step's destination and re-noises (``h > 0``).

This module needs no diffusers: ``sample(student, noise, n)`` runs the default settings (those of
``PiFlowScheduler()``) on its own. :class:`~piflow_kernels.PiFlowScheduler`, the diffusers scheduler that
sets the shift, ``h``, the temperature, ..., runs the same math: :func:`flowmap_schedule` once per
``set_timesteps``, :func:`policy_from_output` and :func:`flowmap_step` once per ``step``.

A :class:`~piflow_kernels.PiFlowStudent` records the settings it was distilled with (``student.sampling``,
``student.num_inference_steps``); ``sample(student, noise)`` without a scheduler samples with them
(:func:`student_settings`, :meth:`PiFlowScheduler.from_student`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from piflow_kernels.checks import count, is_int
from piflow_kernels.constants import DEFAULT_TOTAL_SUBSTEPS
from piflow_kernels.outputs import POLICY_TYPES, make_policy
from piflow_kernels.policies import DXPolicy, GMFlowPolicy
from piflow_kernels.timesteps import DEFAULT_SUBSTEP_RULE, warp

if TYPE_CHECKING:
    from piflow_kernels.scheduler import PiFlowScheduler

__all__ = [
    "FlowMapSchedule",
    "check_h",
    "check_num_steps",
    "check_raw_sigmas",
    "check_raw_t_range",
    "flowmap_schedule",
    "flowmap_step",
    "policy_from_output",
    "raw_sigma_grid",
    "sample",
    "StudentSettings",
    "student_settings",
]

logger = logging.getLogger(__name__)

# Floor of the FlowMapSDE re-noising denominators sigma_src * a_to and a_to + sigma_to * m (as
# reference/flowmap_sde.py). Not GM_EPS: only the value is the same.
_RENOISE_EPS = 1e-6


@dataclass(frozen=True)
class StudentSettings:
    """What a student records about how it samples (see :func:`student_settings`).

    Attributes:
        policy_type: "GMFlow" or "DX".
        sampling: PiFlowScheduler config keys (``shift``, ``final_step_size_scale``, ``dx_segment_size``, ...),
            ``{}`` when none are recorded.
        num_inference_steps: the step count it was distilled for, None when not recorded.
    """

    policy_type: str
    sampling: dict[str, Any]
    num_inference_steps: int | None


def _unwrap_student(student: object) -> object:
    """The module under a ``DistributedDataParallel`` wrapper, else ``student`` itself (FSDP2 modules are their own
    unwrapped selves), as :func:`piflow_kernels.distill.ddp.unwrap_model`."""
    return student.module if isinstance(student, torch.nn.parallel.DistributedDataParallel) else student


def student_settings(student: object) -> StudentSettings | None:
    """The recorded sampling settings of a PiFlowStudent-like ``student``, or None for any other callable.

    PiFlowStudent-like: the module (under a DDP wrapper, if any) has a ``policy_type`` string and a ``sampling``
    mapping (:class:`~piflow_kernels.PiFlowStudent` has both; plain callables and the toy students have not);
    ``num_inference_steps`` is read when it has one. A ``policy_type`` that is not "GMFlow" or "DX", or a
    ``num_inference_steps`` that is neither None nor an int >= 1, is a ``ValueError``.
    """
    module = _unwrap_student(student)
    policy_type = getattr(module, "policy_type", None)
    sampling = getattr(module, "sampling", None)
    if not isinstance(policy_type, str) or not isinstance(sampling, Mapping):
        return None
    if policy_type not in POLICY_TYPES:
        raise ValueError(f"the student's policy_type must be one of {POLICY_TYPES}, got {policy_type!r}")
    steps = getattr(module, "num_inference_steps", None)
    if steps is not None and (not is_int(steps) or steps < 1):
        raise ValueError(f"the student's num_inference_steps must be None or an int >= 1, got {steps!r}")
    return StudentSettings(policy_type, dict(sampling), None if steps is None else int(steps))


def differing_settings(config: Mapping[str, Any], settings: StudentSettings) -> dict[str, tuple[Any, Any]]:
    """``{key: (the config's value, the student's)}`` for each recorded key (and the policy type) that ``config``
    (a scheduler config) sets otherwise."""
    recorded = {**settings.sampling, "policy_type": settings.policy_type}
    return {k: (config.get(k), v) for k, v in recorded.items() if config.get(k) != v}


def warn_differing(where: str, config: Mapping[str, Any], settings: StudentSettings | None) -> None:
    """Log one warning naming the recorded settings an explicitly given scheduler overrides."""
    differ = differing_settings(config, settings) if settings is not None else {}
    if differ:
        shown = ", ".join(f"{k}={ours!r} (student: {theirs!r})" for k, (ours, theirs) in sorted(differ.items()))
        logger.warning(
            "%s: the scheduler given is used as is, and sets %s otherwise than the student records; "
            "PiFlowScheduler.from_student(student, **overrides) builds one with the student's settings",
            where,
            shown,
        )


def check_h(h: float | str) -> float | str:
    """The re-noising strength as a float >= 0 or ``"inf"`` (a float inf becomes ``"inf"``)."""
    if isinstance(h, str):
        if h.strip().lower() != "inf":
            raise ValueError(f"h must be a float >= 0 or 'inf', got {h!r}")
        return "inf"
    if isinstance(h, bool) or not isinstance(h, (int, float)) or math.isnan(h) or h < 0:
        raise ValueError(f"h must be a float >= 0 or 'inf', got {h!r}")
    return "inf" if math.isinf(h) else float(h)


def check_num_steps(num_inference_steps: object) -> int:
    """``num_inference_steps`` as an int >= 1 (a ``TypeError`` for a non-integer, else a ``ValueError``)."""
    return count("num_inference_steps", num_inference_steps)


def check_raw_t_range(min_raw_t: object, max_raw_t: object) -> tuple[float, float]:
    """(min_raw_t, max_raw_t) as floats with 0 <= min_raw_t < max_raw_t <= 1 (a ``ValueError`` naming them)."""
    for name, v in (("min_raw_t", min_raw_t), ("max_raw_t", max_raw_t)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number in [0, 1], got {v!r}")
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
    if not min_raw_t < max_raw_t:
        raise ValueError(f"min_raw_t must be < max_raw_t, got min_raw_t={min_raw_t!r} and max_raw_t={max_raw_t!r}")
    return float(min_raw_t), float(max_raw_t)


def raw_sigma_grid(
    num_inference_steps: int, final_step_size_scale: float = 1.0, min_raw_t: float = 0.0, max_raw_t: float = 1.0
) -> list[float]:
    """The default raw-time grid (before the shift): n floats from ``max_raw_t``, the last step ``f`` times the
    others, the grid ending (after the last step) at ``min_raw_t``; [eq:flowmap-sigmas].

    ``linspace(max_raw_t, (max_raw_t - min_raw_t) * f / (n - 1 + f) + min_raw_t, n)`` with f =
    ``final_step_size_scale``, as LakonLab v0.2.0's FlowMapSDE (with 0 and 1: ``linspace(1, (f - 1) / (n + f - 1),
    n, endpoint=False)``). The sampler still ends at sigma 0: with ``min_raw_t > 0`` the last step is longer.
    """
    n = check_num_steps(num_inference_steps)
    f = float(final_step_size_scale)
    lo, hi = check_raw_t_range(min_raw_t, max_raw_t)
    raw = np.linspace(hi, (hi - lo) * f / (n - 1 + f) + lo, n).clip(min=0.0)
    return [float(r) for r in raw]


def check_raw_sigmas(sigmas: object) -> list[float]:
    """Custom raw (unshifted) noise levels as floats: 1-D, non-empty, in (0, 1], strictly decreasing."""
    if isinstance(sigmas, torch.Tensor):
        values = sigmas.detach().double().cpu().reshape(-1).tolist() if sigmas.dim() <= 1 else None
    else:
        try:
            values = np.asarray(sigmas, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"sigmas must be a 1-D sequence of raw noise levels, got {sigmas!r}") from err
        values = values.tolist() if values.ndim == 1 else None
    if values is None:
        raise ValueError("sigmas must be a 1-D sequence of raw noise levels")
    if len(values) == 0:
        raise ValueError("sigmas must not be empty")
    if not all(math.isfinite(v) and 0.0 < v <= 1.0 for v in values):
        raise ValueError(f"sigmas must lie in (0, 1] (raw, unshifted; the final 0 is appended), got {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {values}")
    return values


@dataclass(frozen=True)
class FlowMapSchedule:
    """The per-step numbers of an n-step FlowMapSDE run, as Python floats (the loop never reads a device).

    Step i starts at ``sigmas[i]``, rolls the policy out to ``sigmas_dst[i]`` and re-noises to
    ``sigmas[i + 1]``: ``x_next = scales[i] * x_dst + noise_scales[i] * noise``.

    Attributes:
        sigmas: n + 1 noise levels, ending in 0.
        sigmas_dst: n rollout destinations (``sigmas[1:]`` when h = 0).
        scales, noise_scales: n re-noising coefficients (1 and 0 when h = 0).
        shift: the time shift of the schedule and of the rollout substeps.
    """

    sigmas: list[float]
    sigmas_dst: list[float]
    scales: list[float]
    noise_scales: list[float]
    shift: float

    @property
    def num_steps(self) -> int:
        return len(self.sigmas_dst)


def _float32_schedule(raw_sigmas: Sequence[float], shift: float, h: float | str) -> FlowMapSchedule:
    """The schedule in float32 tensor arithmetic, in the order of LakonLab v0.2.0's FlowMapSDE (``use_fp64=False``):
    the raw levels cast to float32, ``warp``, then m, sigma_dst and the re-noising coefficients."""
    raw = torch.tensor(list(raw_sigmas), dtype=torch.float64).float().clamp(min=0)
    sig = torch.cat([warp(raw, shift), torch.zeros(1)])
    alphas = 1 - sig
    s_src, s_to, a_src, a_to = sig[:-1], sig[1:], alphas[:-1], alphas[1:]
    if h == "inf":
        m = torch.zeros_like(s_src)
    elif h == 0.0:
        m = torch.ones_like(s_src)
    else:
        m = (s_to * a_src / (s_src * a_to).clamp(min=_RENOISE_EPS)) ** (h * h)
    s_to_m = s_to * m
    sigmas_dst = s_to_m / (a_to + s_to_m).clamp(min=_RENOISE_EPS)
    scales = a_to + s_to_m
    noise_scales = s_to * (1 - m.square()).clamp(min=0).sqrt()
    if h == 0.0:  # deterministic: exactly the next sigma, no re-noising (as the float64 schedule)
        sigmas_dst, scales, noise_scales = s_to, torch.ones_like(m), torch.zeros_like(m)
    return FlowMapSchedule(sig.tolist(), sigmas_dst.tolist(), scales.tolist(), noise_scales.tolist(), float(shift))


def flowmap_schedule(raw_sigmas: Sequence[float], shift: float, h: float | str = 0.0, use_fp64: bool = True) -> FlowMapSchedule:
    """The schedule of raw (unshifted) noise levels ``raw_sigmas`` (n floats in (0, 1], decreasing):
    [eq:flowmap-sigmas] and the per-step numbers of [eq:flowmap-sde] in docs/design.md.

    Args:
        raw_sigmas: e.g. :func:`raw_sigma_grid`; shifted by ``warp(r, shift)``, then a final 0 is appended.
        shift: the time shift (> 0).
        h: re-noising strength: 0 deterministic, > 0 stochastic, ``"inf"`` full re-noising.
        use_fp64: compute the schedule in float64 (Python floats, the default); False computes it in float32 tensor
            arithmetic in the order of LakonLab v0.2.0's FlowMapSDE (its default ``use_fp64=False``), so the
            sigmas, destinations and re-noising coefficients are the official float32 values bit for bit. Either
            way the numbers are returned as Python floats.
    """
    h = check_h(h)
    if not use_fp64:
        return _float32_schedule(raw_sigmas, shift, h)
    s = [warp(r, shift) for r in raw_sigmas] + [0.0]
    sigmas_dst, scales, noise_scales = [], [], []
    for s_src, s_to in zip(s[:-1], s[1:]):
        a_src, a_to = 1.0 - s_src, 1.0 - s_to
        if h == 0.0:  # deterministic: exactly the next sigma, no re-noising
            sigmas_dst.append(s_to)
            scales.append(1.0)
            noise_scales.append(0.0)
            continue
        m = 0.0 if h == "inf" else (s_to * a_src / max(s_src * a_to, _RENOISE_EPS)) ** (h * h)
        sigmas_dst.append(s_to * m / max(a_to + s_to * m, _RENOISE_EPS))
        scales.append(a_to + s_to * m)
        noise_scales.append(s_to * math.sqrt(max(1.0 - m * m, 0.0)))
    return FlowMapSchedule(s, sigmas_dst, scales, noise_scales, float(shift))


def policy_from_output(
    model_output: object,
    x: torch.Tensor,
    sigma: float,
    policy_type: str,
    *,
    dx_segment_size: float = 1.0,
    dx_shift: float = 1.0,
    dx_mode: str = "grid",
    backend: str | None = None,
    where: str = "sample",
) -> GMFlowPolicy | DXPolicy:
    """The policy of a student output at (x, sigma), with errors that say what a step expects.

    Refuses a velocity (a tensor for GMFlow, a stock ``{"sample": ...}`` output) and tuples; ``where``
    names the caller in the messages (e.g. ``"PiFlowScheduler.step"``). See :func:`~piflow_kernels.make_policy`.
    """
    expected = (
        "a GMFlowOutput or a mapping/ModelOutput with 'means' (B, K, C, *S), 'logweights' (B, K, 1, *S) and "
        "'logstds' (B, 1|K, 1, *1)"
        if policy_type == "GMFlow"
        else "a DXOutput, a mapping/ModelOutput with 'grid' (B, N, C, *S) or the grid tensor"
    )
    stock = isinstance(model_output, Mapping) and "sample" in model_output and "means" not in model_output
    if (isinstance(model_output, torch.Tensor) and policy_type == "GMFlow") or stock:
        what = f"a {type(model_output).__name__} with a 'sample' field" if stock else "a tensor"
        raise TypeError(
            f"{where} got {what} as model_output, but policy_type={policy_type!r} expects the "
            f"student's policy output: {expected}. A velocity from a stock model is not a policy."
        )
    if isinstance(model_output, (tuple, list)):
        raise TypeError(
            f"{where} got a {type(model_output).__name__} as model_output; expected {expected} "
            "(call the student with return_dict=True)"
        )
    try:
        return make_policy(
            model_output,
            x,
            sigma,
            policy_type=policy_type,
            segment_size=dx_segment_size,
            shift=dx_shift,
            mode=dx_mode,
            backend=backend,
        )
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where} (policy_type={policy_type!r}): {err}") from err


def flowmap_step(
    policy: GMFlowPolicy | DXPolicy,
    x: torch.Tensor,
    index: int,
    schedule: FlowMapSchedule,
    total_substeps: int = DEFAULT_TOTAL_SUBSTEPS,
    temperature: float = 1.0,
    noise: torch.Tensor | None = None,
    substep_rule: str = DEFAULT_SUBSTEP_RULE,
) -> torch.Tensor:
    """Step ``index`` of ``schedule``: roll ``policy`` out from x at ``sigmas[index]`` to ``sigmas_dst[index]``,
    then re-noise.

    Args:
        policy: the student's policy at (x, ``schedule.sigmas[index]``); a GM policy is sharpened by
            ``temperature`` first.
        x: (B, C, *S) float32 latents.
        total_substeps: policy substeps per unit raw time.
        noise: (B, C, *S) re-noising noise; needed when ``schedule.noise_scales[index] > 0``.
        substep_rule: how the rollout counts its substeps, "ceil" (default) or "round" ([eq:substeps]).

    Returns:
        (B, C, *S) float32 latents at ``schedule.sigmas[index + 1]``.
    """
    if isinstance(policy, GMFlowPolicy):
        policy = policy.temperature(temperature)
    x_dst = policy.rollout(
        x, schedule.sigmas[index], schedule.sigmas_dst[index], total_substeps, shift=schedule.shift, substep_rule=substep_rule
    )
    scale, noise_scale = schedule.scales[index], schedule.noise_scales[index]
    if noise_scale > 0.0:
        if noise is None:
            raise ValueError(f"step {index} re-noises (h != 0): pass the noise")
        return torch.add(x_dst * scale, noise.to(device=x_dst.device, dtype=torch.float32), alpha=noise_scale)
    if scale != 1.0:
        return x_dst * scale
    return x_dst


def _default_steps(
    num_inference_steps: int | None, device: torch.device, sigmas: object = None
) -> tuple[torch.Tensor, Callable, float]:
    """The timesteps, the step function and the first sigma of ``PiFlowScheduler()``'s defaults, without diffusers: shift 1,
    h = 0, uniform steps (or the raw ``sigmas``), GMFlow policies, ``DEFAULT_TOTAL_SUBSTEPS``, the ``"ceil"``
    substep rule, a float64 schedule, timesteps ``sigma * 1000``."""
    if sigmas is not None:
        raw = check_raw_sigmas(sigmas)
        if num_inference_steps is not None and check_num_steps(num_inference_steps) != len(raw):
            raise ValueError(f"num_inference_steps={num_inference_steps} but {len(raw)} sigmas were given")
    elif num_inference_steps is None:
        raise ValueError("sample needs num_inference_steps or sigmas")
    else:
        raw = raw_sigma_grid(num_inference_steps)
    schedule = flowmap_schedule(raw, shift=1.0, h=0.0)
    timesteps = torch.tensor(schedule.sigmas[:-1], dtype=torch.float32, device=device) * 1000

    def step(output: object, index: int, timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        policy = policy_from_output(output, x32, schedule.sigmas[index], "GMFlow", where="sample")
        return flowmap_step(policy, x32, index, schedule).to(x.dtype)

    return timesteps, step, schedule.sigmas[0]


@torch.no_grad()
def sample(
    student: Callable[..., object],
    noise: torch.Tensor,
    num_inference_steps: int | None = None,
    scheduler: PiFlowScheduler | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = True,
    seq_len: int | None = None,
    sigmas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Run the few-step sampler from ``noise`` to the final latents.

    Args:
        student: callable ``student(x_t, timestep, **model_kwargs)``: x_t (B, C, *S) in the dtype of ``noise``,
            timestep (B,) float32 tensor on the device of ``noise`` (``sigma * num_train_timesteps``);
            returns the policy output the scheduler's ``policy_type`` expects.
        noise: (B, C, H, W) or (B, C, T, H, W) unit Gaussian noise. The loop starts from ``sigma_0 * noise`` at the
            schedule's first noise level ``sigma_0`` (1 unless ``max_raw_t < 1`` or custom ``sigmas`` start
            below 1), as LakonLab v0.2.0's sampler does.
        num_inference_steps: number of student calls (any number >= 1). None: the step count the student records
            (``student.num_inference_steps`` of a :class:`~piflow_kernels.PiFlowStudent`); may also be None when
            ``sigmas`` is given (or the scheduler has a ``default_num_inference_steps``); else a ``ValueError``.
        scheduler: a :class:`~piflow_kernels.PiFlowScheduler` (its schedule is reset here), used as is: its config
            wins over anything the student records (a warning names the recorded settings it sets otherwise).
            None: for a PiFlowStudent-like student (a ``policy_type`` and a ``sampling`` attribute, see
            :func:`student_settings`), ``PiFlowScheduler.from_student(student)``, the scheduler of its recorded
            settings (``shift``, ``final_step_size_scale``, ``dx_segment_size``, ...; defaults where it records
            none); for any other callable the defaults of ``PiFlowScheduler()`` (GMFlow, shift 1, h = 0, 128
            substeps per unit time), without diffusers. With ``use_dynamic_shifting`` the shift follows ``seq_len``
            (below).
        generator: for the re-noising noise when the scheduler's h != 0.
        progress: show a tqdm bar advancing once per student call.
        seq_len: sequence length for the dynamic shift; default ``prod(S)`` (latent pixels). FLUX-style
            transformers count packed 2x2 tokens: pass ``H * W // 4`` to match their pipelines' shift.
        sigmas: custom raw (unshifted) noise levels, strictly decreasing in (0, 1], without the final 0 (see
            :meth:`PiFlowScheduler.set_timesteps`).
        **model_kwargs: passed to every student call (e.g. text embeddings).

    Returns:
        (B, C, *S) final latents, dtype of ``noise``.
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor (B, C, *S), got {type(noise).__name__}")
    if noise.dim() not in (4, 5):
        raise ValueError(f"noise must have shape (B, C, H, W) or (B, C, T, H, W), got {tuple(noise.shape)}")
    if not callable(student):
        raise TypeError(f"student must be callable as student(x_t, timestep, **kwargs), got {type(student).__name__}")
    recorded = student_settings(student)
    if num_inference_steps is None and sigmas is None and recorded is not None:
        num_inference_steps = recorded.num_inference_steps
    if scheduler is None and recorded is None:
        if num_inference_steps is None and sigmas is None:
            raise ValueError("sample needs num_inference_steps (the number of student calls) or sigmas")
        timesteps, step, sigma_0 = _default_steps(num_inference_steps, noise.device, sigmas)
    else:
        from piflow_kernels.scheduler import PiFlowScheduler  # a scheduler or a PiFlowStudent: diffusers is installed

        if scheduler is None:
            scheduler = PiFlowScheduler.from_student(student)
        elif not isinstance(scheduler, PiFlowScheduler):
            raise TypeError(
                f"scheduler must be a PiFlowScheduler, got {type(scheduler).__name__} (use PiFlowScheduler.from_config("
                "your_scheduler.config) to convert a flow-matching scheduler)"
            )
        else:
            warn_differing("sample", scheduler.config, recorded)
        if num_inference_steps is None and sigmas is None and scheduler.config.get("default_num_inference_steps") is None:
            raise ValueError(
                "sample needs num_inference_steps (the number of student calls) or sigmas"
                + ("; the student records no num_inference_steps" if recorded is not None else "")
            )
        if seq_len is None:
            seq_len = noise.shape[2:].numel()
        scheduler.set_timesteps(num_inference_steps, device=noise.device, sigmas=sigmas, seq_len=seq_len)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps
        sigma_0 = scheduler.init_noise_sigma
        step = lambda output, index, t, x: scheduler.step(output, t, x, generator=generator).prev_sample  # noqa: E731

    batch = noise.shape[0]
    # start at the first noise level: sigma_0 * noise (LakonLab's samplers scale the noise by timesteps[0] / T)
    x = noise if sigma_0 == 1.0 else (noise.float() * sigma_0).to(noise.dtype)
    with tqdm(total=len(timesteps), disable=not progress, desc="pi-Flow sampling") as bar:
        for index, t in enumerate(timesteps):  # 0-d device tensors: no host synchronisation
            output = student(x, t.expand(batch), **model_kwargs)
            x = step(output, index, t, x)
            bar.update(1)
    return x
