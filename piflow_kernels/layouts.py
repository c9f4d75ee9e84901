"""Supported diffusers teachers and the latent layouts a student, a pipeline and the adapter loader share.

Three layouts of the same latents (C channels per pixel, an H x W image, p x p pixels per token):

- image ``(B, C, H, W)``: what ``PiFlowStudent.forward`` takes and returns;
- packed ``(B, L, C*p*p)`` with ``L = (H/p) * (W/p)``: what FLUX / Qwen-Image transformers and their
  pipelines use, channel index ``c*p*p + py*p + px``;
- token ``(B, C, L, p*p)``: a free view of the packed latents with one policy "pixel" per
  (token, sub-pixel). The GM and DX policies act on every pixel independently, so their math runs on
  it as on the image, without knowing H or W.

    >>> packed = image_to_packed(x, 2)             # (B, C, H, W) -> (B, H*W/4, 4C)
    >>> tokens = packed_to_tokens(packed, 4)       # -> (B, C, H*W/4, 4)
    >>> image = tokens_to_image(tokens, H // 2, W // 2, 2)   # -> (B, C, H, W)

:data:`ARCHS` says, per diffusers teacher class, where its output layer and time embedding are and which
of these layouts its trunk speaks. Nothing here imports diffusers at module import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from piflow_kernels.outputs import DXOutput, GMFlowOutput

__all__ = [
    "ARCHS",
    "SUPPORTED_TEACHERS",
    "TeacherArch",
    "arch_for",
    "geometry",
    "image_to_packed",
    "map_output",
    "packed_to_tokens",
    "TEXT_ARGS",
    "native_inputs",
    "native_prediction_to_image",
    "teacher_class_name",
    "tokens_to_image",
    "tokens_to_packed",
]


@dataclass(frozen=True)
class TeacherArch:
    """How one diffusers teacher class is turned into a student."""

    out_attr: str  # the teacher's output layer, replaced by the policy head
    temb_path: str  # module whose output is the time embedding fed to the log-std MLP
    layout: str  # "tokens": packed p x p sequence (B, L, R); "image": the trunk returns (B, R, H, W)
    row_order: str  # teacher output rows per token: "cp" (channel, pixel), "pc" (pixel, channel), "conv"
    sample_arg: str  # name of the latent argument of the teacher's forward
    timestep_divisor: float  # trunk timestep = scheduler timestep (sigma * 1000) / timestep_divisor
    sets_out_channels: bool  # the trunk unpatchifies with self.out_channels: set it to the head's width


#: diffusers teacher class name -> its :class:`TeacherArch`
ARCHS: dict[str, TeacherArch] = {
    "UNet2DModel": TeacherArch("conv_out", "time_embedding", "image", "conv", "sample", 1.0, False),
    "DiTTransformer2DModel": TeacherArch(
        "proj_out_2", "transformer_blocks.0.norm1.emb", "image", "pc", "hidden_states", 1.0, True
    ),
    "SD3Transformer2DModel": TeacherArch("proj_out", "time_text_embed", "image", "pc", "hidden_states", 1.0, True),
    "FluxTransformer2DModel": TeacherArch("proj_out", "time_text_embed", "tokens", "cp", "hidden_states", 1000.0, False),
    "QwenImageTransformer2DModel": TeacherArch("proj_out", "time_text_embed", "tokens", "cp", "hidden_states", 1000.0, False),
}

SUPPORTED_TEACHERS: tuple[str, ...] = tuple(ARCHS)

#: text-to-image teacher class -> {name of a tensor its pipeline's ``encode_prompt`` returns (as a prompt cache
#: stores it): the transformer's argument it feeds}. A negative (``negative_<name>``) feeds ``negative_<argument>``,
#: the unconditional branch of classifier-free guidance.
TEXT_ARGS: dict[str, dict[str, str]] = {
    "FluxTransformer2DModel": {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"},
    "SD3Transformer2DModel": {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"},
    "QwenImageTransformer2DModel": {"prompt_embeds": "encoder_hidden_states", "prompt_embeds_mask": "encoder_hidden_states_mask"},
}


def arch_for(teacher_class: str) -> TeacherArch:
    """The :class:`TeacherArch` of a teacher class name, else a ``TypeError`` listing the supported ones."""
    if teacher_class not in ARCHS:
        raise TypeError(
            f"unsupported teacher class {teacher_class!r}: a student can be built from a diffusers "
            f"{', '.join(SUPPORTED_TEACHERS)}"
        )
    return ARCHS[teacher_class]


def teacher_class_name(teacher: object) -> str:
    """The class name of a supported diffusers teacher instance (exactly that class: no subclasses)."""
    import diffusers  # a teacher is a diffusers model, so diffusers is installed

    name = type(teacher).__name__
    if name not in ARCHS or getattr(diffusers, name, None) is not type(teacher):
        raise TypeError(
            f"unsupported teacher {type(teacher).__module__}.{type(teacher).__qualname__}: expected an instance of "
            f"diffusers' {', '.join(SUPPORTED_TEACHERS)} (subclasses are not supported: from_pretrained rebuilds "
            "the trunk from the diffusers class and its config)"
        )
    return name


def geometry(teacher_class: str, config: Any) -> tuple[int, int, int]:
    """``(C, C_teacher, p)`` of a teacher config (a mapping or an object with attributes).

    C: latent channels per pixel; C_teacher: teacher output channels per pixel (2C with a learned
    variance); p: pixels per token side (2 for FLUX packing, the patch size for SD3 / DiT / Qwen, 1 for UNet).
    """
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    in_ch = get("in_channels")
    out_ch = get("out_channels")
    if teacher_class == "FluxTransformer2DModel":
        packed = out_ch or in_ch
        if packed % 4:
            raise ValueError(f"FluxTransformer2DModel output width {packed} is not 4 * C (2x2 packed latents)")
        return packed // 4, packed // 4, 2
    if teacher_class == "QwenImageTransformer2DModel":
        c = out_ch or in_ch
        return c, c, get("patch_size")
    if teacher_class == "SD3Transformer2DModel":
        c = out_ch if out_ch is not None else in_ch
        return c, c, get("patch_size")
    if teacher_class == "DiTTransformer2DModel":
        return in_ch, (in_ch if out_ch is None else out_ch), get("patch_size")
    # UNet2DModel
    return in_ch, out_ch, 1


def native_inputs(
    teacher_class: str, x_t: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any], p: int
) -> tuple[dict[str, Any], tuple[int, int]]:
    """The keyword arguments of a call of the teacher's trunk as its pipeline makes it, from image-layout latents.

    ``x_t`` (B, C, H, W); ``timestep`` (B,) already in the trunk's convention; ``kwargs`` the conditioning. Token
    teachers get packed latents (B, H*W/p^2, C*p^2) and the ids / shapes their pipelines derive (FLUX ``img_ids``
    (L, 3) and ``txt_ids`` (L_text, 3), Qwen-Image ``img_shapes``) unless given. Returns (kwargs, (h, w) in tokens).
    """
    arch = arch_for(teacher_class)
    if arch.layout != "tokens":
        return {arch.sample_arg: x_t, "timestep": timestep, **kwargs}, (x_t.shape[2], x_t.shape[3])
    h, w = x_t.shape[2] // p, x_t.shape[3] // p
    out = dict(kwargs)
    if teacher_class == "FluxTransformer2DModel":
        emb = out.get("encoder_hidden_states")
        if not isinstance(emb, torch.Tensor):
            raise ValueError("a FLUX model needs encoder_hidden_states (B, L_text, joint_attention_dim)")
        if "img_ids" not in out:
            ids = torch.zeros(h, w, 3, device=x_t.device, dtype=emb.dtype)
            ids[..., 1] = torch.arange(h, device=x_t.device, dtype=emb.dtype)[:, None]
            ids[..., 2] = torch.arange(w, device=x_t.device, dtype=emb.dtype)[None, :]
            out["img_ids"] = ids.reshape(h * w, 3)
        out.setdefault("txt_ids", torch.zeros(emb.shape[1], 3, device=x_t.device, dtype=emb.dtype))
    else:
        out.setdefault("img_shapes", [[(1, h, w)]] * x_t.shape[0])
    out[arch.sample_arg] = image_to_packed(x_t, p)
    out["timestep"] = timestep
    return out, (h, w)


def native_prediction_to_image(teacher_class: str, raw: torch.Tensor, hw: tuple[int, int], p: int, c: int) -> torch.Tensor:
    """A teacher trunk's own output (packed (B, L, C_t*p^2) or image (B, C_t, H, W)) as image-layout (B, C, H, W).

    ``hw`` is the (h, w) of :func:`native_inputs`; a learned-variance output (C_t = 2C) keeps its first C channels.
    """
    if arch_for(teacher_class).layout == "tokens":
        tokens = packed_to_tokens(raw, p * p)[:, :c]
        return tokens_to_image(tokens, hw[0], hw[1], p)
    return raw[:, :c]


def image_to_packed(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> packed (B, (H/p)*(W/p), C*p*p), channel index c*p*p + py*p + px (FLUX / Qwen-Image packing)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def packed_to_tokens(x: torch.Tensor, p2: int) -> torch.Tensor:
    """Packed latents (B, L, C*p2) -> token layout (B, C, L, p2): one policy "pixel" per (token, sub-pixel)."""
    b, length, d = x.shape
    return x.reshape(b, length, d // p2, p2).permute(0, 2, 1, 3)


def tokens_to_packed(x: torch.Tensor) -> torch.Tensor:
    """Token layout (B, C, L, p2) -> packed latents (B, L, C*p2); inverse of :func:`packed_to_tokens`."""
    b, c, length, p2 = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, length, c * p2)


def tokens_to_image(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Token layout (..., h*w, p*p) -> image layout (..., h*p, w*p); h, w count tokens, not pixels."""
    lead = x.shape[:-2]
    n = len(lead)
    x = x.reshape(*lead, h, w, p, p)
    x = x.permute(*range(n), n, n + 2, n + 1, n + 3)
    return x.reshape(*lead, h * p, w * p)


def map_output(out: GMFlowOutput | DXOutput, fn: Callable[[torch.Tensor], torch.Tensor]) -> GMFlowOutput | DXOutput:
    """Apply a layout change to the spatial fields (means, logweights or grid); logstds have no layout."""
    if isinstance(out, GMFlowOutput):
        return GMFlowOutput(means=fn(out.means), logweights=fn(out.logweights), logstds=out.logstds)
    return DXOutput(grid=fn(out.grid))
