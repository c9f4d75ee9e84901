"""The pieces of a text-to-image evaluation: fixed prompts and noise, the teacher's reference samples, the paired
latent distance, decoding and the image grid.

    >>> ev = EvalPrompts.from_cache("cache/", num=8)                       # the first 8 prompts' embeddings
    >>> noise = fixed_noise(len(ev), (16, 128, 128), seed=0)               # the same noise on every evaluation
    >>> ref = teacher_samples(teacher, noise, 64, shift=3.0, **cond)       # once per run: the teacher's x0
    >>> x0 = sample_with(ema_student, noise, cfg.piid, **cond)             # every eval_every iterations
    >>> logs = paired_latent_distance(x0, ref)                             # {"mean_rms": ..., "mean_relative": ...}
    >>> save_grid(out / "eval_000200.png", decode_latents(vae, x0, "flux"), decode_latents(vae, ref, "flux"),
    ...           captions=ev.prompts)

Latents are in image layout ``(B, C, H, W)`` (FLUX's packed tokens unpacked); images are float ``(B, 3, H, W)``
in [0, 1]. Everything here runs without gradients.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from piflow_kernels.checks import check_float_tensor, count, is_int, positive_float
from piflow_kernels.distill.prompt_cache import PromptCache, _stack
from piflow_kernels.distill.teachers import as_velocity

__all__ = [
    "PIPELINE_KINDS",
    "EvalPrompts",
    "decode_latents",
    "euler_sigmas",
    "fixed_noise",
    "latents_preview",
    "paired_latent_distance",
    "save_grid",
    "teacher_samples",
]

PathLike = str | os.PathLike
PIPELINE_KINDS = ("flux", "sd3", "qwen", "flux2", "wan")
GRID_ROWS = ("student", "teacher")


# ---------------------------------------------------------------------------- the teacher's reference samples


def euler_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The ``num_steps + 1`` noise levels of the teacher's Euler sampler, float64, from 1 down to 0.

    ``warp(linspace(1, 0, num_steps + 1), shift)`` with ``warp(s) = shift * s / (1 + (shift - 1) * s)``
    ([eq:warp]): the grid of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)`` given the sigmas
    ``linspace(1, 1 / n, n)`` that FluxPipeline and QwenImagePipeline pass it, with its terminal 0
    (that scheduler computes in float32). StableDiffusion3Pipeline passes no sigmas, and the scheduler's own
    default grid ends its linspace at the shifted ``sigma_min`` instead, which differs slightly.
    """
    n = count("num_steps", num_steps)
    s = positive_float("shift", shift)
    raw = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    return s * raw / (1 + (s - 1) * raw)


