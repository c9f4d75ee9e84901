"""Drop-in pi-Flow sampling for stock diffusers pipelines.

One call turns an existing ``FluxPipeline``, ``StableDiffusion3Pipeline`` (or ``QwenImagePipeline``, ``Flux2Pipeline``)
into a few-step pi-Flow sampler; the pipeline keeps its own prompt encoding, VAE decoding, callbacks and progress bar:

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

FLUX.2 editing. ``Flux2Pipeline`` appends the reference images' tokens after the generated image's (``img_ids``
time coordinate 10, 20, ...) and keeps the first L tokens of the prediction (``noise_pred[:, :L]``), as the
official ``PiFlux2Pipeline`` keeps the first L of the policy. :class:`PiFlowTransformer` returns a token-layout
policy that takes that slice (on its token axis), so the policy covers the generated image only.
``FluxKontextPipeline`` and ``QwenImageEditPipeline`` append their reference image's tokens and slice the same way.

Image-to-image (``FluxImg2ImgPipeline``, ``StableDiffusion3Img2ImgPipeline``, ``QwenImageImg2ImgPipeline``).
``strength`` starts the schedule part-way as the official pi-Flow sampler's ``denoise``: the raw grid of the
``num_inference_steps`` steps is multiplied by ``strength`` before the shift, and every step runs (stock diffusers
drops the first steps of the full grid instead). The converted ``__call__`` runs the stock one with ``strength=1``
inside :meth:`PiFlowPipelineScheduler.starting_at`; the stock ``scale_noise`` at ``timesteps[0]`` makes the start.

Guidance. pi-Flow students are guidance-distilled. FLUX's embedded guidance (``guidance_scale``, fed
to the network) works as usual. Classifier-free guidance (SD3's ``guidance_scale > 1``, FLUX / Qwen
``true_cfg_scale > 1`` with a negative prompt) would mix two policies arithmetically and is refused
with an error (true CFG as the call starts, before any step): call SD3 pipelines with ``guidance_scale=1.0``.

Video (Wan). ``WanPipeline`` (Wan2.1 text-to-video) keeps its latents as (B, C, T, H, W) and calls the transformer with
``t = sigma * 1000``; a ``WanTransformer3DModel`` student returns policy fields with the frame axis, (B, K, C, T, H, W),
and the scheduler steps the video latents as they are. Its ``UniPCMultistepScheduler``'s ``flow_shift`` becomes the
pi-Flow ``shift``. Call it with ``guidance_scale=1.0`` (its default, 5.0, is classifier-free guidance). Wan2.2's
two-stage denoising (``transformer_2``) and per-token timesteps (``expand_timesteps``) are refused. New: no official
pi-Flow video student exists.

Re-noising noise (``h > 0``). Stock pipelines do not pass their generator to ``scheduler.step``; the
noise then comes from ``pipe.scheduler.generator`` when set, else from torch's global RNG.

Default steps. A converted pipeline called without ``num_inference_steps`` (or ``sigmas`` / ``timesteps``)
samples with the student's distilled step count, kept in the scheduler config as
``default_num_inference_steps``.

Recorded sampling settings. A student that records the settings it was distilled with (``student.sampling``:
``shift``, ``final_step_size_scale``, ``total_substeps``, ``dx_segment_size``, ...) gets them in the converted
pipeline's scheduler: for each config key, an explicit keyword of :func:`to_piflow` > the student's recorded
setting > the pipeline's own scheduler config (e.g. FLUX's dynamic shifting) > the defaults. A scheduler passed
to :func:`to_piflow` is used as is (its config, under the explicit keywords).

Saving and loading. ``pipe.save_pretrained(folder)`` writes the student under ``transformer/`` and the
scheduler under ``scheduler/``; ``model_index.json`` names them ``["piflow_kernels.pipelines",
"PiFlowTransformer"]`` and ``["piflow_kernels.pipelines", "PiFlowPipelineScheduler"]``. diffusers resolves
such a library from the modules already imported, so ``FluxPipeline.from_pretrained(folder)`` loads it once
this module is imported; :func:`load_piflow_pipeline` also checks the student's files and restores the
default step count.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    # diffusers loads a component named ["piflow_kernels.pipelines", class] with the load method of the first of its
    # base classes (ModelMixin, SchedulerMixin, ...) that it finds *in this module*: both names must be importable here
    from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: F401
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
except ImportError as err:
    raise ImportError("piflow_kernels pipelines need diffusers: pip install 'piflow_kernels[diffusers]'") from err

from piflow_kernels.checks import positive_int
from piflow_kernels.files import DamagedFileError, check_torch_file, read_json, require_file, safetensors_metadata
from piflow_kernels.layouts import packed_to_tokens, tokens_to_packed
from piflow_kernels.outputs import DXOutput, GMFlowOutput
from piflow_kernels.sampling import student_settings, warn_differing
from piflow_kernels.scheduler import PiFlowScheduler, check_strength
from piflow_kernels.students import PiFlowStudent

__all__ = ["to_piflow", "load_piflow_pipeline", "PiFlowTransformer", "PiFlowPipelineScheduler"]

logger = logging.getLogger(__name__)

# pipelines whose denoising loop this module is tested against (others with the same loop may work)
TESTED_PIPELINES = (
    "FluxPipeline", "StableDiffusion3Pipeline", "QwenImagePipeline", "Flux2Pipeline",
    "FluxImg2ImgPipeline", "StableDiffusion3Img2ImgPipeline", "QwenImageImg2ImgPipeline",  # strength: part-way start
    "FluxKontextPipeline", "QwenImageEditPipeline",  # editing: the reference image's tokens after the generated image's
    "WanPipeline",  # video: latents (B, C, T, H, W), Wan2.1 text-to-video (one transformer, one timestep per sample)
)  # fmt: skip
# image-to-image pipelines whose ``strength`` starts the pi-Flow schedule part-way as the official sampler's ``denoise``
# (the raw grid times strength, every step run); they call set_timesteps, get_timesteps(n, strength), scale_noise
PART_WAY_PIPELINES = ("FluxImg2ImgPipeline", "StableDiffusion3Img2ImgPipeline", "QwenImageImg2ImgPipeline")

# sampling steps of a converted pipeline called without num_inference_steps when the student does not record
# its distilled step count: that of the released pi-FLUX / pi-Qwen-Image students and of PiIDConfig's nfe
DEFAULT_NUM_INFERENCE_STEPS = 4
_DEFAULT_STEPS_KEY = "default_num_inference_steps"
# frames between PiFlowTransformer.forward and the pipeline's __call__ (nn.Module's call wrappers, hooks)
_PIPELINE_FRAME_DEPTH = 8

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


class _TokenSlicing:
    """A token-layout policy output (fields (B, K, C, L, p2)) that a pipeline may slice as it slices a packed
    prediction (B, L, D): ``out[:, :n]`` keeps the first n tokens (``Flux2Pipeline``: the generated image's, the
    reference images' coming after them). Any other index is refused as by the plain output."""

    _SPATIAL = ("means", "logweights", "grid")

    def __getitem__(self, key: object) -> Any:
        if isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice):
            tokens = key[1]
            return type(self)(**{k: (v[:, :, :, tokens] if k in self._SPATIAL else v) for k, v in self.to_dict().items()})
        return super().__getitem__(key)


