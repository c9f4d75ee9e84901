"""Drop-in pi-Flow sampling for stock diffusers pipelines.

One call turns an existing ``FluxPipeline``, ``StableDiffusion3Pipeline`` (or ``QwenImagePipeline``) into a
few-step pi-Flow sampler; the pipeline keeps its own prompt encoding, VAE decoding, callbacks and progress bar:

    >>> pipe = to_piflow(pipe, student, PiFlowScheduler(shift=3.2, final_step_size_scale=0.5))
    >>> image = pipe(prompt, num_inference_steps=4, guidance_scale=3.5).images[0]   # FLUX
    >>> image = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).images[0]   # SD3

How it works. Stock pipelines run ``noise_pred = self.transformer(..., return_dict=False)[0]`` then
``latents = self.scheduler.step(noise_pred, t, latents)[0]``. :func:`to_piflow` installs

- :class:`PiFlowTransformer` as ``pipe.transformer``: called exactly like the teacher, it returns a
  1-tuple holding the student's policy output (a :class:`~piflow_kernels.GMFlowOutput` or
  :class:`~piflow_kernels.DXOutput`), which the pipeline hands unchanged to the scheduler;
- :class:`PiFlowPipelineScheduler` as ``pipe.scheduler``: a :class:`~piflow_kernels.PiFlowScheduler`
  that also accepts FLUX's packed latents (B, L, 4C).

Packed latents. FLUX (and Qwen-Image) pipelines keep latents packed as (B, L, 4C): L tokens of 2x2
pixels with C channels each. The GMFlow mixture is per pixel (weights shared by the C channels of a
pixel) and both policies treat pixels independently, so the policy runs on the *token layout*
(B, C, L, 4): a free reshape of the packed latents that keeps per-pixel semantics and needs no
image height or width. The student's FLUX head returns its policy in that layout too.

Guidance. pi-Flow students are guidance-distilled. FLUX's embedded guidance (``guidance_scale``, fed
to the network) works as usual. Classifier-free guidance (SD3's ``guidance_scale > 1``, FLUX / Qwen
``true_cfg_scale > 1`` with a negative prompt) would mix two policies arithmetically and is refused
with an error: call SD3 pipelines with ``guidance_scale=1.0``.

Re-noising noise (``h > 0``). Stock pipelines do not pass their generator to ``scheduler.step``; the
noise then comes from ``pipe.scheduler.generator`` when set, else from torch's global RNG.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from piflow_kernels.layouts import packed_to_tokens, tokens_to_packed
from piflow_kernels.outputs import DXOutput, GMFlowOutput
from piflow_kernels.scheduler import PiFlowScheduler
from piflow_kernels.students import PiFlowStudent

__all__ = ["to_piflow", "PiFlowTransformer", "PiFlowPipelineScheduler"]

logger = logging.getLogger(__name__)

# pipelines whose denoising loop this module is tested against (others with the same loop may work)
TESTED_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline", "QwenImagePipeline")

# our dynamic-shift keys under the names stock pipelines read to compute ``mu``
_FLOW_MATCH_ALIASES = {
    "base_image_seq_len": "base_seq_len",
    "max_image_seq_len": "max_seq_len",
    "base_shift": "base_logshift",
    "max_shift": "max_logshift",
}


def _policy_field(model_output: object) -> torch.Tensor | None:
    """The spatial field of a policy output: means (GMFlow) or grid (DX)."""
    if isinstance(model_output, torch.Tensor):
        return model_output
    for key in ("means", "grid"):
        value = model_output.get(key) if isinstance(model_output, Mapping) else getattr(model_output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


class PiFlowPipelineScheduler(PiFlowScheduler):
    """:class:`~piflow_kernels.PiFlowScheduler` for stock diffusers pipelines (same config and maths).

    Differences from the parent, all about fitting the pipelines' loops:

    - ``step`` also accepts packed latents ``sample`` (B, L, C*p2) with a token-layout policy output
      (fields (B, K, C, L, p2), as :class:`PiFlowTransformer` returns for FLUX); the result is packed too.
    - ``set_timesteps(sigmas=...)`` with the stock default ``linspace(1, 1/n, n)`` (which FLUX / Qwen-Image
      pipelines always pass) uses this scheduler's own grid instead, so ``final_step_size_scale`` holds.
    - the config also carries our dynamic-shift constants under the FlowMatch names the pipelines read
      to compute ``mu`` (``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift``).

    Set ``generator`` for the re-noising noise (``h > 0``): stock pipelines do not pass theirs to ``step``.
    """

    @functools.wraps(PiFlowScheduler.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.register_to_config(**{theirs: cfg[ours] for theirs, ours in _FLOW_MATCH_ALIASES.items()})

    def _interpret_sigmas(self, num_inference_steps: int | None, sigmas: object) -> tuple[int | None, object]:
        """The stock default ``sigmas = linspace(1, 1/n, n)`` means n steps of this scheduler's own grid (they
        agree when ``final_step_size_scale == 1``); other sigmas are used as given."""
        if sigmas is None or isinstance(sigmas, torch.Tensor):
            return num_inference_steps, sigmas
        values = np.asarray(sigmas, dtype=np.float64)
        n = values.shape[0] if values.ndim == 1 else 0
        if n >= 1 and np.allclose(values, np.linspace(1.0, 1.0 / n, n), rtol=0.0, atol=1e-9):
            if num_inference_steps is not None and num_inference_steps != n:
                raise ValueError(f"num_inference_steps={num_inference_steps} but {n} sigmas were given")
            return n, None
        return num_inference_steps, sigmas

    def _to_policy_layout(
        self, model_output: object, sample: torch.Tensor, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
        """Packed latents ``sample`` (B, L, C*p2) (FLUX) need a token-layout policy output, fields
        (B, K, C, L, p2): they become the token layout (B, C, L, p2), the result is packed again. ``noise``
        is shaped like ``sample``. Other latents pass through to :meth:`PiFlowScheduler.step` as they are."""
        if not (isinstance(sample, torch.Tensor) and sample.dim() == 3):
            return sample, noise, lambda x: x

        field = _policy_field(model_output)
        if field is None or field.dim() != 5:
            got = "no means/grid" if field is None else f"a field of shape {tuple(field.shape)}"
            raise ValueError(
                f"packed latents {tuple(sample.shape)} (B, L, C*p2) need a token-layout policy output with means / grid "
                f"of shape (B, K, C, L, p2) (PiFlowTransformer / PiFlowStudent.forward_native of a FLUX student); got {got}"
            )
        b, _, c, length, p2 = field.shape
        if tuple(sample.shape) != (b, length, c * p2):
            raise ValueError(
                f"packed latents must have shape (B, L, C*p2) = ({b}, {length}, {c * p2}) to match the policy output "
                f"{tuple(field.shape)}, got {tuple(sample.shape)}"
            )
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or noise.shape != sample.shape:
                got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise ValueError(f"noise must have the shape of sample {tuple(sample.shape)}, got {got}")
            noise = packed_to_tokens(noise, p2)
        return packed_to_tokens(sample, p2), noise, tokens_to_packed


class PiFlowTransformer(nn.Module):
    """A :class:`~piflow_kernels.PiFlowStudent` in the place of a pipeline's transformer.

    Called exactly like the teacher (``hidden_states``, ``timestep``, conditioning, ``return_dict``); returns
    the policy output (``return_dict=False``: a 1-tuple holding it) from
    :meth:`PiFlowStudent.forward_native`. ``config`` is the teacher's config (pipelines read
    ``in_channels``, ``patch_size``, ``guidance_embeds``); other attributes fall through to the trunk.
    """

    def __init__(self, student: PiFlowStudent, pipeline: object | None = None) -> None:
        super().__init__()
        if not isinstance(student, PiFlowStudent):
            raise TypeError(f"student must be a PiFlowStudent (see build_student), got {type(student).__name__}")
        self.student = student
        self._pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None

    @property
    def config(self) -> Any:
        return self.student.trunk.config

    @property
    def dtype(self) -> torch.dtype:
        return self.student.dtype

    @property
    def device(self) -> torch.device:
        return self.student.device

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """The trunk's cache context; the "uncond" branch (true classifier-free guidance) is refused."""
        if name == "uncond":
            raise ValueError(
                "true classifier-free guidance (true_cfg_scale > 1 with a negative prompt) is not supported with a "
                "pi-Flow student: it would mix two policies arithmetically. Drop the negative prompt or set "
                "true_cfg_scale=1 (FLUX's embedded guidance_scale works as usual)."
            )
        inner = getattr(self.student.trunk, "cache_context", None)
        if inner is None:
            yield
            return
        with inner(name):
            yield

    def forward(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> GMFlowOutput | DXOutput | tuple:
        pipe = self._pipeline_ref() if self._pipeline_ref is not None else None
        if pipe is not None and getattr(type(pipe), "do_classifier_free_guidance", None) is not None:
            if pipe.do_classifier_free_guidance:
                raise ValueError(
                    f"{type(pipe).__name__} is running classifier-free guidance (guidance_scale = "
                    f"{getattr(pipe, 'guidance_scale', '?')} > 1), which a pi-Flow student does not support: it is "
                    "guidance-distilled. Call the pipeline with guidance_scale=1.0."
                )
        out = self.student.forward_native(*args, **kwargs)
        return out if return_dict else (out,)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            student = self.__dict__.get("_modules", {}).get("student")
            if student is None:
                raise
            return getattr(student.trunk, name)


def to_piflow(pipe: Any, student: PiFlowStudent, scheduler: PiFlowScheduler | None = None) -> Any:
    """Turn a stock diffusers pipeline into a few-step pi-Flow sampler (in place; returns ``pipe``).

    Args:
        pipe: a ``FluxPipeline``, ``StableDiffusion3Pipeline`` or ``QwenImagePipeline`` (others with the same
            denoising loop and a ``transformer`` of the student's teacher class may work; untested), or a
            pipeline already converted (its student is replaced).
        student: a :class:`~piflow_kernels.PiFlowStudent` built from the pipeline's transformer class.
        scheduler: a :class:`~piflow_kernels.PiFlowScheduler` with the student's policy type (its config is
            copied into a :class:`PiFlowPipelineScheduler`); None converts the pipeline's current scheduler
            config (shift, dynamic shifting) with ``policy_type`` set to the student's.

    Returns:
        ``pipe``, whose ``transformer`` is a :class:`PiFlowTransformer` and ``scheduler`` a
        :class:`PiFlowPipelineScheduler`.

    Example:
        >>> pipe = to_piflow(FluxPipeline.from_pretrained(...), student, PiFlowScheduler(shift=3.2))
        >>> image = pipe("a cat", num_inference_steps=4).images[0]
    """
    if not isinstance(student, PiFlowStudent):
        raise TypeError(f"student must be a PiFlowStudent (see build_student), got {type(student).__name__}")
    pipe_name = type(pipe).__name__
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(pipe, "scheduler"):
        raise TypeError(
            f"to_piflow needs a diffusers pipeline with a transformer and a scheduler (e.g. {', '.join(TESTED_PIPELINES)}), "
            f"got {pipe_name}"
        )
    teacher = transformer.student.trunk if isinstance(transformer, PiFlowTransformer) else transformer
    if type(teacher).__name__ != student.teacher_class:
        raise ValueError(
            f"{pipe_name}.transformer is a {type(teacher).__name__} but the student was built from a "
            f"{student.teacher_class}: build it from the pipeline's transformer (build_student(pipe.transformer, ...))"
        )
    for key in ("in_channels", "out_channels", "patch_size"):
        ours, theirs = student.config.teacher_config.get(key), teacher.config.get(key)
        if ours != theirs:
            raise ValueError(
                f"the student's teacher has {key}={ours} but {pipe_name}.transformer has {key}={theirs}: "
                "build the student from this pipeline's transformer"
            )
    if pipe_name not in TESTED_PIPELINES:
        logger.warning("to_piflow: %s is not among the tested pipelines %s", pipe_name, TESTED_PIPELINES)

    if scheduler is None:
        new_scheduler = PiFlowPipelineScheduler.from_config(pipe.scheduler.config, policy_type=student.policy_type)
    else:
        if not isinstance(scheduler, PiFlowScheduler):
            raise TypeError(
                f"scheduler must be a PiFlowScheduler, got {type(scheduler).__name__} (PiFlowScheduler.from_config("
                "pipe.scheduler.config, ...) converts a flow-matching scheduler's config)"
            )
        if scheduler.config.policy_type != student.policy_type:
            raise ValueError(
                f"the scheduler's policy_type is {scheduler.config.policy_type!r} but the student outputs "
                f"{student.policy_type!r} policies"
            )
        if isinstance(scheduler, PiFlowPipelineScheduler):
            new_scheduler = scheduler
        else:
            new_scheduler = PiFlowPipelineScheduler.from_config(scheduler.config)

    if new_scheduler.config.num_train_timesteps != 1000:
        logger.warning(
            "to_piflow: stock pipelines divide timesteps by 1000 (FLUX) or pass them as is (SD3); "
            "num_train_timesteps=%s changes what the student sees",
            new_scheduler.config.num_train_timesteps,
        )
    pipe.transformer = PiFlowTransformer(student, pipe)
    pipe.scheduler = new_scheduler
    return pipe