@torch.no_grad()
def teacher_samples(
    teacher: Callable[..., Any],
    noise: torch.Tensor,
    num_steps: int,
    *,
    shift: float = 1.0,
    num_train_timesteps: float = 1000,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    **cond: Any,
) -> torch.Tensor:
    """The teacher's many-step sample from ``noise`` (B, C, *S) at sigma = 1: Euler on :func:`euler_sigmas`.

    Each step calls ``teacher(x_t, sigma * num_train_timesteps, **cond)`` (the teacher contract of
    :mod:`.teachers`: a ``(B,)`` timestep tensor in ``dtype``, the velocity ``u = eps - x0`` back, a tensor or an
    output with ``.sample``) and moves ``x <- x + (sigma_next - sigma) * u``, as diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``. The state is kept in ``dtype`` (float32; float64 for reference
    runs) on the device of ``noise``; the batch goes to the teacher as given (no chunking). Returns x0, (B, C, *S)
    in ``dtype``. As ``num_steps`` grows this converges to the teacher's ODE flow map.
    """
    if not callable(teacher):
        raise TypeError(f"teacher must be callable, got {type(teacher).__name__}")
    noise = check_float_tensor("noise", noise)
    if noise.dim() < 2 or noise.shape[0] == 0 or noise.numel() == 0:
        raise ValueError(f"noise must have shape (B, C, H, W) (or (B, C, *S)) with B >= 1, got {tuple(noise.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    sigmas = euler_sigmas(num_steps, shift).tolist()
    scale = positive_float("num_train_timesteps", num_train_timesteps)
    from tqdm.auto import tqdm

    x = noise.detach().to(dtype)
    b = x.shape[0]
    for i in tqdm(range(len(sigmas) - 1), desc="teacher samples", unit="step", disable=not progress):
        t = torch.full((b,), sigmas[i] * scale, dtype=dtype, device=x.device)
        u = as_velocity(teacher(x, t, **cond))
        if u.shape != x.shape:
            raise ValueError(f"the teacher returned a velocity of shape {tuple(u.shape)} for x_t of shape {tuple(x.shape)}")
        x = x + (sigmas[i + 1] - sigmas[i]) * u.to(dtype)
    return x


# ---------------------------------------------------------------------------- paired distance


def paired_latent_distance(student_x0: torch.Tensor, teacher_x0: torch.Tensor) -> dict[str, Any]:
    """How far each student sample lies from the teacher's sample of the same prompt and noise.

    Both (B, ...) of one shape. In float64 on the CPU: ``rms_i = sqrt(mean((student_i - teacher_i)^2))``
    and ``relative_i = rms_i / sqrt(mean(teacher_i^2))`` (0 where both are 0, inf where only the teacher
    sample is 0). Returns ``{"per_sample_rms": [B floats], "per_sample_relative": [B floats], "mean_rms":
    float, "mean_relative": float}``; a non-finite sample gives NaN or inf, not an error.
    """
    s = check_float_tensor("student_x0", student_x0)
    t = check_float_tensor("teacher_x0", teacher_x0)
    for name, x in (("student_x0", s), ("teacher_x0", t)):
        if x.dim() < 1 or x.shape[0] == 0 or x.numel() == 0:
            raise ValueError(f"{name} must have shape (B, ...) with B >= 1 and elements, got {tuple(x.shape)}")
    if s.shape != t.shape:
        raise ValueError(f"student_x0 and teacher_x0 must have one shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    s = s.detach().to("cpu", torch.float64).reshape(s.shape[0], -1)
    t = t.detach().to("cpu", torch.float64).reshape(t.shape[0], -1)
    rms = (s - t).square().mean(1).sqrt()
    ref = t.square().mean(1).sqrt()
    relative = torch.where(rms == 0, torch.zeros_like(rms), rms / ref)
    return {
        "per_sample_rms": rms.tolist(),
        "per_sample_relative": relative.tolist(),
        "mean_rms": float(rms.mean()),
        "mean_relative": float(relative.mean()),
    }


# ---------------------------------------------------------------------------- decoding


def _check_kind(pipeline_kind: object) -> str:
    if pipeline_kind not in PIPELINE_KINDS:
        raise ValueError(f"pipeline_kind must be one of {PIPELINE_KINDS}, got {pipeline_kind!r}")
    return pipeline_kind  # type: ignore[return-value]


def _image_latents(name: str, latents: object) -> torch.Tensor:
    """(B, C, H, W) latents; (B, C, 1, H, W) is accepted and its frame axis dropped."""
    x = check_float_tensor(name, latents)
    if x.dim() == 5 and x.shape[2] == 1:
        x = x[:, :, 0]
    if x.dim() != 4 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must have shape (B, C, H, W) (image layout, unpacked) with B >= 1, got {tuple(x.shape)}")
    return x


@torch.no_grad()
def latents_preview(latents: torch.Tensor) -> torch.Tensor:
    """A look at latents when there is no VAE: a preview, not an image.

    The first 3 channels of each latent (B, C, H, W), min-max normalised per image over those channels
    together (a constant one becomes 0.5); fewer than 3 channels repeat the last. Returns float32 (B, 3, H, W)
    in [0, 1] on the CPU.
    """
    x = _image_latents("latents", latents).detach().to("cpu", torch.float32)
    if x.shape[1] < 3:
        x = torch.cat([x, x[:, -1:].expand(-1, 3 - x.shape[1], -1, -1)], dim=1)
    x = x[:, :3]
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.full_like(x, 0.5))
    return out.clamp(0, 1)


def _vae_device_dtype(vae: Any) -> tuple[torch.device, torch.dtype]:
    device, dtype = getattr(vae, "device", None), getattr(vae, "dtype", None)
    if isinstance(device, torch.device) and isinstance(dtype, torch.dtype):
        return device, dtype
    p = next(vae.parameters())
    return p.device, p.dtype


#: the VAE class each pipeline kind decodes with (for error messages)
_VAE_CLASS = {"flux": "AutoencoderKL", "sd3": "AutoencoderKL", "qwen": "AutoencoderKLQwenImage",
              "flux2": "AutoencoderKLFlux2", "wan": "AutoencoderKLWan"}  # fmt: skip


def _config_value(config: Any, key: str, kind: str, default: Any = ...) -> Any:
    value = config.get(key, None) if isinstance(config, Mapping) else getattr(config, key, None)
    if value is None:
        if default is ...:
            raise ValueError(f"vae: its config has no {key} (pipeline_kind {kind!r} decodes with an {_VAE_CLASS[kind]})")
        return default
    return value


def _video_latents(name: str, latents: object) -> torch.Tensor:
    """(B, C, F, H, W) video latents; (B, C, H, W) is accepted as one frame."""
    x = check_float_tensor(name, latents)
    if x.dim() == 4:
        x = x[:, :, None]
    if x.dim() != 5 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must have shape (B, C, F, H, W) (video layout) with B >= 1, got {tuple(x.shape)}")
    return x


def _flux2_bn(vae: Any, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.2's latent normalisation: the VAE's batch-norm statistics over the 2x2-patchified channels (4 C)."""
    bn = getattr(vae, "bn", None)
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        raise ValueError("vae: it has no bn.running_mean / bn.running_var (pipeline_kind 'flux2' decodes with an "
                         "AutoencoderKLFlux2)")  # fmt: skip
    if mean.numel() != 4 * channels:
        raise ValueError(f"latents have {channels} channels, the flux2 VAE normalises {mean.numel()} = 4 x "
                         f"{mean.numel() // 4} patchified ones")  # fmt: skip
    eps = _config_value(vae.config, "batch_norm_eps", "flux2")
    return mean.view(1, -1, 1, 1), torch.sqrt(var.view(1, -1, 1, 1) + eps)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, pipeline_kind: str, *, batch_size: int | None = None) -> torch.Tensor:
    """Images float32 (B, 3, H, W) in [0, 1] on the CPU, decoded from model latents as the pipeline does.

    The pipeline's own inverse normalisation, then ``vae.decode``, then ``VaeImageProcessor.postprocess``
    (``(x / 2 + 0.5).clamp(0, 1)``). Latents are (B, C, H, W) in the image layout (unpacked), (B, C, F, H, W)
    for ``"wan"``:

    - ``"flux"`` / ``"sd3"`` (``AutoencoderKL``): ``z / scaling_factor + shift_factor`` (FluxPipeline and
      StableDiffusion3Pipeline ``__call__``; a config without ``shift_factor`` counts as 0), then cast to the
      VAE's device and dtype;
    - ``"qwen"`` (``AutoencoderKLQwenImage``): cast to the VAE's dtype, then ``z / (1 / latents_std) +
      latents_mean`` on a frame axis (B, C, 1, H, W) (QwenImagePipeline ``__call__``), and frame 0 of the decode;
    - ``"flux2"`` (``AutoencoderKLFlux2``): the 2x2 patchify to 4 C channels (``Flux2Pipeline._patchify_latents``,
      the library's packed channel order), ``z * sqrt(bn.running_var + batch_norm_eps) + bn.running_mean``,
      ``Flux2Pipeline._unpatchify_latents`` (Flux2Pipeline ``__call__``), then the VAE's device and dtype;
    - ``"wan"`` (``AutoencoderKLWan``): as ``"qwen"`` on all F frames (WanPipeline ``__call__``); the image is
      frame 0 of each decoded video.

    ``vae=None`` gives :func:`latents_preview` instead (of frame 0 for video latents). ``batch_size`` decodes that
    many latents at a time (None: all at once).
    """
    kind = _check_kind(pipeline_kind)
    x = _video_latents("latents", latents) if kind == "wan" else _image_latents("latents", latents)
    if vae is None:
        return latents_preview(x[:, :, 0] if kind == "wan" else x)
    if batch_size is not None:
        batch_size = count("batch_size", batch_size)
    if not callable(getattr(vae, "decode", None)) or getattr(vae, "config", None) is None:
        raise TypeError(f"vae must be a diffusers VAE (with .decode and .config) or None, got {type(vae).__name__}")
    config = vae.config
    device, dtype = _vae_device_dtype(vae)
    x = x.detach()
    if kind in ("qwen", "wan"):
        channels = _config_value(config, "z_dim", kind)
        mean, std = _config_value(config, "latents_mean", kind), _config_value(config, "latents_std", kind)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"vae: latents_mean and latents_std must have z_dim = {channels} entries")
        if x.shape[1] != channels:
            raise ValueError(f"latents have {x.shape[1]} channels, the {kind} VAE takes {channels} (shape {tuple(x.shape)})")
        z = x.to(dtype) if kind == "wan" else x.to(dtype)[:, :, None]
        latents_mean = torch.tensor(mean).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
        latents_std = 1.0 / torch.tensor(std).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
        z = (z / latents_std + latents_mean).to(device)
    elif kind == "flux2":
        from diffusers import Flux2Pipeline

        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"flux2 latents need an even height and width (2x2 patches), got {tuple(x.shape)}")
        bn_mean, bn_std = _flux2_bn(vae, x.shape[1])
        z = Flux2Pipeline._patchify_latents(x)
        z = z * bn_std.to(z.device, z.dtype) + bn_mean.to(z.device, z.dtype)
        z = Flux2Pipeline._unpatchify_latents(z).to(device, dtype)
    else:
        scaling = _config_value(config, "scaling_factor", kind)
        channels = _config_value(config, "latent_channels", kind)
        shift = _config_value(config, "shift_factor", kind, 0.0)
        if x.shape[1] != channels:
            raise ValueError(f"latents have {x.shape[1]} channels, the {kind} VAE takes {channels} (shape {tuple(x.shape)})")
        z = (x / scaling + shift).to(device, dtype)
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor()
    step = z.shape[0] if batch_size is None else batch_size
    images = []
    for start in range(0, z.shape[0], step):
        image = vae.decode(z[start : start + step], return_dict=False)[0]
        if kind in ("qwen", "wan"):
            image = image[:, :, 0]
        images.append(processor.postprocess(image, output_type="pt").float().cpu())
    return torch.cat(images)


# ---------------------------------------------------------------------------- the grid


def _grid_images(name: str, images: object) -> torch.Tensor:
    x = check_float_tensor(name, images)
    if x.dim() != 4 or x.shape[0] == 0 or x.shape[1] not in (1, 3) or x.numel() == 0:
        raise ValueError(f"{name} must be images of shape (B, 3, H, W) (or (B, 1, H, W)) with B >= 1, got {tuple(x.shape)}")
    return x


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [0, 1] -> (B, H, W, 3) uint8, rounded as diffusers' ``numpy_to_pil``; NaN -> 0."""
    x = torch.nan_to_num(images.detach().to("cpu", torch.float32), nan=0.0).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_grid(
    path: PathLike,
    student_images: torch.Tensor,
    teacher_images: torch.Tensor,
    captions: Sequence[str] | None = None,
    *,
    padding: int = 2,
) -> Path:
    """One PNG: column j is prompt j, the first row the student's image, the second the teacher's. Returns its path.

    Images are float (B, 3, H, W) (or (B, 1, H, W), grey) in [0, 1], both of one shape; they are clamped to [0, 1]
    and rounded to uint8 as diffusers does (``(x * 255).round()``). Cells are ``padding`` white pixels apart and
    from the border: the PNG is ``B * W + (B + 1) * padding`` wide and ``2 * H + 3 * padding`` high, and image
    ``j`` of row ``r`` starts at ``(x, y) = (padding + j * (W + padding), padding + r * (H + padding))``.
    No text is drawn: with ``captions`` (B strings) a sidecar ``<name>.json`` beside the PNG records
    ``{"image": name, "rows": ["student", "teacher"], "captions": [...]}`` (without, a stale sidecar of that name
    is removed). Both files are written under a temporary name and renamed (the sidecar first); the folder is
    made if missing. ``path`` must end in ``.png``.
    """
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must name a .png file, got {str(path)!r}")
    student = _grid_images("student_images", student_images)
    teacher = _grid_images("teacher_images", teacher_images)
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_images and teacher_images must have one shape, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if not is_int(padding) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    b, _, h, w = student.shape
    if captions is not None:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions) or len(captions) != b:
            raise ValueError(f"captions must be a list of {b} strings (one per column), got {captions!r}")
        captions = list(captions)
    canvas = torch.full((2 * h + 3 * padding, b * w + (b + 1) * padding, 3), 255, dtype=torch.uint8)
    for r, rows in enumerate((_to_uint8(student), _to_uint8(teacher))):
        y = padding + r * (h + padding)
        for j in range(b):
            x = padding + j * (w + padding)
            canvas[y : y + h, x : x + w] = rows[j]
    image = Image.fromarray(canvas.numpy())  # (H, W, 3) uint8: RGB
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_suffix(".json")
    if captions is None:
        sidecar.unlink(missing_ok=True)
    else:
        doc = {"image": path.name, "rows": list(GRID_ROWS), "captions": captions}
        text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
        _atomic_write(sidecar, lambda p: p.write_text(text, encoding="utf-8"))
    _atomic_write(path, lambda p: image.save(p, format="PNG"))
    return path


# ---------------------------------------------------------------------------- fixed prompts and noise


def fixed_noise(
    num: int, shape: Sequence[int], seed: int, *, device: str | torch.device | None = None
) -> torch.Tensor:
    """(num, *shape) float32 standard normal noise, the same on every run and device.

    Drawn on the CPU, sample ``i`` from its own generator seeded by a hash of ``(seed, i)``: the first ``k``
    samples do not depend on ``num``. Moved to ``device`` afterwards (default: stays on the CPU).
    """
    n = count("num", num)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not shape \
            or not all(is_int(d) and d >= 1 for d in shape):  # fmt: skip
        raise ValueError(f"shape must be a non-empty sequence of ints >= 1, e.g. (C, H, W), got {shape!r}")
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    g = torch.Generator(device="cpu")
    out = torch.empty((n, *(int(d) for d in shape)), dtype=torch.float32)
    for i in range(n):
        digest = hashlib.sha256(f"eval-noise:{int(seed)}:{i}".encode()).digest()
        g.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        out[i] = torch.randn(out.shape[1:], generator=g, dtype=torch.float32)
    return out if device is None else out.to(device)


@dataclass(frozen=True)
class EvalPrompts:
    """A fixed evaluation prompt list: its cache indices, prompt strings and stacked embeddings.

    ``embeddings`` holds every tensor the cache stores for a prompt, stacked to (N, ...) as
    :meth:`PromptCache.iter_batches` stacks them (tensors whose length differs between prompts, Qwen-Image's
    ``prompt_embeds`` (L_i, D) and masks (L_i,), padded with zeros at the end of dim 0, as the pipeline pads).

    Example:
        >>> ev = EvalPrompts.from_cache("cache/", num=8)
        >>> ev.prompts[0], ev.embeddings["prompt_embeds"].shape          # ('a red fox ...', (8, 512, 4096))
        >>> noise = ev.fixed_noise(len(ev), (16, 128, 128), seed=0)
    """

    indices: list[int]
    prompts: list[str]
    negative_prompts: list[str | None]
    embeddings: dict[str, torch.Tensor]

    fixed_noise = staticmethod(fixed_noise)

    def __len__(self) -> int:
        return len(self.indices)

    @classmethod
    def from_cache(
        cls, cache_dir: PathLike | PromptCache, indices: Sequence[int] | None = None, num: int = 8, *, verify: bool = True
    ) -> EvalPrompts:
        """The first ``num`` prompts of the cache at ``cache_dir`` (a folder of :func:`encode_prompts`, or an open
        :class:`PromptCache`), or the prompts at ``indices`` in that order (``num`` is then not used).
        ``verify`` checks the shards' sha256 when a folder is opened here."""
        cache = cache_dir if isinstance(cache_dir, PromptCache) else PromptCache(cache_dir, verify=verify)
        if indices is None:
            n = count("num", num)
            if n > len(cache):
                raise ValueError(f"num is {n}, the prompt cache at {cache.root} holds {len(cache)} prompts")
            idx = list(range(n))
        else:
            if isinstance(indices, torch.Tensor):
                indices = indices.tolist()
            if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
                raise ValueError(f"indices must be a non-empty sequence of prompt indices, got {indices!r}")
            bad = [i for i in indices if not is_int(i) or not 0 <= i < len(cache)]
            if bad:
                raise ValueError(f"indices must be ints in [0, {len(cache)}) (the cache's prompts), got {bad[:10]}")
            idx = [int(i) for i in indices]
        rows = [cache[i] for i in idx]
        names = sorted(rows[0])
        for i, row in zip(idx, rows):
            if sorted(row) != names:
                raise ValueError(f"{cache.root}: prompt {i} holds tensors {sorted(row)}, prompt {idx[0]} holds {names}")
        prompts = cache.prompts
        return cls(
            indices=idx,
            prompts=[prompts[i].prompt for i in idx],
            negative_prompts=[prompts[i].negative_prompt for i in idx],
            embeddings={name: _stack([r[name] for r in rows]) for name in names},
        )

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> EvalPrompts:
        """A copy with the embeddings on ``device``, floating-point ones cast to ``dtype`` (masks keep theirs)."""
        moved = {
            name: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
            for name, t in self.embeddings.items()
        }
        return EvalPrompts(list(self.indices), list(self.prompts), list(self.negative_prompts), moved)
