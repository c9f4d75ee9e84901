"""Supported diffusers teachers and the latent layouts a student, a pipeline and the adapter loader share.

Three layouts of the same latents (C channels per pixel, an H x W image, p x p pixels per token):

- image ``(B, C, H, W)``: what ``PiFlowStudent.forward`` takes and returns;
- packed ``(B, L, C*p*p)`` with ``L = (H/p) * (W/p)``: what FLUX.1 / FLUX.2 / Qwen-Image transformers and
  their pipelines use, channel index ``c*p*p + py*p + px`` (FLUX.2's ``_patchify_latents`` then
  ``_pack_latents`` is the same layout);
- token ``(B, C, L, p*p)``: a free view of the packed latents with one policy "pixel" per
  (token, sub-pixel). The GM and DX policies act on every pixel independently, so their math runs on
  it as on the image, without knowing H or W.

    >>> packed = image_to_packed(x, 2)             # (B, C, H, W) -> (B, H*W/4, 4C)
    >>> tokens = packed_to_tokens(packed, 4)       # -> (B, C, H*W/4, 4)
    >>> image = tokens_to_image(tokens, H // 2, W // 2, 2)   # -> (B, C, H, W)

:data:`ARCHS` says, per diffusers teacher class, where its output layer and time embedding are and which
of these layouts its trunk speaks. Wan (``WanTransformer3DModel``, video) is an image-layout teacher on 5-D latents
``(B, C, T, H, W)``: the trunk patchifies and unpatchifies them itself. Nothing here imports diffusers at module import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from piflow_kernels.outputs import DXOutput, GMFlowOutput

__all__ = [
    "ARCHS",
    "FLUX2_REFERENCE_TIME",
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
    video: bool = False  # latents (B, C, T, H, W) (one frame axis before H, W) instead of (B, C, H, W)


#: diffusers teacher class name -> its :class:`TeacherArch`
ARCHS: dict[str, TeacherArch] = {
    "UNet2DModel": TeacherArch("conv_out", "time_embedding", "image", "conv", "sample", 1.0, False),
    "DiTTransformer2DModel": TeacherArch(
        "proj_out_2", "transformer_blocks.0.norm1.emb", "image", "pc", "hidden_states", 1.0, True
    ),
    "SD3Transformer2DModel": TeacherArch("proj_out", "time_text_embed", "image", "pc", "hidden_states", 1.0, True),
    "FluxTransformer2DModel": TeacherArch("proj_out", "time_text_embed", "tokens", "cp", "hidden_states", 1000.0, False),
    "QwenImageTransformer2DModel": TeacherArch("proj_out", "time_text_embed", "tokens", "cp", "hidden_states", 1000.0, False),
    # FLUX.2: 2x2 patches of C = in_channels / 4 channels per token (the pipeline patchifies, the model has patch_size 1);
    # "cp" rows as the official GMFlux2 head: proj_out_means rows (k, c, 2x2 pixel), proj_out_logweights (k, pixel)
    "Flux2Transformer2DModel": TeacherArch("proj_out", "time_guidance_embed", "tokens", "cp", "hidden_states", 1000.0, False),
    # Wan video: latents (B, C, T, H, W), patches (1, p, p); the trunk unpatchifies proj_out's rows as
    # (p_t, p_h, p_w, channels), channels inferred: "pc" rows give (B, K*C + K, T, H, W) without out_channels
    "WanTransformer3DModel": TeacherArch(
        "proj_out", "condition_embedder.time_embedder", "image", "pc", "hidden_states", 1.0, False, video=True
    ),
}

SUPPORTED_TEACHERS: tuple[str, ...] = tuple(ARCHS)

#: text-to-image teacher class -> {name of a tensor its pipeline's ``encode_prompt`` returns (as a prompt cache
#: stores it): the transformer's argument it feeds}. A negative (``negative_<name>``) feeds ``negative_<argument>``,
#: the unconditional branch of classifier-free guidance.
TEXT_ARGS: dict[str, dict[str, str]] = {
    "FluxTransformer2DModel": {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"},
    "SD3Transformer2DModel": {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"},
    "QwenImageTransformer2DModel": {"prompt_embeds": "encoder_hidden_states", "prompt_embeds_mask": "encoder_hidden_states_mask"},
    # Flux2Pipeline.encode_prompt returns (prompt_embeds, text_ids); the ids are derived (native_inputs)
    "Flux2Transformer2DModel": {"prompt_embeds": "encoder_hidden_states"},
    # WanPipeline.encode_prompt returns (prompt_embeds, negative_prompt_embeds)
    "WanTransformer3DModel": {"prompt_embeds": "encoder_hidden_states"},
}

#: FLUX.2's time coordinate of the i-th reference image's tokens is FLUX2_REFERENCE_TIME * (i + 1) (the generated
#: image's is 0): Flux2Pipeline._prepare_image_ids' ``scale``
FLUX2_REFERENCE_TIME = 10


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
    variance); p: pixels per token side (2 for FLUX.1 / FLUX.2 packing, the patch size for SD3 / DiT / Qwen, 1 for
    UNet).
    """
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    in_ch = get("in_channels")
    out_ch = get("out_channels")
    if teacher_class == "FluxTransformer2DModel":
        packed = out_ch or in_ch
        if packed % 4:
            raise ValueError(f"FluxTransformer2DModel output width {packed} is not 4 * C (2x2 packed latents)")
        return packed // 4, packed // 4, 2
    if teacher_class == "Flux2Transformer2DModel":
        patch = get("patch_size", 1)
        if patch not in (None, 1):
            raise ValueError(
                f"Flux2Transformer2DModel with patch_size={patch} is not supported: Flux2Pipeline patchifies the latents "
                "2x2 itself and feeds them to a model of patch_size 1"
            )
        packed = out_ch or in_ch
        if packed % 4:
            raise ValueError(f"Flux2Transformer2DModel output width {packed} is not 4 * C (2x2 patchified latents)")
        return packed // 4, packed // 4, 2
    if teacher_class == "QwenImageTransformer2DModel":
        c = out_ch or in_ch
        return c, c, get("patch_size")
    if teacher_class == "SD3Transformer2DModel":
        c = out_ch if out_ch is not None else in_ch
        return c, c, get("patch_size")
    if teacher_class == "DiTTransformer2DModel":
        return in_ch, (in_ch if out_ch is None else out_ch), get("patch_size")
    if teacher_class == "WanTransformer3DModel":
        patch = tuple(get("patch_size") or (1, 2, 2))
        if len(patch) != 3 or patch[0] != 1 or patch[1] != patch[2]:
            raise ValueError(
                f"WanTransformer3DModel with patch_size={list(patch)} is not supported: a student needs patches "
                "(1, p, p) (one frame, square)"
            )
        c = out_ch or in_ch
        return c, c, patch[1]
    # UNet2DModel
    return in_ch, out_ch, 1