class _TokenGMFlowOutput(_TokenSlicing, GMFlowOutput):
    pass


class _TokenDXOutput(_TokenSlicing, DXOutput):
    pass


def _token_sliceable(out: GMFlowOutput | DXOutput) -> GMFlowOutput | DXOutput:
    """``out`` (token layout) as a :class:`_TokenSlicing` output."""
    if isinstance(out, _TokenSlicing):
        return out
    if isinstance(out, GMFlowOutput):
        return _TokenGMFlowOutput(means=out.means, logweights=out.logweights, logstds=out.logstds)
    return _TokenDXOutput(grid=out.grid)


class PiFlowPipelineScheduler(PiFlowScheduler):
    """:class:`~piflow_kernels.PiFlowScheduler` for stock diffusers pipelines (same config and maths).

    Differences from the parent, all about fitting the pipelines' loops:

    - ``step`` also accepts packed latents ``sample`` (B, L, C*p2) with a token-layout policy output
      (fields (B, K, C, L, p2), as :class:`PiFlowTransformer` returns for FLUX); the result is packed too.
    - ``set_timesteps(sigmas=...)`` with the stock default ``linspace(1, 1/n, n)`` (which FLUX / Qwen-Image
      pipelines always pass) uses this scheduler's own grid instead, so ``final_step_size_scale`` holds.
    - the config also carries our dynamic-shift constants under the FlowMatch names the pipelines read
      to compute ``mu`` (``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift``).
    - one more config key, ``default_num_inference_steps`` (None: unset): the steps of ``set_timesteps()``
      without a step count, and of a converted pipeline called without ``num_inference_steps``
      (:func:`to_piflow` records the student's distilled step count there).

    Set ``generator`` for the re-noising noise (``h > 0``): stock pipelines do not pass theirs to ``step``.
    """

    def __init__(self, *args: Any, default_num_inference_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._call_strength: float | None = None  # set by an image-to-image pipeline's call (:meth:`starting_at`)
        if default_num_inference_steps is not None:
            default_num_inference_steps = positive_int(_DEFAULT_STEPS_KEY, default_num_inference_steps)
        cfg = self.config
        self.register_to_config(
            **{theirs: cfg[ours] for theirs, ours in _FLOW_MATCH_ALIASES.items()},
            default_num_inference_steps=default_num_inference_steps,
        )

    @contextlib.contextmanager
    def starting_at(self, strength: float) -> Iterator[None]:
        """Within the block, ``set_timesteps`` without a ``strength`` of its own uses ``strength`` (a converted
        image-to-image pipeline's call sets it: the stock pipeline then runs with strength 1 on the part-way grid)."""
        previous, self._call_strength = self._call_strength, check_strength(strength)
        try:
            yield
        finally:
            self._call_strength = previous

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Any = None,
        mu: float | None = None,
        seq_len: int | None = None,
        strength: float | None = None,
    ) -> None:
        """:meth:`PiFlowScheduler.set_timesteps`; ``strength`` None takes the one of :meth:`starting_at`, if any."""
        if strength is None:
            strength = getattr(self, "_call_strength", None)
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, seq_len=seq_len, strength=strength)

    def _interpret_sigmas(self, num_inference_steps: int | None, sigmas: object) -> tuple[int | None, object]:
        """The stock default ``sigmas = linspace(1, 1/n, n)`` means n steps of this scheduler's own grid (they
        agree when ``final_step_size_scale == 1``); other sigmas are used as given. Neither a step count nor
        sigmas: ``default_num_inference_steps`` steps when set."""
        if sigmas is None and num_inference_steps is None:
            return self.config.get(_DEFAULT_STEPS_KEY), None
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


