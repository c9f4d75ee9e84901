"""Settings of the pi-ID loss (:class:`PiIDConfig`) and the teacher-ratio schedule of scheduled trajectory mixing.

    >>> cfg = PiIDConfig(nfe=2, policy_type="DX", total_substeps=32)
    >>> cfg.segment_sizes()          # [0.5, 0.5]: the NFE grid from raw time 1 down to 0
    >>> teacher_ratio(cfg, iteration=100)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from piflow_kernels.checks import is_int, is_real
from piflow_kernels.ops.dispatch import BACKENDS
from piflow_kernels.outputs import POLICY_TYPES
from piflow_kernels.timesteps import DEFAULT_SUBSTEP_RULE, check_substep_rule, dynamic_shift

if TYPE_CHECKING:
    import torch

__all__ = ["DX_WINDOW_SUBSTEPS", "PiIDConfig", "teacher_ratio"]

# The default pi-ID window of a DX policy, in substeps (docs/design.md#dx-policy). A DX velocity (x - x0) / sigma
# read where a rollout of substep h ends, at sigma s, carries that substep's change of x0 divided by s: it grows as
# h / s once s < h (a random unit-scale grid after 64 substeps per unit time: |u| = 115 at s = 1e-3, 1087 at 1e-4,
# against a teacher velocity of order 1), and so do the loss's gradients, through d u / d grid = sigma_src / s.
# The last matched state of a segment lies the window plus its own teacher interval (mean q * span / M) above the
# segment's end; with a window of 0, as the teacher ratio q reaches 0 the states of the final segment reach sigma = 0:
# the demo's DX student's gradient norm goes from 0.9 to 477 (window mean; max 9350) and its loss from 0.36 to 24
# (bench/dx_stability.py). A window keeps every state at least that many substeps above sigma = 0, where the sampler
# reads the policy (its last substep reads the velocity one substep above 0 and lands on x0 there). One substep
# bounds the ratio but leaves sigma_src / sigma = 16 on the demo's final segment and a transient at the end of
# mixing (loss x2, gradient norm x4); three, the official DX recipes' value (sigma >= 0.07, sigma_src / sigma <= 5 at
# their shift 3.2 and 128 substeps), leave none.
DX_WINDOW_SUBSTEPS = 3


@dataclass
class PiIDConfig:
    """Settings of the pi-ID loss (defaults as the official code; configs there use e.g. ``loss_scale`` 3 or 30).

    Attributes:
        nfe: number of student evaluations (segments) at sampling time.
        policy_type: "GMFlow" or "DX".
        total_substeps: policy substeps per unit raw time for every rollout.
        substep_rule: how the rollouts (the detached policy's, and the mean velocities') count their substeps:
            "ceil" (default, LakonLab v0.2.0) or "round" (earlier versions). The window's substep size and the
            "fewer than 2 substeps" test of the mean velocity round under either rule, as the official code.
        num_intermediate_states: M, states per segment where the velocities are matched.
        window_substeps: > 0 matches the policy's mean velocity over a window of that many substeps (of the
            segment's own size) and keeps every matched state at least that far above the segment's end. None
            (the default) resolves to 0 for GMFlow (the official default) and to :data:`DX_WINDOW_SUBSTEPS` for DX.
        gm_dropout: probability of dropping a component of the detached GM policy (GMFlow only).
        final_step_size_scale: f, the last segment is f times the others (segments 1 / (nfe - 1 + f)).
        shift: time shift of raw time -> sigma (ignored with ``use_dynamic_shifting``).
        use_dynamic_shifting, base_seq_len, max_seq_len, base_logshift, max_logshift: FLUX-style
            resolution-dependent shift from the latent sequence length (prod of spatial dims).
        token_size: pixels per token side in that sequence length (``H * W / token_size**2``): 2 for FLUX /
            Qwen-Image students, whose pipelines count packed 2x2 tokens (the trainer refuses a dynamic shift that
            counts otherwise for them); 1 counts latent pixels.
        num_decay_iters: the teacher ratio decays 1 -> 0 linearly over this many iterations (0: always 0).
        loss_scale: constant factor of the loss (the official ``rescale_cfg.scale``).
        num_train_timesteps: timestep = sigma * num_train_timesteps for the student and the teacher.
        dx_segment_size: the DX policy's segment (None: the NFE segment size 1 / (nfe - 1 + f)).
        dx_shift: the DX policy's own shift (None: ``shift``).
        dx_mode: "grid" or "polynomial".
        eps: small value: raw-time floor of the segment start, denominator floor of mean velocities.
        backend: policy backend (None: auto, see :mod:`piflow_kernels.backend`).
    """

    nfe: int = 4
    policy_type: str = "GMFlow"
    total_substeps: int = 128
    num_intermediate_states: int = 2
    window_substeps: int | None = None
    gm_dropout: float = 0.0
    final_step_size_scale: float = 1.0
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 4096
    token_size: int = 1
    base_logshift: float = 0.5
    max_logshift: float = 1.15
    num_decay_iters: int = 0
    loss_scale: float = 1.0
    num_train_timesteps: float = 1000
    dx_segment_size: float | None = None
    dx_shift: float | None = None
    dx_mode: str = "grid"
    eps: float = 1e-4
    backend: str | None = None
    substep_rule: str = DEFAULT_SUBSTEP_RULE

    def __post_init__(self) -> None:
        def need_int(name: str, low: int) -> None:
            v = getattr(self, name)
            if not is_int(v):
                raise ValueError(f"PiIDConfig.{name} must be an int, got {v!r} ({type(v).__name__})")
            if v < low:
                raise ValueError(f"PiIDConfig.{name} must be >= {low}, got {v}")
            setattr(self, name, int(v))  # numpy ints pass is_int: store a plain int (the config goes to JSON)

        def need_real(name: str, positive: bool = False, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not is_real(v):
                raise ValueError(f"PiIDConfig.{name} must be a finite number, got {v!r}")
            if positive and not v > 0:
                raise ValueError(f"PiIDConfig.{name} must be > 0, got {v}")
            setattr(self, name, float(v))

        need_int("nfe", 1)
        need_int("total_substeps", 1)
        need_int("num_intermediate_states", 1)
        need_int("num_decay_iters", 0)
        need_int("base_seq_len", 1)
        need_int("max_seq_len", 1)
        need_int("token_size", 1)
        if self.policy_type not in POLICY_TYPES:
            raise ValueError(f"PiIDConfig.policy_type must be one of {POLICY_TYPES}, got {self.policy_type!r}")
        if self.window_substeps is None:  # resolved here: to_dict() and a resumed run see the value used
            self.window_substeps = DX_WINDOW_SUBSTEPS if self.policy_type == "DX" else 0
        need_int("window_substeps", 0)
        need_real("gm_dropout")
        if not 0.0 <= self.gm_dropout < 1.0:
            raise ValueError(f"PiIDConfig.gm_dropout must lie in [0, 1), got {self.gm_dropout}")
        if self.gm_dropout > 0 and self.policy_type != "GMFlow":
            raise ValueError(f"PiIDConfig.gm_dropout applies to GMFlow policies only; set it to 0 for {self.policy_type!r}")
        need_real("final_step_size_scale", positive=True)
        need_real("shift", positive=True)
        need_real("base_logshift")
        need_real("max_logshift")
        if not isinstance(self.use_dynamic_shifting, bool):
            raise ValueError(f"PiIDConfig.use_dynamic_shifting must be a bool, got {self.use_dynamic_shifting!r}")
        if self.use_dynamic_shifting and self.base_seq_len == self.max_seq_len:
            raise ValueError("PiIDConfig: dynamic shifting needs base_seq_len != max_seq_len")
        need_real("loss_scale", positive=True)
        need_real("num_train_timesteps", positive=True)
        need_real("dx_segment_size", positive=True, allow_none=True)
        need_real("dx_shift", positive=True, allow_none=True)
        if self.dx_mode not in ("grid", "polynomial"):
            raise ValueError(f"PiIDConfig.dx_mode must be 'grid' or 'polynomial', got {self.dx_mode!r}")
        need_real("eps", positive=True)
        if not self.eps < 0.1:
            raise ValueError(f"PiIDConfig.eps must be small (< 0.1), got {self.eps}")
        check_substep_rule(self.substep_rule, "PiIDConfig.substep_rule")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"PiIDConfig.backend must be None or one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PiIDConfig:
        """Build from a mapping (e.g. a TOML/JSON table); unknown keys raise a ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PiIDConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def base_segment_size(self) -> float:
        """Raw-time length of every segment but the last: 1 / (nfe - 1 + f)."""
        return 1.0 / (self.nfe - 1 + self.final_step_size_scale)

    @property
    def final_segment_size(self) -> float:
        """Raw-time length of the last segment: f / (nfe - 1 + f)."""
        return self.final_step_size_scale * self.base_segment_size

    def segment_sizes(self) -> list[float]:
        """The nfe segment lengths from raw time 1 down to 0 (they sum to 1)."""
        return [self.base_segment_size] * (self.nfe - 1) + [self.final_segment_size]

    def seq_len_of(self, x: torch.Tensor) -> int:
        """The dynamic shift's sequence length of latents ``x`` (B, C, *S): ``prod(S) / token_size**2``."""
        return math.prod(x.shape[2:]) // (self.token_size**2)

    def shift_for(self, seq_len: int) -> float:
        """The raw-time -> sigma shift for latents with ``seq_len`` positions."""
        if self.use_dynamic_shifting:
            return dynamic_shift(seq_len, self.base_seq_len, self.max_seq_len, self.base_logshift, self.max_logshift)
        return self.shift

    def dx_policy_kwargs(self) -> dict[str, Any]:
        """segment_size, shift and mode of the DX policy (intrinsic: keep them at sampling time)."""
        return {
            "segment_size": self.base_segment_size if self.dx_segment_size is None else self.dx_segment_size,
            "shift": self.shift if self.dx_shift is None else self.dx_shift,
            "mode": self.dx_mode,
        }

    def sampling_settings(self) -> dict[str, Any]:
        """The :class:`~piflow_kernels.PiFlowScheduler` config keys that sampling a student distilled with this
        config should use: what :func:`~piflow_kernels.distill.evaluation.scheduler_for` takes from it, less the
        backend (how to compute, not what), as plain JSON values.

        Keys: ``policy_type``, ``shift``, ``use_dynamic_shifting``, ``dynamic_shifting_type`` ("exp", the rule of
        :meth:`shift_for`), ``base_seq_len``, ``max_seq_len``, ``base_logshift``, ``max_logshift``,
        ``final_step_size_scale``, ``total_substeps``, ``substep_rule``, ``num_train_timesteps`` (an int), and for a
        DX policy ``dx_segment_size``, ``dx_shift``, ``dx_mode`` as :meth:`dx_policy_kwargs` resolves them (the
        segment defaults to the NFE segment, the shift to ``shift``). The GM temperature and the re-noising ``h``
        are not pi-ID settings: the scheduler's defaults (1 and 0, what ``sample_with`` uses) apply. The step count
        is ``nfe`` (a student records it as ``num_inference_steps``).

        ``pk.sample(student, noise, cfg.nfe, scheduler=PiFlowScheduler(**cfg.sampling_settings()))`` samples what
        ``sample_with(student, noise, cfg)`` does, bit for bit; a :class:`~piflow_kernels.PiFlowStudent` given the
        dict as ``sampling`` (and ``nfe`` as ``num_inference_steps``) does it with ``pk.sample(student, noise)``.

        Raises:
            ValueError: ``num_train_timesteps`` is not an integer (the scheduler takes an int).
        """
        if self.num_train_timesteps != int(self.num_train_timesteps):
            raise ValueError(
                f"PiFlowScheduler takes an integer num_train_timesteps, the pi-ID config has {self.num_train_timesteps}"
            )
        settings: dict[str, Any] = {
            "policy_type": self.policy_type,
            "shift": self.shift,
            "use_dynamic_shifting": self.use_dynamic_shifting,
            "dynamic_shifting_type": "exp",
            "base_seq_len": self.base_seq_len,
            "max_seq_len": self.max_seq_len,
            "base_logshift": self.base_logshift,
            "max_logshift": self.max_logshift,
            "final_step_size_scale": self.final_step_size_scale,
            "total_substeps": self.total_substeps,
            "substep_rule": self.substep_rule,
            "num_train_timesteps": int(self.num_train_timesteps),
        }
        if self.policy_type == "DX":
            settings.update({f"dx_{name}": value for name, value in self.dx_policy_kwargs().items()})
        return settings


def teacher_ratio(cfg: PiIDConfig, iteration: int) -> float:
    """Scheduled-mixing teacher ratio: 1 - min(iteration, n) / n for n = num_decay_iters > 0, else 0."""
    n = cfg.num_decay_iters
    if n <= 0:
        return 0.0
    return 1.0 - min(max(int(iteration), 0), n) / n
