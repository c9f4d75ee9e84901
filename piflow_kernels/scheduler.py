"""PiFlowScheduler: the few-step pi-Flow sampler as a diffusers scheduler (docs/design.md#flowmapsde-sampler).

Each ``step`` takes the student's *policy* output (not a velocity), builds the policy at the current
noise level, integrates it with many cheap substeps (one fused kernel on CUDA) down to the step's
destination, and re-noises as the FlowMapSDE sampler does (``h = 0``: deterministic). The math is
:mod:`piflow_kernels.sampling`'s (no diffusers there); this module adds the diffusers scheduler API:
the saved config, ``from_config`` of a flow-matching scheduler, timestep look-up and checks.

    >>> scheduler = PiFlowScheduler(shift=3.0, h=0.0, total_substeps=128)
    >>> scheduler.set_timesteps(4, device="cuda")
    >>> for t in scheduler.timesteps:
    ...     out = student(x, t.expand(x.shape[0]))          # a GMFlowOutput / DXOutput / dict
    ...     x = scheduler.step(out, t, x).prev_sample

``step`` never synchronises the host with the device: every per-step quantity is precomputed as a
Python float by ``set_timesteps`` and the schedule is indexed by a step counter. (The one exception
is the first ``step`` after ``set_timesteps`` when no begin index is set and the timestep is a CUDA
tensor: finding its index reads it once, as diffusers' schedulers do. ``set_begin_index(0)`` avoids it.)
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as err:
    raise ImportError(
        "PiFlowScheduler is a diffusers scheduler: pip install 'piflow_kernels[diffusers]' "
        "(piflow_kernels.sample without a scheduler needs no diffusers)"
    ) from err

from piflow_kernels.checks import is_int, positive_float, positive_int
from piflow_kernels.constants import DEFAULT_TOTAL_SUBSTEPS
from piflow_kernels.outputs import POLICY_TYPES
from piflow_kernels.policies import check_velocity_eps
from piflow_kernels.sampling import (
    check_h,
    check_num_steps,
    check_raw_sigmas,
    check_raw_t_range,
    flowmap_schedule,
    flowmap_step,
    policy_from_output,
    raw_sigma_grid,
    student_settings,
)
from piflow_kernels.timesteps import DEFAULT_SUBSTEP_RULE, DYNAMIC_SHIFT_TYPES, check_substep_rule, dynamic_shift, warp

__all__ = ["PiFlowScheduler", "PiFlowSchedulerOutput"]


logger = logging.getLogger(__name__)

# FlowMatchEulerDiscreteScheduler config key -> ours (its base_shift / max_shift are log-shifts, like ours)
_FLOW_MATCH_KEYS = {
    "base_shift": "base_logshift",
    "max_shift": "max_logshift",
    "base_image_seq_len": "base_seq_len",
    "max_image_seq_len": "max_seq_len",
}
# FlowMatchEuler features this sampler does not have: warn when a config turns them on
_FLOW_MATCH_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class PiFlowSchedulerOutput(BaseOutput):
    """Output of :meth:`PiFlowScheduler.step`.

    Args:
        prev_sample: (B, C, *S) the sample at the next noise level, dtype of the input sample.
    """

    prev_sample: torch.Tensor


def _check_temperature(temperature: float | str) -> float | str:
    if isinstance(temperature, str):
        if temperature != "auto":
            raise ValueError(f"temperature must be a float > 0 or 'auto', got {temperature!r}")
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a float > 0 or 'auto', got {temperature!r}")
    return float(temperature)


def check_strength(strength: object) -> float:
    """An image-to-image ``strength`` as a float in (0, 1] (None: 1.0), else a ``ValueError`` naming it."""
    if strength is None:
        return 1.0
    ok = not isinstance(strength, bool) and isinstance(strength, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(strength) or not 0.0 < strength <= 1.0:
        raise ValueError(
            f"strength must be a number in (0, 1] (the fraction of the raw noise schedule an image-to-image run "
            f"starts at; 1 starts from pure noise), got {strength!r}"
        )
    return float(strength)


class PiFlowScheduler(SchedulerMixin, ConfigMixin):
    """Few-step pi-Flow sampler (FlowMapSDE) for students that output a policy.

    Args:
        num_train_timesteps: timestep scale, ``timesteps = sigmas * num_train_timesteps``.
        shift: fixed time shift of the schedule and of the rollout substeps.
        use_dynamic_shifting: take the shift from ``mu`` (``shift = exp(mu)``, diffusers' convention) or from
            ``seq_len`` (by ``dynamic_shifting_type``).
        dynamic_shifting_type: ``"exp"`` (``log(shift)`` linear between base_logshift at base_seq_len and
            max_logshift at max_seq_len, FLUX) or ``"sqrt"`` (``shift`` linear in ``sqrt(seq_len)`` between
            ``exp(base_logshift)`` and ``exp(max_logshift)``), as LakonLab v0.2.0's FlowMapSDE. ``mu``, when given,
            is the log-shift whatever the type.
        base_seq_len, max_seq_len, base_logshift, max_logshift: the dynamic-shift line.
        final_step_size_scale: relative size of the last step in raw time (1 = uniform).
        max_raw_t, min_raw_t: the raw-time range of the default grid, ``0 <= min_raw_t < max_raw_t <= 1``: the first
            step starts at ``warp(max_raw_t)`` (``init_noise_sigma``; :func:`~piflow_kernels.sample` starts from
            ``init_noise_sigma * noise``), the steps are laid out as if the run ended at ``min_raw_t``; the
            last step still ends at sigma 0.
        h: re-noising strength: 0 deterministic, > 0 stochastic, ``"inf"`` full re-noising.
        use_fp64: compute the host-side schedule (sigmas, rollout destinations, re-noising coefficients) in
            float64 (default); False computes it in float32 in the order of LakonLab v0.2.0's FlowMapSDE, whose
            default that is (its values bit for bit). The re-noising itself runs in float32 either way.
        total_substeps: policy substeps per unit raw time (e.g. 128: a half-unit step takes 64).
        substep_rule: how a step's rollout counts its substeps from its raw length ``dr``: ``"ceil"`` (default,
            ``ceil(dr * total_substeps)`` as LakonLab v0.2.0) or ``"round"`` (earlier versions; for students and
            results made with that rule).
        policy_type: ``"GMFlow"`` or ``"DX"``, what the student outputs.
        temperature: GM temperature applied on every step but the last (< 1 sharpens; ``"auto"`` picks
            ``min(0.1 * (num_inference_steps - 1), 1)`` as the official FLUX pipeline does).
        dx_segment_size, dx_shift, dx_mode: the DX policy's intrinsic segment length (raw time), shift and
            mode ("grid" or "polynomial"); keep the values the student was trained with.
        backend: policy backend, None (auto: Triton on CUDA, fast CPU path otherwise), "torch", "triton",
            "reference".
        velocity_eps: the floor of sigma in the policy velocity during the rollouts: None (default) the policies'
            built-in floors, GM 1e-6 and DX 1e-4, which are the official policies' defaults and so what LakonLab's
            diffusers pipelines (pi-FLUX.1, pi-Qwen-Image, pi-FLUX.2) sample with; 1e-4 reproduces LakonLab's
            training-side test sampler (``PiFlowImitation``'s ``test_cfg`` eps, 1e-4 for both policies). It only
            changes velocities evaluated below it (see :meth:`~piflow_kernels.GMFlowPolicy.with_velocity_eps`).

    A student that records its sampling settings (:class:`~piflow_kernels.PiFlowStudent`'s ``sampling``) gets
    its scheduler from :meth:`from_student`.

    Example:
        >>> scheduler = PiFlowScheduler(use_dynamic_shifting=True)
        >>> scheduler.set_timesteps(4, seq_len=64 * 64)
        >>> x = scheduler.step(student_output, scheduler.timesteps[0], x).prev_sample
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_seq_len: int = 256,
        max_seq_len: int = 4096,
        base_logshift: float = 0.5,
        max_logshift: float = 1.15,
        final_step_size_scale: float = 1.0,
        h: float | str = 0.0,
        total_substeps: int = DEFAULT_TOTAL_SUBSTEPS,
        policy_type: str = "GMFlow",
        temperature: float | str = 1.0,
        dx_segment_size: float = 1.0,
        dx_shift: float = 1.0,
        dx_mode: str = "grid",
        backend: str | None = None,
        substep_rule: str = DEFAULT_SUBSTEP_RULE,
        dynamic_shifting_type: str = "exp",
        max_raw_t: float = 1.0,
        min_raw_t: float = 0.0,
        use_fp64: bool = True,
        velocity_eps: float | None = None,
    ) -> None:
        positive_int("num_train_timesteps", num_train_timesteps)
        check_substep_rule(substep_rule)
        if dynamic_shifting_type not in DYNAMIC_SHIFT_TYPES:
            raise ValueError(f"dynamic_shifting_type must be one of {DYNAMIC_SHIFT_TYPES}, got {dynamic_shifting_type!r}")
        check_raw_t_range(min_raw_t, max_raw_t)
        if not isinstance(use_fp64, (bool, np.bool_)):
            raise ValueError(f"use_fp64 must be a bool, got {use_fp64!r}")
        positive_float("shift", shift)
        positive_float("final_step_size_scale", final_step_size_scale)
        positive_float("dx_segment_size", dx_segment_size)
        positive_float("dx_shift", dx_shift)
        if use_dynamic_shifting and max_seq_len == base_seq_len:
            raise ValueError("use_dynamic_shifting needs max_seq_len != base_seq_len")
        self._h = check_h(h)
        self._temperature = _check_temperature(temperature)
        positive_int("total_substeps", total_substeps)
        if policy_type not in POLICY_TYPES:
            raise ValueError(f"policy_type must be one of {POLICY_TYPES}, got {policy_type!r}")
        if dx_mode not in ("grid", "polynomial"):
            raise ValueError(f"dx_mode must be 'grid' or 'polynomial', got {dx_mode!r}")
        if backend is not None and backend not in ("torch", "triton", "reference"):
            raise ValueError(f"backend must be None, 'torch', 'triton' or 'reference', got {backend!r}")
        if velocity_eps is not None:  # stored as a plain float (the config is JSON)
            self.register_to_config(velocity_eps=check_velocity_eps(velocity_eps))

        # before set_timesteps: the training grid, as diffusers' flow-matching schedulers expose
        raw = 1.0 - np.arange(num_train_timesteps, dtype=np.float64) / num_train_timesteps
        sigmas = torch.from_numpy(warp(raw, float(shift))).float()
        self.sigmas = sigmas
        self.timesteps = sigmas * num_train_timesteps
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self.init_noise_sigma = 1.0  # sampling starts from unit noise scaled by the first sigma (set_timesteps)
        self.num_inference_steps: int | None = None
        self._shift = float(shift)
        self._step_index: int | None = None
        self._begin_index: int | None = None
        # the re-noising noise's generator when ``step`` gets none (stock pipelines never pass theirs)
        self.generator: torch.Generator | list[torch.Generator] | None = None

    # ------------------------------------------------------------------ diffusers plumbing

    @classmethod
    def from_config(cls, config: Mapping | None = None, return_unused_kwargs: bool = False, **kwargs):
        """Also accepts a ``FlowMatchEulerDiscreteScheduler`` config: the shared keys are kept and its
        ``base_shift / max_shift / base_image_seq_len / max_image_seq_len`` become ours
        (``base_logshift / max_logshift / base_seq_len / max_seq_len``). Keyword arguments override.
        """
        if isinstance(config, Mapping):
            config = dict(config)
            for theirs, ours in _FLOW_MATCH_KEYS.items():
                if theirs in config:
                    value = config.pop(theirs)
                    if ours not in config and value is not None:
                        config[ours] = value
            on = [k for k in _FLOW_MATCH_UNSUPPORTED if config.get(k)]
            if config.get("time_shift_type", "exponential") != "exponential":
                on.append(f"time_shift_type={config['time_shift_type']!r}")
            if on:
                logger.warning("PiFlowScheduler.from_config: ignoring unsupported settings %s of the source config", on)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_student(cls, student: object, **overrides: Any) -> PiFlowScheduler:
        """The scheduler a student samples with: its ``policy_type`` and recorded ``sampling`` settings, then
        ``overrides``; the defaults of this class for every key neither sets.

        Precedence, highest first: ``overrides`` > ``student.sampling`` > the defaults. A scheduler class with a
        ``default_num_inference_steps`` key (:class:`~piflow_kernels.pipelines.PiFlowPipelineScheduler`) also
        takes ``student.num_inference_steps`` there when the student records it.

        Args:
            student: a :class:`~piflow_kernels.PiFlowStudent`, possibly wrapped in ``DistributedDataParallel``
                (any module with a ``policy_type`` string and a ``sampling`` mapping of config keys of this class,
                see :func:`~piflow_kernels.sampling.student_settings`).
            **overrides: config keys of this class (e.g. ``temperature=0.7``, ``h=0.5``, ``backend="torch"``).

        Raises:
            TypeError: ``student`` is not PiFlowStudent-like, or an override is not a config key of this class.
            ValueError: ``overrides`` sets another ``policy_type`` than the student's, the student records a key
                this class does not take, or a value is out of range (the constructor's own checks, naming it).

        Example:
            >>> student.sampling                 # {"shift": 3.0, "final_step_size_scale": 0.5, "dx_segment_size": 0.25}
            >>> scheduler = PiFlowScheduler.from_student(student, temperature=0.7)
            >>> x0 = pk.sample(student, noise, 4, scheduler)      # what pk.sample(student, noise, 4) runs, but T = 0.7
        """
        settings = student_settings(student)
        if settings is None:
            raise TypeError(
                f"{cls.__name__}.from_student needs a PiFlowStudent (or a module with a policy_type and a sampling dict "
                f"of {cls.__name__} config keys, possibly DDP-wrapped), got {type(student).__name__}"
            )
        accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(overrides) - set(accepted))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_student got unknown config keys {unknown}; known: {', '.join(accepted)}")
        unknown = sorted(set(settings.sampling) - set(accepted))
        if unknown:
            raise ValueError(f"the student's recorded sampling has keys {unknown} that {cls.__name__} does not take")
        if overrides.get("policy_type", settings.policy_type) != settings.policy_type:
            raise ValueError(
                f"from_student: policy_type={overrides['policy_type']!r} but the student outputs "
                f"{settings.policy_type!r} policies"
            )
        config = {**settings.sampling, "policy_type": settings.policy_type}
        if "default_num_inference_steps" in accepted and settings.num_inference_steps is not None:
            config["default_num_inference_steps"] = settings.num_inference_steps
        return cls(**{**config, **overrides})

    @property
    def step_index(self) -> int | None:
        """Index of the next step in the schedule (None until the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first step, set by ``set_begin_index`` (pipelines set 0)."""
        return self._begin_index

    @property
    def shift(self) -> float:
        """The time shift in use: from the last ``set_timesteps`` (dynamic or fixed), else the config's."""
        return self._shift

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next ``step`` at this schedule index without looking its timestep up."""
        if not is_int(begin_index) or begin_index < 0:
            raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity (flow-matching students take x_t as is)."""
        return sample

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward diffusion to ``timestep`` (img2img): ``(1 - s) * sample + s * noise``, s = timestep / T.

        ``timestep`` is a float, a 0-d or a (B,) tensor.
        """
        sigma = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device) / self.config.num_train_timesteps
        if sigma.dim() == 1:
            sigma = sigma.reshape(-1, *([1] * (sample.dim() - 1)))
        return ((1 - sigma) * sample.float() + sigma * noise.float()).to(sample.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ schedule

    def get_shift(self, seq_len: int | None = None, mu: float | torch.Tensor | None = None) -> float:
        """The shift ``set_timesteps`` uses: ``exp(mu)`` or the dynamic shift of ``seq_len`` when
        ``use_dynamic_shifting``, else the config's fixed ``shift``."""
        cfg = self.config
        if not cfg.use_dynamic_shifting:
            return float(cfg.shift)
        if mu is not None:
            mu = float(mu)
            if not math.isfinite(mu):
                raise ValueError(f"mu must be finite, got {mu}")
            return math.exp(mu)
        if seq_len is not None:
            if isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 1:
                raise ValueError(f"seq_len must be a positive int (latent positions, H*W or T*H*W), got {seq_len!r}")
            return dynamic_shift(
                int(seq_len), cfg.base_seq_len, cfg.max_seq_len, cfg.base_logshift, cfg.max_logshift,
                shift_type=cfg.get("dynamic_shifting_type", "exp"),
            )  # fmt: skip
        raise ValueError(
            "use_dynamic_shifting=True: set_timesteps needs mu (log-shift, as diffusers pipelines pass) or seq_len "
            "(number of latent positions)"
        )

    def raw_sigmas(self, num_inference_steps: int) -> list[float]:
        """The default raw-time grid of ``num_inference_steps`` steps (before the shift), n floats from max_raw_t.

        ``linspace(max_raw_t, (max_raw_t - min_raw_t) * f / (n - 1 + f) + min_raw_t, n)`` with f =
        final_step_size_scale (``linspace(1, (f - 1) / (n + f - 1), n, endpoint=False)`` at the defaults). Passing it
        as ``sigmas=`` to a stock pipeline keeps the final step scale (their default is ``linspace(1, 1/n, n)``).
        """
        cfg = self.config
        return raw_sigma_grid(
            num_inference_steps, cfg.final_step_size_scale, cfg.get("min_raw_t", 0.0), cfg.get("max_raw_t", 1.0)
        )

    @staticmethod
    def _check_raw_sigmas(sigmas: object) -> list[float]:
        return check_raw_sigmas(sigmas)

    def _interpret_sigmas(self, num_inference_steps: int | None, sigmas: object) -> tuple[int | None, object]:
        """(num_inference_steps, sigmas) as ``set_timesteps`` uses them: here as the caller gave them;
        :class:`~piflow_kernels.pipelines.PiFlowPipelineScheduler` reads the stock pipelines' default grid."""
        return num_inference_steps, sigmas

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        mu: float | None = None,
        seq_len: int | None = None,
        strength: float | None = None,
    ) -> None:
        """Set the sampling schedule of ``num_inference_steps`` steps (any number: elastic NFE).

        Sets ``sigmas`` (n + 1,) ending in 0, ``timesteps = sigmas[:-1] * num_train_timesteps`` (n,), and the
        rollout destinations ``sigmas_dst`` / ``timesteps_dst`` (n,), all float32 on ``device``.

        Args:
            num_inference_steps: number of student calls; may be None when ``sigmas`` is given.
            device: where the schedule tensors live.
            sigmas: custom raw (unshifted) noise levels, strictly decreasing in (0, 1], without the final 0;
                shifted like the default grid (diffusers' ``FlowMatchEulerDiscreteScheduler`` convention).
            mu: log-shift for dynamic shifting (``shift = exp(mu)``); used only when ``use_dynamic_shifting``.
            seq_len: number of latent positions for dynamic shifting when ``mu`` is not given.
            strength: image-to-image start in (0, 1] (None: 1). The raw grid (default or ``sigmas``) is multiplied by
                it before the shift, as the official pi-Flow sampler's ``denoise``: all ``num_inference_steps`` steps
                run, from sigma ``warp(strength * max_raw_t)`` down to 0; start from
                ``scale_noise(image_latents, timesteps[0], noise)``.
        """
        strength = check_strength(strength)
        num_inference_steps, sigmas = self._interpret_sigmas(num_inference_steps, sigmas)
        if sigmas is not None:
            raw = self._check_raw_sigmas(sigmas)
            if num_inference_steps is not None and check_num_steps(num_inference_steps) != len(raw):
                raise ValueError(f"num_inference_steps={num_inference_steps} but {len(raw)} sigmas were given")
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps or sigmas")
        else:
            raw = self.raw_sigmas(num_inference_steps)
        if strength != 1.0:
            raw = [r * strength for r in raw]
        use_fp64 = bool(self.config.get("use_fp64", True))
        schedule = flowmap_schedule(raw, self.get_shift(seq_len=seq_len, mu=mu), self._h, use_fp64=use_fp64)

        t_scale = self.config.num_train_timesteps
        self.num_inference_steps = schedule.num_steps
        self._shift = schedule.shift
        self._schedule = schedule
        self.sigmas = torch.tensor(schedule.sigmas, dtype=torch.float32, device=device)
        self.timesteps = self.sigmas[:-1] * t_scale
        self.sigmas_dst = torch.tensor(schedule.sigmas_dst, dtype=torch.float32, device=device)
        self.timesteps_dst = self.sigmas_dst * t_scale
        # the float32 timesteps as Python floats: looked up and checked on the host, never on the device
        self._timesteps_py = torch.tensor(schedule.sigmas[:-1], dtype=torch.float32).mul(t_scale).tolist()
        self.init_noise_sigma = schedule.sigmas[0]
        self._step_index = None
        self._begin_index = None

    # ------------------------------------------------------------------ step

    def _timestep_values(self, timestep: object) -> list[float] | None:
        """Timestep as host floats, or None when reading it would synchronise with a device."""
        if isinstance(timestep, bool):
            raise TypeError("timestep must be a number or a tensor, got bool")
        if isinstance(timestep, (int, float, np.floating, np.integer)):
            return [float(timestep)]
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu":
                return None
            if timestep.numel() == 0:
                raise ValueError("timestep is an empty tensor")
            return timestep.detach().double().reshape(-1).tolist()
        raise TypeError(f"timestep must be a float or a tensor from scheduler.timesteps, got {type(timestep).__name__}")

    def _timestep_tol(self, timestep: object) -> float:
        half = isinstance(timestep, torch.Tensor) and timestep.dtype in (torch.float16, torch.bfloat16)
        return (1e-2 if half else 1e-5) * self.config.num_train_timesteps

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Index of ``timestep`` in the schedule (reads a device tensor once: not for the hot loop)."""
        if schedule_timesteps is None:
            if self.num_inference_steps is None:
                raise RuntimeError("call set_timesteps before looking a timestep up")
            schedule = self._timesteps_py
        else:
            schedule = schedule_timesteps.detach().double().cpu().reshape(-1).tolist()
        if isinstance(timestep, torch.Tensor):
            values = timestep.detach().double().cpu().reshape(-1).tolist()
        else:
            values = self._timestep_values(timestep)
        tol = self._timestep_tol(timestep)
        matches = [i for i, t in enumerate(schedule) if all(abs(v - t) <= tol for v in values)]
        if not matches:
            shown = ", ".join(f"{t:.4g}" for t in schedule)
            raise ValueError(
                f"timestep {values[0] if len(values) == 1 else values} is not in the schedule set by set_timesteps "
                f"(timesteps: [{shown}]); pass an element of scheduler.timesteps"
            )
        return matches[1] if len(matches) > 1 else matches[0]

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self.begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _check_timestep(self, timestep: object, index: int) -> None:
        values = self._timestep_values(timestep)
        if values is None:  # a device tensor: checking it would synchronise
            return
        expected = self._timesteps_py[index]
        tol = self._timestep_tol(timestep)
        if any(abs(v - expected) > tol for v in values):
            raise ValueError(
                f"timestep {values[0] if len(values) == 1 else values} does not match step {index} of the schedule "
                f"(expected {expected:.6g} = scheduler.timesteps[{index}]); pass the timesteps of set_timesteps in order"
            )

    def _to_policy_layout(
        self, model_output: object, sample: torch.Tensor, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
        """(sample, noise, back): the latents in the layout the policy acts on, and the map of the result back
        to the caller's layout. Here the identity; :class:`~piflow_kernels.pipelines.PiFlowPipelineScheduler`
        unpacks FLUX's packed latents."""
        return sample, noise, _identity

    def step_temperature(self, index: int) -> float:
        """The GM temperature of step ``index``: the config's on every step but the last, where it is 1."""
        n = self.num_inference_steps
        if n is None or index >= n - 1:
            return 1.0
        if self._temperature == "auto":
            return min(max(0.1 * (n - 1), 0.0), 1.0)
        return self._temperature

    def step(
        self,
        model_output: object,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        noise: torch.Tensor | None = None,
    ) -> PiFlowSchedulerOutput | tuple[torch.Tensor]:
        """One sampler step: policy at the current sigma -> rollout to sigma_dst -> FlowMapSDE re-noising.

        Args:
            model_output: the student's policy output at (sample, timestep): GMFlowOutput / mapping /
                ModelOutput with means (B, K, C, *S), logweights (B, K, 1, *S), logstds (B, 1|K, 1, *1);
                or DXOutput / mapping with grid / the grid tensor (B, N, C, *S).
            timestep: the current element of ``scheduler.timesteps`` (float, 0-d or (B,) tensor).
            sample: x_t (B, C, *S), S = (H, W) or (T, H, W); any float dtype (math runs in float32).
            generator: for the re-noising noise when h != 0 (a list: one per sample); None: ``self.generator``.
            return_dict: return a :class:`PiFlowSchedulerOutput` (else a 1-tuple).
            noise: (B, C, *S) the re-noising noise to use instead of drawing it (tests, reproducibility).

        Returns:
            prev_sample (B, C, *S) in the dtype of ``sample``.
        """
        sample, noise, to_caller_layout = self._to_policy_layout(model_output, sample, noise)
        if generator is None:
            generator = self.generator
        if self.num_inference_steps is None:
            raise RuntimeError("PiFlowScheduler.step called before set_timesteps(num_inference_steps)")
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point tensor (B, C, *S), got {type(sample).__name__}")
        if sample.dim() not in (4, 5):
            raise ValueError(f"sample must have shape (B, C, H, W) or (B, C, T, H, W), got {tuple(sample.shape)}")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise RuntimeError(
                f"PiFlowScheduler.step called more than num_inference_steps={self.num_inference_steps} times; "
                "call set_timesteps again to sample anew"
            )
        self._check_timestep(timestep, i)
        if noise is not None and (not isinstance(noise, torch.Tensor) or noise.shape != sample.shape):
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must have the shape of sample {tuple(sample.shape)}, got {got}")

        cfg, schedule = self.config, self._schedule
        x = sample.float()
        policy = policy_from_output(
            model_output,
            x,
            schedule.sigmas[i],
            cfg.policy_type,
            dx_segment_size=cfg.dx_segment_size,
            dx_shift=cfg.dx_shift,
            dx_mode=cfg.dx_mode,
            backend=cfg.backend,
            where="PiFlowScheduler.step",
        )
        if cfg.get("velocity_eps") is not None:
            policy = policy.with_velocity_eps(cfg.velocity_eps)
        if noise is None and schedule.noise_scales[i] > 0.0:  # the rollout draws no random numbers: same stream
            noise = randn_tensor(tuple(sample.shape), generator=generator, device=sample.device, dtype=torch.float32)
        x_prev = flowmap_step(
            policy, x, i, schedule, cfg.total_substeps, self.step_temperature(i), noise,
            substep_rule=cfg.get("substep_rule", DEFAULT_SUBSTEP_RULE),
        )  # fmt: skip
        prev = to_caller_layout(x_prev.to(sample.dtype))
        self._step_index = i + 1
        if not return_dict:
            return (prev,)
        return PiFlowSchedulerOutput(prev_sample=prev)