def native_inputs(
    teacher_class: str, x_t: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any], p: int
) -> tuple[dict[str, Any], tuple[int, int]]:
    """The keyword arguments of a call of the teacher's trunk as its pipeline makes it, from image-layout latents.

    ``x_t`` (B, C, H, W); ``timestep`` (B,) already in the trunk's convention; ``kwargs`` the conditioning. Token
    teachers get packed latents (B, H*W/p^2, C*p^2) and the ids / shapes their pipelines derive (FLUX ``img_ids``
    (L, 3) and ``txt_ids`` (L_text, 3), Qwen-Image ``img_shapes``, FLUX.2 ``img_ids`` (B, L, 4) and ``txt_ids``
    (B, L_text, 4) as ``Flux2Pipeline`` makes them) unless given.

    FLUX.2 reference images (editing): ``condition_latents``, a (B, C, H', W') tensor (or (1, C, H', W'), repeated)
    or a list of them, in the image layout of ``x_t`` and normalised as ``Flux2Pipeline.prepare_image_latents``
    normalises them, become extra tokens after the generated image's, with time coordinate 10 * (i + 1) for the
    i-th image (``Flux2Pipeline._prepare_image_ids``); the trunk's output then holds L + L_ref tokens, of which the
    first L are the generated image's. Returns (kwargs, (h, w) in tokens of the generated image).
    """
    arch = arch_for(teacher_class)
    if arch.layout != "tokens":  # also Wan's video latents (B, C, T, H, W), passed as they are
        return {arch.sample_arg: x_t, "timestep": timestep, **kwargs}, (x_t.shape[-2], x_t.shape[-1])
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
    elif teacher_class == "Flux2Transformer2DModel":
        return _flux2_inputs(x_t, timestep, out, p, arch.sample_arg)
    else:
        out.setdefault("img_shapes", [[(1, h, w)]] * x_t.shape[0])
    out[arch.sample_arg] = image_to_packed(x_t, p)
    out["timestep"] = timestep
    return out, (h, w)