def _with_default_steps_parameter(signature: inspect.Signature) -> inspect.Signature:
    """The parent's ``__init__`` signature plus ``default_num_inference_steps`` (diffusers' ``from_config`` passes
    only the keys it finds there)."""
    extra = inspect.Parameter(_DEFAULT_STEPS_KEY, inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None")
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    tail = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=[*params, extra, *tail])


PiFlowPipelineScheduler.__init__.__signature__ = _with_default_steps_parameter(inspect.signature(PiFlowScheduler.__init__))


def _trunk_attribute(name: str) -> property:
    """A ModelMixin class attribute (checkpointing support, no-split modules, ...) read from the wrapped trunk."""
    return property(lambda self: getattr(self.student.trunk, name, getattr(ModelMixin, name, None)))


def _weights_name(name: str, variant: str | None) -> str:
    """diffusers' variant file name: ``diffusion_pytorch_model.fp16.safetensors``, ``....index.fp16.json``."""
    if not variant:
        return name
    head, _, ext = name.rpartition(".")
    return f"{head}.{variant}.{ext}"


def check_student_folder(folder: str | os.PathLike, variant: str | None = None) -> None:
    """Check a saved student's files (config.json and weights, shards included) before diffusers reads them.

    A missing file is a ``FileNotFoundError`` naming it; a file that does not read as what it should be a
    :class:`~piflow_kernels.files.DamagedFileError` naming it (truncated weights, garbled JSON, another
    model's config).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = read_json(config_path, "pi-Flow student config")
    if not isinstance(config, dict) or config.get("_class_name") != PiFlowStudent.__name__:
        got = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise DamagedFileError(config_path, f"pi-Flow student config: _class_name is {got!r}, expected 'PiFlowStudent'")
    single = [(SAFETENSORS_WEIGHTS_NAME, safetensors_metadata), (WEIGHTS_NAME, check_torch_file)]
    for name, check in single:
        path = folder / _weights_name(name, variant)
        if path.is_file():
            check(path, "pi-Flow student weights")
            return
    for name, check in ((SAFE_WEIGHTS_INDEX_NAME, safetensors_metadata), (WEIGHTS_INDEX_NAME, check_torch_file)):
        index_path = folder / _weights_name(name, variant)
        if not index_path.is_file():
            continue
        index = read_json(index_path, "pi-Flow student weights index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise DamagedFileError(index_path, "pi-Flow student weights index: no weight_map")
        for shard in sorted(set(weight_map.values())):
            check(require_file(folder / str(shard), f"pi-Flow student weights shard named in {index_path.name}"),
                  "pi-Flow student weights shard")  # fmt: skip
        return
    require_file(folder / _weights_name(SAFETENSORS_WEIGHTS_NAME, variant), "pi-Flow student weights")


class PiFlowTransformer(ModelMixin):
    """A :class:`~piflow_kernels.PiFlowStudent` in the place of a pipeline's transformer.

    Called exactly like the teacher (``hidden_states``, ``timestep``, conditioning, ``return_dict``); returns
    the policy output (``return_dict=False``: a 1-tuple holding it) from
    :meth:`PiFlowStudent.forward_native`; for token-layout students one that ``[:, :L]`` slices on its token axis,
    as ``Flux2Pipeline`` slices its prediction to the generated image's tokens. ``config`` is the teacher's config (pipelines read
    ``in_channels``, ``patch_size``, ``guidance_embeds``); other attributes fall through to the trunk.

    A diffusers model for the pipeline's ``save_pretrained`` / ``from_pretrained``: it saves the student
    (``PiFlowStudent.save_pretrained``, a folder ``PiFlowStudent.from_pretrained`` reads too) and loads one.
    """

    _supports_gradient_checkpointing = _trunk_attribute("_supports_gradient_checkpointing")
    _no_split_modules = _trunk_attribute("_no_split_modules")
    _keep_in_fp32_modules = _trunk_attribute("_keep_in_fp32_modules")
    _skip_layerwise_casting_patterns = _trunk_attribute("_skip_layerwise_casting_patterns")
    _repeated_blocks = _trunk_attribute("_repeated_blocks")

    def __init__(self, student: PiFlowStudent, pipeline: object | None = None) -> None:
        super().__init__()
        if not isinstance(student, PiFlowStudent):
            raise TypeError(f"student must be a PiFlowStudent (see build_student), got {type(student).__name__}")
        self.student = student
        self.training = student.training
        self._pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        """The student's ``save_pretrained`` (config.json with the teacher's config, and the weights)."""
        if max_shard_size is not None:
            kwargs["max_shard_size"] = max_shard_size
        self.student.save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> PiFlowTransformer:
        """A saved student (``PiFlowStudent.from_pretrained`` with the same arguments), wrapped. A local folder's
        files are checked first: a missing or damaged config or weights file is an error naming it."""
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        if folder.is_dir():
            check_student_folder(folder, kwargs.get("variant"))
        return cls(PiFlowStudent.from_pretrained(pretrained_model_name_or_path, **kwargs))

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
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """The trunk's cache context; the "uncond" branch (true classifier-free guidance) is refused. Keywords
        (``WanPipeline``'s ``step_index``, ``sigma``, ...) go to the trunk's."""
        if name == "uncond":
            raise ValueError(_TRUE_CFG_MESSAGE)
        inner = getattr(self.student.trunk, "cache_context", None)
        if inner is None:
            yield
            return
        with inner(name, **kwargs):
            yield

    def _pipeline(self) -> object | None:
        """The pipeline this transformer belongs to: the one given at conversion, else (a pipeline built by
        diffusers' ``from_pretrained``) the calling pipeline, found once on the call stack."""
        pipe = self._pipeline_ref() if self._pipeline_ref is not None else None
        if pipe is not None:
            return pipe
        frame = sys._getframe(2)
        for _ in range(_PIPELINE_FRAME_DEPTH):
            if frame is None:
                break
            caller = frame.f_locals.get("self")
            if isinstance(caller, DiffusionPipeline) and getattr(caller, "transformer", None) is self:
                self._pipeline_ref = weakref.ref(caller)
                return caller
            frame = frame.f_back
        return None

    def forward(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> GMFlowOutput | DXOutput | tuple:
        pipe = self._pipeline()
        if pipe is not None and getattr(type(pipe), "do_classifier_free_guidance", None) is not None:
            if pipe.do_classifier_free_guidance:
                raise ValueError(
                    f"{type(pipe).__name__} is running classifier-free guidance (guidance_scale = "
                    f"{getattr(pipe, 'guidance_scale', '?')} > 1), which a pi-Flow student does not support: it is "
                    "guidance-distilled. Call the pipeline with guidance_scale=1.0."
                )
        out = self.student.forward_native(*args, **kwargs)
        if self.student.latent_layout == "tokens":
            out = _token_sliceable(out)  # Flux2Pipeline keeps noise_pred[:, :L], the generated image's tokens
        return out if return_dict else (out,)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            student = self.__dict__.get("_modules", {}).get("student")
            if student is None:
                raise
            return getattr(student.trunk, name)


def _fill_default_steps(pipe: Any, signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` plus ``num_inference_steps`` = the scheduler's ``default_num_inference_steps`` when the call gives
    no step count, sigmas or timesteps."""
    scheduler = getattr(pipe, "scheduler", None)
    steps = scheduler.config.get(_DEFAULT_STEPS_KEY) if isinstance(scheduler, PiFlowPipelineScheduler) else None
    if steps is None or "num_inference_steps" not in signature.parameters:
        return kwargs
    try:
        given = signature.bind_partial(pipe, *args, **kwargs).arguments
    except TypeError:  # the pipeline's own call raises it, with its own message
        return kwargs
    if "num_inference_steps" in given or any(given.get(k) is not None for k in ("sigmas", "timesteps")):
        return kwargs
    return {**kwargs, "num_inference_steps": steps}


_TRUE_CFG_MESSAGE = (
    "true classifier-free guidance (true_cfg_scale > 1 with a negative prompt) is not supported with a "
    "pi-Flow student: it would mix two policies arithmetically. Drop the negative prompt or set "
    "true_cfg_scale=1 (FLUX's embedded guidance_scale works as usual)."
)


def _bound_arguments(signature: inspect.Signature, pipe: Any, args: tuple, kwargs: dict) -> inspect.BoundArguments | None:
    try:
        return signature.bind_partial(pipe, *args, **kwargs)
    except TypeError:  # the pipeline's own call raises it, with its own message
        return None


def _check_true_cfg(pipe: Any, signature: inspect.Signature, args: tuple, kwargs: dict) -> None:
    """Refuse true CFG before the pipeline runs (``FluxKontextPipeline`` / ``FluxImg2ImgPipeline`` call the negative
    branch without the "uncond" cache context that :meth:`PiFlowTransformer.cache_context` refuses)."""
    if "true_cfg_scale" not in signature.parameters:
        return
    bound = _bound_arguments(signature, pipe, args, kwargs)
    if bound is None:
        return
    given = bound.arguments
    scale = given.get("true_cfg_scale", signature.parameters["true_cfg_scale"].default)
    negative = any(given.get(k) is not None for k in ("negative_prompt", "negative_prompt_embeds"))
    if negative and isinstance(scale, (int, float)) and scale > 1:
        raise ValueError(_TRUE_CFG_MESSAGE)


def _part_way_call(pipe: Any, signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[float, tuple, dict] | None:
    """For an image-to-image pipeline of :data:`PART_WAY_PIPELINES` with a :class:`PiFlowPipelineScheduler`:
    (strength, args, kwargs) with the call's ``strength`` (else the pipeline's default) checked and replaced by 1, so
    that the stock ``get_timesteps`` keeps every step of the grid the scheduler lays out from ``strength``. None for
    other pipelines."""
    base = getattr(type(pipe), "_piflow_base_class", type(pipe))
    if base.__name__ not in PART_WAY_PIPELINES or "strength" not in signature.parameters:
        return None
    if not isinstance(getattr(pipe, "scheduler", None), PiFlowPipelineScheduler):
        return None
    bound = _bound_arguments(signature, pipe, args, kwargs)
    if bound is None:
        return None
    default = signature.parameters["strength"].default
    strength = check_strength(bound.arguments.get("strength", None if default is inspect.Parameter.empty else default))
    bound.arguments["strength"] = 1.0
    return strength, bound.args[1:], bound.kwargs


@functools.cache
def _piflow_pipeline_class(cls: type) -> type:
    """``cls`` with a ``__call__`` whose default step count is the scheduler's ``default_num_inference_steps``.

    Same name, module and everything else: ``save_pretrained`` records ``cls``'s name, and ``cls.from_pretrained``
    loads the folder.
    """
    base_call = cls.__call__
    signature = inspect.signature(base_call)

    @functools.wraps(base_call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs = _fill_default_steps(self, signature, args, kwargs)
        _check_true_cfg(self, signature, args, kwargs)
        part_way = _part_way_call(self, signature, args, kwargs)
        if part_way is None:
            return base_call(self, *args, **kwargs)
        strength, args, kwargs = part_way
        with self.scheduler.starting_at(strength):
            return base_call(self, *args, **kwargs)

    namespace = {"__call__": __call__, "_piflow_base_class": cls, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}  # fmt: skip
    return type(cls.__name__, (cls,), namespace)


def _adopt(pipe: Any) -> Any:
    """Make ``pipe`` (a DiffusionPipeline with a PiFlowTransformer) sample with the default step count."""
    if isinstance(pipe, DiffusionPipeline):
        cls = type(pipe)
        pipe.__class__ = _piflow_pipeline_class(cls.__dict__.get("_piflow_base_class", cls))
    if isinstance(pipe.transformer, PiFlowTransformer):
        pipe.transformer._pipeline_ref = weakref.ref(pipe)
    return pipe


def _check_scheduler_config(scheduler_config: dict[str, Any], student: PiFlowStudent) -> None:
    """``to_piflow``'s explicit scheduler keywords: PiFlowScheduler config keys (the default step count has its own
    argument), with the student's policy type."""
    accepted = [n for n in inspect.signature(PiFlowScheduler.__init__).parameters if n != "self"]
    if _DEFAULT_STEPS_KEY in scheduler_config:
        raise TypeError(f"to_piflow takes the default step count as num_inference_steps, not {_DEFAULT_STEPS_KEY}")
    unknown = sorted(set(scheduler_config) - set(accepted))
    if unknown:
        raise TypeError(f"to_piflow got unknown scheduler config keys {unknown}; known: {', '.join(accepted)}")
    if scheduler_config.get("policy_type", student.policy_type) != student.policy_type:
        raise ValueError(
            f"to_piflow: policy_type={scheduler_config['policy_type']!r} but the student outputs "
            f"{student.policy_type!r} policies"
        )


def _check_wan(pipe: Any) -> None:
    """``WanPipeline``: one transformer (Wan2.1), one timestep per sample; Wan2.2's two-stage denoising
    (``transformer_2``, ``boundary_ratio``) and per-token timesteps (``expand_timesteps``) are refused."""
    config = getattr(pipe, "config", {})
    if getattr(pipe, "transformer_2", None) is not None or config.get("boundary_ratio") is not None:
        raise ValueError(
            "to_piflow: a WanPipeline with a second transformer (Wan2.2 two-stage denoising, transformer_2 / "
            "boundary_ratio) is not supported: a student replaces one transformer for the whole schedule"
        )
    if config.get("expand_timesteps"):
        raise ValueError(
            "to_piflow: a WanPipeline with expand_timesteps=True (Wan2.2 TI2V, one timestep per token) is not supported: "
            "a pi-Flow student takes one timestep per sample"
        )


# the keys of WanPipeline's UniPCMultistepScheduler (flow sigmas) that PiFlowScheduler does not take; flow_shift is
# its time shift, the same sigma -> shift * sigma / (1 + (shift - 1) * sigma) as a flow-matching scheduler's shift
_UNIPC_FLOW_KEYS = ("flow_shift", "use_flow_sigmas", "prediction_type")


def _scheduler_base_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A pipeline's scheduler config as PiFlowScheduler config keys (``flow_shift`` read as ``shift``)."""
    out = dict(config)
    if out.get("flow_shift") is not None and "shift" not in out:
        out["shift"] = out["flow_shift"]
    if "flow_shift" in config:
        for key in _UNIPC_FLOW_KEYS:
            out.pop(key, None)
    return out


def to_piflow(
    pipe: Any,
    student: PiFlowStudent,
    scheduler: PiFlowScheduler | None = None,
    *,
    num_inference_steps: int | None = None,
    **scheduler_config: Any,
) -> Any:
    """Turn a stock diffusers pipeline into a few-step pi-Flow sampler (in place; returns ``pipe``).

    The scheduler's config, key by key, highest first: ``scheduler_config`` (explicit keywords) > the student's
    recorded sampling settings (``student.sampling``) > the pipeline's current scheduler config (FLUX's dynamic
    shifting and shift, ...; FlowMatch key names are understood) > :class:`PiFlowScheduler`'s defaults. A
    ``scheduler`` given takes the place of the last three: it is used as is, under ``scheduler_config`` (a
    warning names the recorded settings it sets otherwise).

    Args:
        pipe: a ``FluxPipeline``, ``StableDiffusion3Pipeline``, ``QwenImagePipeline`` or ``Flux2Pipeline`` (its
            reference images for editing included), one of their image-to-image pipelines (``strength``: a
            part-way start) or ``FluxKontextPipeline`` / ``QwenImageEditPipeline`` (:data:`TESTED_PIPELINES`; others with the same
            denoising loop and a ``transformer`` of the student's teacher class may work; untested), or a
            pipeline already converted (its student is replaced).
        student: a :class:`~piflow_kernels.PiFlowStudent` built from the pipeline's transformer class.
        scheduler: a :class:`~piflow_kernels.PiFlowScheduler` with the student's policy type (its config is
            copied into a :class:`PiFlowPipelineScheduler`); None builds the scheduler from the student's recorded
            settings over the pipeline's current scheduler config, with ``policy_type`` set to the student's.
        num_inference_steps: the pipeline's step count when called without one; None takes the student's
            distilled step count (``student.config.num_inference_steps``), else that of a given
            :class:`PiFlowPipelineScheduler` (``default_num_inference_steps``), else
            :data:`DEFAULT_NUM_INFERENCE_STEPS` (4). Recorded in the scheduler config, so it is saved with it.
        **scheduler_config: :class:`PiFlowScheduler` config keys that win over everything else (e.g.
            ``temperature="auto"``, ``h=0.5``); an unknown key is a ``TypeError``.

    Returns:
        ``pipe``, whose ``transformer`` is a :class:`PiFlowTransformer` and ``scheduler`` a
        :class:`PiFlowPipelineScheduler`. A diffusers pipeline also gets its own subclass of its class (same
        name) whose ``__call__`` defaults ``num_inference_steps`` to the scheduler's
        ``default_num_inference_steps``; ``save_pretrained`` writes a folder that :func:`load_piflow_pipeline`
        (or the pipeline class's ``from_pretrained``) reads back.

    Example:
        >>> pipe = to_piflow(FluxPipeline.from_pretrained(...), student, PiFlowScheduler(shift=3.2))
        >>> image = pipe("a cat", num_inference_steps=4).images[0]
        >>> pipe = to_piflow(pipe, distilled_student, temperature=0.7)   # its recorded settings, T = 0.7
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
    if num_inference_steps is not None:
        num_inference_steps = positive_int("num_inference_steps", num_inference_steps)
    _check_scheduler_config(scheduler_config, student)
    if pipe_name == "WanPipeline":
        _check_wan(pipe)
    if pipe_name not in TESTED_PIPELINES:
        logger.warning("to_piflow: %s is not among the tested pipelines %s", pipe_name, TESTED_PIPELINES)

    if scheduler is None:
        # explicit keywords > the student's recorded settings > the pipeline's scheduler config > the defaults
        settings = {**student.sampling, **scheduler_config, "policy_type": student.policy_type}
        new_scheduler = PiFlowPipelineScheduler.from_config(_scheduler_base_config(pipe.scheduler.config), **settings)
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
        if isinstance(scheduler, PiFlowPipelineScheduler) and not scheduler_config:
            new_scheduler = scheduler
        else:
            new_scheduler = PiFlowPipelineScheduler.from_config(scheduler.config, **scheduler_config)
        warn_differing("to_piflow", new_scheduler.config, student_settings(student))

    if new_scheduler.config.num_train_timesteps != 1000:
        logger.warning(
            "to_piflow: stock pipelines divide timesteps by 1000 (FLUX) or pass them as is (SD3); "
            "num_train_timesteps=%s changes what the student sees",
            new_scheduler.config.num_train_timesteps,
        )
    steps = num_inference_steps if num_inference_steps is not None else student.num_inference_steps
    if steps is None and scheduler is not None:
        steps = new_scheduler.config.get(_DEFAULT_STEPS_KEY)
    if steps is None:
        steps = DEFAULT_NUM_INFERENCE_STEPS
        logger.info(
            "to_piflow: the student does not record its distilled step count; calls without num_inference_steps "
            "take %d steps (pass to_piflow(..., num_inference_steps=n) to change it)",
            steps,
        )
    new_scheduler.register_to_config(**{_DEFAULT_STEPS_KEY: steps})
    pipe.transformer = PiFlowTransformer(student, pipe)
    pipe.scheduler = new_scheduler
    return _adopt(pipe)


class _DropExpectedTypeWarning(logging.Filter):
    """diffusers' from_pretrained warns that the transformer is not the class the pipeline's __init__ names."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Expected types for transformer") and PiFlowTransformer.__name__ in message)


def check_saved_pipeline(folder: str | os.PathLike, variant: str | None = None) -> dict:
    """Check the files of a folder written by a converted pipeline's ``save_pretrained``; return its model index.

    ``model_index.json``, the scheduler config and the student's files (:func:`check_student_folder`) must be there
    and readable: a missing one is a ``FileNotFoundError``, a damaged one a
    :class:`~piflow_kernels.files.DamagedFileError`, each naming the file.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = read_json(index_path, "pipeline index")
    if not isinstance(index, dict):
        raise DamagedFileError(index_path, f"pipeline index: a JSON object expected, got {type(index).__name__}")
    expected = {"transformer": PiFlowTransformer, "scheduler": PiFlowPipelineScheduler}
    for name, cls in expected.items():
        entry = index.get(name)
        if entry != [cls.__module__, cls.__name__]:
            raise ValueError(
                f"{index_path}: {name} is {entry!r}, not [{cls.__module__!r}, {cls.__name__!r}]: not a folder saved from "
                "a pipeline converted with to_piflow (convert a stock pipeline with to_piflow(pipe, student))"
            )
    read_json(folder / "scheduler" / "scheduler_config.json", "pi-Flow scheduler config")
    check_student_folder(folder / "transformer", variant)
    return index


def load_piflow_pipeline(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load a pipeline saved by a converted pipeline's ``save_pretrained``: the same pipeline, bit for bit.

    diffusers' ``DiffusionPipeline.from_pretrained`` with the same keyword arguments (``dtype``,
    ``device_map``, components to use instead of the saved ones, ...), after checking the folder's files
    (:func:`check_saved_pipeline`; errors name the missing or damaged file). Components the folder records as
    absent (``[null, null]`` in ``model_index.json``, e.g. text encoders left out) load as None unless given. The
    result samples with the saved default step count when called without ``num_inference_steps``, and with the
    saved scheduler, whose config is the one :func:`to_piflow` built (the student's recorded sampling settings
    included); the student keeps its ``sampling`` and ``num_inference_steps``.

    Example:
        >>> pipe = to_piflow(FluxPipeline.from_pretrained(...), student, PiFlowScheduler(shift=3.2))
        >>> pipe.save_pretrained("pi-flux")
        >>> pipe = load_piflow_pipeline("pi-flux", dtype=torch.bfloat16)
    """
    folder = Path(pretrained_model_name_or_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (a pipeline saved with save_pretrained)")
    index = check_saved_pipeline(folder, kwargs.get("variant"))
    for name, entry in index.items():
        if not name.startswith("_") and isinstance(entry, list) and entry == [None, None]:
            kwargs.setdefault(name, None)
    quiet = _DropExpectedTypeWarning()
    pipeline_logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    pipeline_logger.addFilter(quiet)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    finally:
        pipeline_logger.removeFilter(quiet)
    return _adopt(pipe)