def _positions(t: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """FLUX.2 position ids (h*w, 4) of one image: (T, H, W, L) = (t, row, column, 0), row-major as the tokens."""
    ids = torch.zeros(h, w, 4, dtype=torch.long, device=device)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 4)


def _flux2_inputs(
    x_t: torch.Tensor, timestep: torch.Tensor, out: dict[str, Any], p: int, sample_arg: str
) -> tuple[dict[str, Any], tuple[int, int]]:
    """:func:`native_inputs` of a ``Flux2Transformer2DModel``: packed latents, then the reference images' tokens."""
    b, h, w = x_t.shape[0], x_t.shape[2] // p, x_t.shape[3] // p
    emb = out.get("encoder_hidden_states")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 3:
        raise ValueError("a FLUX.2 model needs encoder_hidden_states (B, L_text, joint_attention_dim)")
    refs = out.pop("condition_latents", None)
    if isinstance(refs, torch.Tensor):
        refs = [refs]
    refs = list(refs or [])
    tokens, ids = [image_to_packed(x_t, p)], [_positions(0, h, w, x_t.device)]
    for i, ref in enumerate(refs):
        if not isinstance(ref, torch.Tensor) or ref.dim() != 4 or ref.shape[1] != x_t.shape[1]:
            got = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ValueError(f"condition_latents[{i}] must be a (B, {x_t.shape[1]}, H', W') tensor like x_t, got {got}")
        if ref.shape[0] not in (1, b) or ref.shape[2] % p or ref.shape[3] % p:
            raise ValueError(
                f"condition_latents[{i}] of shape {tuple(ref.shape)}: its batch must be {b} or 1 and its height and "
                f"width multiples of {p}"
            )
        tokens.append(image_to_packed(ref.to(x_t.dtype), p).expand(b, -1, -1))
        ids.append(_positions(FLUX2_REFERENCE_TIME * (i + 1), ref.shape[2] // p, ref.shape[3] // p, x_t.device))
    out[sample_arg] = torch.cat(tokens, dim=1) if refs else tokens[0]
    out.setdefault("img_ids", torch.cat(ids).unsqueeze(0).expand(b, -1, -1))
    if "txt_ids" not in out:
        txt = torch.zeros(emb.shape[1], 4, dtype=torch.long, device=x_t.device)
        txt[:, 3] = torch.arange(emb.shape[1], device=x_t.device)
        out["txt_ids"] = txt.unsqueeze(0).expand(b, -1, -1)
    out["timestep"] = timestep
    return out, (h, w)


def native_prediction_to_image(teacher_class: str, raw: torch.Tensor, hw: tuple[int, int], p: int, c: int) -> torch.Tensor:
    """A teacher trunk's own output (packed (B, L, C_t*p^2) or image (B, C_t, H, W)) as image-layout (B, C, H, W).

    ``hw`` is the (h, w) of :func:`native_inputs`; a learned-variance output (C_t = 2C) keeps its first C channels,
    and a token output longer than h*w (FLUX.2 with reference images) its first h*w tokens, the generated image's.
    """
    if arch_for(teacher_class).layout == "tokens":
        tokens = packed_to_tokens(raw[:, : hw[0] * hw[1]], p * p)[:, :c]
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
