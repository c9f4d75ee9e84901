"""pi-Flow students built from diffusers teachers: the teacher's trunk with a policy head.

The student is a copy of the teacher whose output layer is replaced by a policy head, as the
official GMFlux / GMSD3 / GMDiT students do:

- GMFlow (K components): a means head initialised from the teacher's output layer replicated K
  times plus small noise on its bias, a zero-initialised logweights head, and a log-std from a
  small MLP on the (detached) time embedding whose last layer starts at weight 0, bias log(0.05).
- DX (N grid points): the teacher's output layer replicated N times.

At initialisation the policy's velocity at the source point is therefore the teacher's output
(exactly with ``init_noise=0``).

    >>> student = build_student(teacher, policy_type="GMFlow", num_components=8)
    >>> out = student(x_t, timestep, encoder_hidden_states=emb, pooled_projections=pooled)
    >>> out.means.shape, out.logweights.shape, out.logstds.shape
    ((B, 8, C, H, W), (B, 8, 1, H, W), (B, 1, 1, 1, 1))
    >>> flux2 = build_student(flux2_transformer, "GMFlow", num_components=8)       # FLUX.2: C = 32, 2x2 tokens
    >>> out = flux2(x_t, timestep, encoder_hidden_states=emb, guidance=g, condition_latents=[ref])   # editing
    >>> wan = build_student(wan_transformer, "GMFlow", num_components=8)   # video: x_t (B, C, T, H, W)
    >>> wan(video_latents, timestep, encoder_hidden_states=emb).means.shape
    (B, 8, C, T, H, W)

Video (new: no official pi-Flow video student exists). A ``WanTransformer3DModel`` student takes 5-D latents
``(B, C, T, H, W)`` and ``t = sigma * 1000`` as ``WanPipeline`` passes them; its head keeps the trunk's (1, p, p)
unpatchify (rows per pixel of a patch, as SD3's), so every policy field gains the frame axis T.

Conventions (docs/design.md#conventions):

- ``student(x_t, timestep, **teacher_kwargs)`` takes image-layout latents ``(B, C, H, W)`` and the
  diffusers scheduler timestep ``t = sigma * 1000`` whatever the teacher; it converts to the
  teacher's own convention (FLUX and Qwen-Image take ``sigma`` and packed 2x2 tokens, the others
  ``t`` and the image). Outputs are image-layout policy tensors.
- Outputs are in the velocity parameterisation ``u = eps - x0`` of ``x_t = (1 - s) x0 + s eps``.
  diffusers' flow-matching teachers (FLUX, SD3, Qwen-Image) predict exactly this. ``UNet2DModel`` and
  ``DiTTransformer2DModel`` teachers are assumed to be flow-matching velocity models too (as the
  official pi-Flow ImageNet DiT is); a DDPM epsilon-prediction teacher (e.g. facebook/DiT-XL-2) gives
  a student that starts from epsilon, not velocity, and needs training before it samples well. A
  learned-variance teacher (``out_channels = 2 * in_channels``) contributes its first
  ``in_channels`` output channels.
- ``student.forward_native(**kwargs)`` calls the trunk exactly as a stock pipeline calls the teacher
  (same argument names, same timestep convention). For FLUX / FLUX.2 / Qwen-Image it returns the policy in
  *token layout* ``(B, K, C, L, 4)``: L packed tokens of 2x2 pixels each (FLUX.2 editing: the reference images'
  tokens too, after the generated image's; ``forward`` keeps the generated image's). The GM and DX policies act
  on every pixel independently, so this layout is as valid as the image for the policy math and
  needs no image height or width (see :mod:`piflow_kernels.layouts`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import torch
from torch import nn

try:
    import diffusers
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.embeddings import Timesteps
    from diffusers.models.modeling_utils import ModelMixin
except ImportError as err:
    raise ImportError("piflow_kernels students need diffusers: pip install 'piflow_kernels[diffusers]'") from err

from piflow_kernels.checks import is_real, positive_float, positive_int
from piflow_kernels.layouts import (
    SUPPORTED_TEACHERS,
    arch_for,
    geometry,
    map_output,
    native_inputs,
    native_prediction_to_image,
    teacher_class_name,
    tokens_to_image,
)
from piflow_kernels.outputs import POLICY_TYPES, DXOutput, GMFlowOutput

__all__ = ["PiFlowStudent", "build_student", "SUPPORTED_TEACHERS"]


# ---------------------------------------------------------------------------- head


def _layer_like(template: nn.Module, out_features: int) -> nn.Module:
    """A Linear / Conv2d with the template's input side and ``out_features`` outputs (with bias)."""
    kw = {"device": template.weight.device, "dtype": template.weight.dtype}
    if isinstance(template, nn.Linear):
        return nn.Linear(template.in_features, out_features, bias=True, **kw)
    if isinstance(template, nn.Conv2d):
        return nn.Conv2d(
            template.in_channels,
            out_features,
            template.kernel_size,
            stride=template.stride,
            padding=template.padding,
            dilation=template.dilation,
            bias=True,
            **kw,
        )
    raise TypeError(f"the teacher's output layer must be nn.Linear or nn.Conv2d, got {type(template).__name__}")


class _PolicyHead(nn.Module):
    """Replaces the teacher's output layer; returns the head outputs in the layout the trunk expects.

    Row orders (per token): ``cp`` means (K, C, p2) then logweights (K, p2) (the official GMFlux / GMQwen
    layout); ``pc`` per sub-pixel (p2, [means (K, C) | logweights (K)]) so the trunk's own unpatchify
    yields (B, K*C + K, H, W) (GMSD3 / GMDiT-v2 rows); ``conv`` channels [means (K, C) | logweights (K)].
    DX: grid rows (N, C, p2) / (p2, N, C) / (N, C).
    """

    def __init__(self, template: nn.Module, policy_type: str, k: int, c: int, p2: int, row_order: str) -> None:
        super().__init__()
        self.policy_type, self.k, self.c, self.p2, self.row_order = policy_type, k, c, p2, row_order
        if policy_type == "GMFlow":
            self.means = _layer_like(template, k * c * p2)
            self.logweights = _layer_like(template, k * p2)
        else:
            self.grid = _layer_like(template, k * c * p2)

    @property
    def channels_per_pixel(self) -> int:
        """Output channels per pixel after the trunk's unpatchify (K*C + K for GM, N*C for DX)."""
        return self.k * self.c + (self.k if self.policy_type == "GMFlow" else 0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.policy_type != "GMFlow":
            return self.grid(h)
        means, logweights = self.means(h), self.logweights(h)
        if self.row_order == "conv":
            return torch.cat([means, logweights], dim=1)
        if self.row_order == "cp":
            return torch.cat([means, logweights], dim=-1)
        lead = h.shape[:-1]
        per_pixel = [means.reshape(*lead, self.p2, self.k * self.c), logweights.reshape(*lead, self.p2, self.k)]
        return torch.cat(per_pixel, dim=-1).flatten(-2)

    def extra_repr(self) -> str:
        n = "K" if self.policy_type == "GMFlow" else "N"
        return f"policy_type={self.policy_type}, {n}={self.k}, C={self.c}, pixels_per_token={self.p2}, rows={self.row_order}"


def _logstd_mlp(in_dim: int, inner_dim: int, num_layers: int) -> nn.Sequential:
    """(SiLU, Linear) x num_layers, the last to one output: keys ``1``, ``3``, ... as the official heads."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.SiLU(), nn.Linear(dim, inner_dim)]
        dim = inner_dim
    layers += [nn.SiLU(), nn.Linear(dim, 1)]
    return nn.Sequential(*layers)


def _temb_dim(module: nn.Module) -> int:
    for path in ("linear_2", "timestep_embedder.linear_2"):
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(sub, nn.Linear):
            return sub.out_features
    raise TypeError(f"cannot find the time-embedding width of {type(module).__name__} (expected a linear_2 layer)")


def _capture_temb(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    # a plain function (no closure): a deep-copied student (EMA) keeps writing to its own module
    module.__dict__["_piflow_temb"] = output


# PiFlowScheduler keys that are not sampling settings of a student (they say how, not what, to compute)
_NOT_SAMPLING_KEYS = ("backend",)


def _check_sampling(sampling: object, policy_type: str) -> dict[str, Any]:
    """``sampling`` as a plain dict of PiFlowScheduler config keys, checked by building a scheduler from it."""
    import inspect

    from piflow_kernels.scheduler import PiFlowScheduler

    if not isinstance(sampling, dict):
        raise TypeError(f"sampling must be a dict of PiFlowScheduler settings, got {type(sampling).__name__}")
    known = [n for n in inspect.signature(PiFlowScheduler.__init__).parameters if n not in ("self", *_NOT_SAMPLING_KEYS)]
    unknown = sorted(set(sampling) - set(known))
    if unknown:
        raise ValueError(f"sampling has unknown keys {unknown}; known: {', '.join(known)}")
    if sampling.get("policy_type", policy_type) != policy_type:
        raise ValueError(f"sampling.policy_type = {sampling['policy_type']!r} but the student's policy_type is {policy_type!r}")
    plain = json.loads(json.dumps(sampling, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    PiFlowScheduler(**{**plain, "policy_type": policy_type})  # its own checks, naming the key
    return plain


def _peft_layers(module: nn.Module) -> list[nn.Module]:
    """The PEFT tuner layers (LoRA Linear, ...) under ``module``: modules with peft's ``disable_adapters`` flag."""
    return [m for m in module.modules() if type(m).__module__.startswith("peft.") and hasattr(m, "_disable_adapters")]


def _plain_config(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# ---------------------------------------------------------------------------- student


class PiFlowStudent(ModelMixin, ConfigMixin):
    """A diffusers teacher's trunk with a GMFlow or DX policy head (build it with :func:`build_student`).

    Args (the saved config; ``from_pretrained`` rebuilds the trunk from ``teacher_config``):
        teacher_class: diffusers class of the teacher (one of :data:`SUPPORTED_TEACHERS`).
        teacher_config: the teacher's config.
        policy_type: "GMFlow" or "DX".
        num_components: K, Gaussian components of a GMFlow policy.
        num_points: N, grid points of a DX policy.
        logstd_inner_dim, num_logstd_layers: the log-std MLP on the time embedding (GMFlow).
        constant_logstd: a fixed log-std (GMFlow) used instead of the MLP, as the official heads' ``constant_logstd``
            (a plain number, not a learned parameter); None (default) uses the MLP.
        timestep_divisor: trunk timestep = timestep / timestep_divisor in :meth:`forward`; None picks
            1000 for FLUX / Qwen-Image (they take sigma) and 1 for the others (they take sigma * 1000).
        timestep_freq_shift: if set, the ``downscale_freq_shift`` of every sinusoidal timestep embedding
            of the trunk (the official GM-DiT uses 0 where diffusers' DiT uses 1).
        num_inference_steps: the number of sampling steps the student was distilled for (None: not recorded);
            a pipeline converted with :func:`~piflow_kernels.to_piflow` samples with it by default.
        sampling: the sampling settings the student was distilled with (None: not recorded): a dict of
            :class:`~piflow_kernels.PiFlowScheduler` config keys (``shift``, ``use_dynamic_shifting``,
            ``final_step_size_scale``, ``total_substeps``, ``dx_segment_size``, ``dx_mode``, ``temperature``, ...),
            the defaults of a scheduler, :func:`~piflow_kernels.sample` and :func:`~piflow_kernels.to_piflow`
            given this student.
        trunk: an already built trunk (the teacher or its copy) instead of building one from the config.

    Shapes: ``forward(x_t (B, C, H, W), timestep)`` returns a :class:`GMFlowOutput` with means
    (B, K, C, H, W), logweights (B, K, 1, H, W) (log-softmax over K), logstds (B, 1, 1, 1, 1), or a
    :class:`DXOutput` with grid (B, N, C, H, W). A video (Wan) student takes (B, C, T, H, W) and every field gains
    the frame axis T before H, W (logstds (B, 1, 1, 1, 1, 1)).
    """

    ignore_for_config = ["trunk"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        teacher_class: str,
        teacher_config: dict,
        policy_type: str = "GMFlow",
        num_components: int = 8,
        num_points: int = 10,
        logstd_inner_dim: int = 1024,
        num_logstd_layers: int = 2,
        timestep_divisor: float | None = None,
        timestep_freq_shift: float | None = None,
        num_inference_steps: int | None = None,
        sampling: dict | None = None,
        trunk: nn.Module | None = None,
        constant_logstd: float | None = None,
    ) -> None:
        super().__init__()
        arch = arch_for(teacher_class)
        if policy_type not in POLICY_TYPES:
            raise ValueError(f"policy_type must be one of {POLICY_TYPES}, got {policy_type!r}")
        k = positive_int(
            "num_components" if policy_type == "GMFlow" else "num_points",
            num_components if policy_type == "GMFlow" else num_points,
        )
        positive_int("logstd_inner_dim", logstd_inner_dim)
        positive_int("num_logstd_layers", num_logstd_layers)
        if constant_logstd is not None:
            if not is_real(constant_logstd):
                raise ValueError(f"constant_logstd must be a finite number or None, got {constant_logstd!r}")
            if policy_type != "GMFlow":
                raise ValueError("constant_logstd is a GMFlow option; a DX student has no log-std")
            self.register_to_config(constant_logstd=float(constant_logstd))
        if timestep_divisor is not None and not (is_real(timestep_divisor) and timestep_divisor > 0):
            raise ValueError(f"timestep_divisor must be a positive number or None, got {timestep_divisor!r}")
        if num_inference_steps is not None:
            # the config recorded the raw argument: store the checked Python int (a numpy int is not JSON)
            self.register_to_config(num_inference_steps=positive_int("num_inference_steps", num_inference_steps))
        if sampling is not None:
            self.register_to_config(sampling=_check_sampling(sampling, policy_type))
        if trunk is None:
            trunk = getattr(diffusers, teacher_class).from_config(teacher_config)
        elif type(trunk).__name__ != teacher_class:
            raise TypeError(f"trunk is a {type(trunk).__name__} but teacher_class is {teacher_class!r}")
        self._check_trunk(teacher_class, trunk)

        c, c_teacher, p = geometry(teacher_class, trunk.config)
        layer = getattr(trunk, arch.out_attr)
        rows = layer.out_features if isinstance(layer, nn.Linear) else getattr(layer, "out_channels", None)
        if rows != p * p * c_teacher or c_teacher not in (c, 2 * c):
            raise ValueError(
                f"{teacher_class}.{arch.out_attr} has {rows} outputs; expected {p}*{p}*C with C = {c} latent channels "
                "(or 2*C with a learned variance)"
            )
        self._arch = arch
        self._channels, self._teacher_channels, self._patch = c, c_teacher, p
        self._timestep_divisor = float(timestep_divisor) if timestep_divisor is not None else arch.timestep_divisor
        head = _PolicyHead(layer, policy_type, k, c, p * p, arch.row_order)
        setattr(trunk, arch.out_attr, head)
        if arch.sets_out_channels:
            trunk.out_channels = head.channels_per_pixel  # SD3 / DiT unpatchify with self.out_channels
        if timestep_freq_shift is not None:
            for m in trunk.modules():
                if isinstance(m, Timesteps):
                    m.downscale_freq_shift = float(timestep_freq_shift)
        self.trunk = trunk

        temb_module = trunk.get_submodule(arch.temb_path)
        temb_module.register_forward_hook(_capture_temb)
        if policy_type == "GMFlow" and constant_logstd is None:
            self.proj_out_logstds = _logstd_mlp(_temb_dim(temb_module), logstd_inner_dim, num_logstd_layers).to(
                device=layer.weight.device, dtype=layer.weight.dtype
            )

    @staticmethod
    def _check_trunk(teacher_class: str, trunk: nn.Module) -> None:
        if teacher_class == "UNet2DModel":
            cfg = trunk.config
            if cfg.time_embedding_type == "fourier":
                raise ValueError(
                    "UNet2DModel with time_embedding_type='fourier' divides its output by the timestep; not supported"
                )
            skip = [t for t in (*cfg.down_block_types, *cfg.up_block_types) if "Skip" in t]
            if skip:
                raise ValueError(f"UNet2DModel with skip blocks {skip} adds a skip sample to its output; not supported")

    # ------------------------------------------------------------------ properties

    @property
    def policy_type(self) -> str:
        return self.config.policy_type

    @property
    def num_components(self) -> int:
        """K (GMFlow components) or N (DX grid points)."""
        return self.config.num_components if self.policy_type == "GMFlow" else self.config.num_points

    @property
    def latent_channels(self) -> int:
        """C, channels per latent pixel."""
        return self._channels

    @property
    def patch_size(self) -> int:
        """Pixels per token side (2 for FLUX / Qwen-Image packing, the patch size for SD3 / DiT, 1 for UNet)."""
        return self._patch

    @property
    def latent_layout(self) -> str:
        """ "tokens" (FLUX, Qwen-Image: :meth:`forward_native` returns token layout) or "image"."""
        return self._arch.layout

    @property
    def teacher_class(self) -> str:
        return self.config.teacher_class

    @property
    def num_inference_steps(self) -> int | None:
        """The sampling steps the student was distilled for, None when not recorded."""
        return self.config.get("num_inference_steps")

    @property
    def constant_logstd(self) -> float | None:
        """The fixed log-std of a GMFlow student without a log-std MLP, None when it has one."""
        return self.config.get("constant_logstd")

    @property
    def sampling(self) -> dict[str, Any]:
        """The recorded sampling settings (PiFlowScheduler config keys), ``{}`` when none are recorded."""
        return dict(self.config.get("sampling") or {})

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_from_teacher_layer(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        init_noise: float = 0.05,
        init_logstd: float = 0.05,
        generator: torch.Generator | None = None,
    ) -> None:
        """Initialise the policy head from the teacher's output layer (weight (R, in[, kh, kw]), bias (R,)).

        GMFlow: means = the teacher's rows replicated K times, plus ``init_noise`` * N(0, 1) on the bias,
        one draw per (component, channel); logweights zero; log-std MLP xavier-uniform with its last layer
        at weight 0 and bias log(``init_logstd``). DX: the teacher's rows replicated N times.
        """
        if not (is_real(init_noise) and init_noise >= 0):
            raise ValueError(f"init_noise must be a finite float >= 0, got {init_noise!r}")
        positive_float("init_logstd", init_logstd)
        head: _PolicyHead = getattr(self.trunk, self._arch.out_attr)
        k, c, ct, p2 = head.k, self._channels, self._teacher_channels, head.p2
        w = weight.detach().float()
        b = bias.detach().float() if bias is not None else w.new_zeros(w.shape[0])
        tail = w.shape[1:]
        # canonical per-pixel rows, dropping learned-variance channels
        if head.row_order == "cp":
            w_c, b_c = w.reshape(ct, p2, *tail)[:c], b.reshape(ct, p2)[:c]  # (C, p2, ...)
            w_rep = w_c.unsqueeze(0).expand(k, c, p2, *tail)
            b_rep = b_c.unsqueeze(0).expand(k, c, p2)
        elif head.row_order == "pc":
            w_c, b_c = w.reshape(p2, ct, *tail)[:, :c], b.reshape(p2, ct)[:, :c]  # (p2, C, ...)
            w_rep = w_c.unsqueeze(1).expand(p2, k, c, *tail)
            b_rep = b_c.unsqueeze(1).expand(p2, k, c)
        else:
            w_rep = w[:c].unsqueeze(0).expand(k, c, *tail)
            b_rep = b[:c].unsqueeze(0).expand(k, c)
        main = head.means if self.policy_type == "GMFlow" else head.grid
        main.weight.copy_(w_rep.reshape(main.weight.shape))
        if self.policy_type == "GMFlow":
            noise = torch.randn(k, c, generator=generator, dtype=torch.float32) * float(init_noise)
            if head.row_order == "cp":
                noise = noise.unsqueeze(-1).expand(k, c, p2)
            elif head.row_order == "pc":
                noise = noise.unsqueeze(0).expand(p2, k, c)
            main.bias.copy_((b_rep + noise.to(b_rep.device)).reshape(-1))
            head.logweights.weight.zero_()
            head.logweights.bias.zero_()
            if self.constant_logstd is not None:
                return
            linears = [m for m in self.proj_out_logstds if isinstance(m, nn.Linear)]
            for m in linears:
                nn.init.xavier_uniform_(m.weight, generator=generator)
                nn.init.zeros_(m.bias)
            linears[-1].weight.zero_()
            linears[-1].bias.fill_(math.log(init_logstd))
        else:
            main.bias.copy_(b_rep.reshape(-1))

    # ------------------------------------------------------------------ forward

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, refusing a trunk that still carries PEFT adapter layers (a student from
        ``load_official_adapter(fuse=False)``, or one given ``load_lora_adapter``): their weights would be written
        under ``base_layer`` / ``lora_*`` keys that :meth:`from_pretrained` cannot place."""
        layers = [name for name, m in self.trunk.named_modules() if type(m).__module__.startswith("peft.")]
        if layers:
            names = sorted(getattr(self.trunk, "peft_config", None) or {})
            raise ValueError(
                f"the student's trunk carries PEFT adapter layers (adapters {names or 'unnamed'}, e.g. on "
                f"trunk.{layers[0]}): fuse them into the weights first, student.trunk.fuse_lora(adapter_names={names}); "
                "student.trunk.unload_lora(), or save an adapter on its own with student.trunk.save_lora_adapter(...)"
            )
        kept = self._modules.pop("teacher_modules", None)  # the tied teacher's layers are not the student's
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if kept is not None:
                self.teacher_modules = kept

    @property
    def _latent_dims(self) -> int:
        """4 for image latents (B, C, H, W), 5 for video latents (B, C, T, H, W) (Wan)."""
        return 5 if self._arch.video else 4

    def _check_latents(self, x_t: object) -> torch.Tensor:
        c, p = self._channels, self._patch
        shape = "(B, C, T, H, W)" if self._arch.video else "(B, C, H, W)"
        if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point():
            raise TypeError(f"x_t must be a floating-point tensor {shape} with C = {c}, got {type(x_t).__name__}")
        if x_t.dim() != self._latent_dims or x_t.shape[1] != c:
            raise ValueError(
                f"x_t must have shape {shape} with C = {c} for this {self.teacher_class} student, got {tuple(x_t.shape)}"
            )
        if x_t.shape[-2] % p or x_t.shape[-1] % p:
            raise ValueError(
                f"x_t height and width must be multiples of {p} for this {self.teacher_class} student, "
                f"got {tuple(x_t.shape[-2:])}"
            )
        return x_t

    def _trunk_timestep(self, timestep: object, batch: int, device: torch.device) -> torch.Tensor:
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float, torch.Tensor)):
            raise TypeError(f"timestep must be a float or a tensor (sigma * 1000), got {type(timestep).__name__}")
        t = torch.as_tensor(timestep, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        elif t.shape != (batch,):
            raise ValueError(f"timestep must be a float, a 0-d or a ({batch},) tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            t = t.float()
        return t / self._timestep_divisor if self._timestep_divisor != 1.0 else t

    def forward(
        self,
        x_t: torch.Tensor,
        timestep: float | torch.Tensor,
        return_dict: bool = True,
        as_teacher: bool = False,
        **teacher_kwargs: Any,
    ) -> GMFlowOutput | DXOutput | tuple[GMFlowOutput | DXOutput] | torch.Tensor:
        """Policy at (x_t, timestep) in image layout.

        Args:
            x_t: (B, C, H, W) noisy latents (unpacked, also for FLUX / Qwen-Image); Wan: video latents
                (B, C, T, H, W), and every output field gains the frame axis T before H, W.
            timestep: sigma * 1000 (the diffusers scheduler timestep): float, 0-d or (B,) tensor.
            return_dict: False returns a 1-tuple holding the output.
            as_teacher: run the tied teacher instead (see :meth:`attach_teacher_head`): the trunk with its
                PEFT adapters disabled and the teacher's own output layer; returns the teacher's prediction
                (B, C, H, W) as a tensor. Going through ``forward`` lets a DDP / FSDP wrapper of the student
                run the teacher on its own (gathered) weights.
            **teacher_kwargs: the teacher's conditioning (``encoder_hidden_states``, ``pooled_projections``,
                ``guidance`` (FLUX: the guidance scale, e.g. 3.5; FLUX.2: 4.0), ``class_labels``, ...). FLUX's
                and FLUX.2's ``img_ids`` / ``txt_ids`` and Qwen-Image's ``img_shapes`` are derived here unless given.
                FLUX.2 editing: ``condition_latents``, the reference images' latents (B, C, H', W') (or a list of
                them) in the layout of ``x_t``, become extra tokens the policy does not cover
                (:func:`~piflow_kernels.layouts.native_inputs`).

        Returns:
            GMFlowOutput (means (B, K, C, H, W), logweights (B, K, 1, H, W), logstds (B, 1, 1, 1, 1)) or
            DXOutput (grid (B, N, C, H, W)), velocity parameterisation. Wan: means (B, K, C, T, H, W),
            logweights (B, K, 1, T, H, W), logstds (B, 1, 1, 1, 1, 1), grid (B, N, C, T, H, W).
        """
        x_t = self._check_latents(x_t)
        t = self._trunk_timestep(timestep, x_t.shape[0], x_t.device)
        p = self._patch
        kwargs, hw = native_inputs(self.teacher_class, x_t, t, teacher_kwargs, p)
        if as_teacher:
            return self._teacher_forward(kwargs, hw)
        out = self.forward_native(**kwargs)
        if self._arch.layout == "tokens":  # the generated image's tokens (FLUX.2 puts reference images' after them)
            out = map_output(out, lambda z: tokens_to_image(z[..., : hw[0] * hw[1], :], hw[0], hw[1], p))
        return out if return_dict else (out,)

    # ------------------------------------------------------------------ the tied teacher

    def attach_teacher_head(self, layer: nn.Module) -> None:
        """Keep the teacher's output layer (frozen) so that ``forward(..., as_teacher=True)`` is the teacher.

        With LoRA on the trunk (``peft``), the teacher is the trunk's base weights with the adapters disabled:
        one copy of the base weights serves both (the official ``tie_teacher``). ``layer`` is the teacher's
        original output layer (``proj_out`` / ``conv_out`` / ``proj_out_2``). It is held in the submodule dict
        ``teacher_modules``, which :meth:`save_pretrained` leaves out.
        """
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"the teacher's output layer must be nn.Linear or nn.Conv2d, got {type(layer).__name__}")
        self._teacher_modules()[self._arch.out_attr] = layer.requires_grad_(False)

    def keep_teacher_module(self, path: str) -> None:
        """Keep a frozen copy of the trunk's submodule ``path`` (e.g. "norm_out") for the tied teacher, before the
        student trains it: the official recipes train ``norm_out`` fully, and only untrained modules are tied."""
        module = self.trunk.get_submodule(path)
        self._teacher_modules()[path.replace(".", "/")] = copy.deepcopy(module).requires_grad_(False)

    def _teacher_modules(self) -> nn.ModuleDict:
        if "teacher_modules" not in self._modules:
            self.teacher_modules = nn.ModuleDict()
        return self.teacher_modules

    @property
    def has_teacher(self) -> bool:
        """Whether ``forward(..., as_teacher=True)`` can run (the teacher's output layer is attached)."""
        return "teacher_modules" in self._modules and self._arch.out_attr in self.teacher_modules

    def _teacher_forward(self, kwargs: dict[str, Any], hw: tuple[int, int]) -> torch.Tensor:
        if not self.has_teacher:
            raise RuntimeError("as_teacher=True needs the teacher's output layer: call attach_teacher_head(layer) first")
        arch, trunk = self._arch, self.trunk
        swaps = []  # (parent module, attribute, the student's module), restored in finally
        for key, module in self.teacher_modules.items():
            parent_path, _, attr = key.replace("/", ".").rpartition(".")
            parent = trunk.get_submodule(parent_path) if parent_path else trunk
            swaps.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, module)
        student_channels = getattr(trunk, "out_channels", None) if arch.sets_out_channels else None
        if arch.sets_out_channels:
            trunk.out_channels = self._teacher_channels  # what the teacher unpatchifies with
        adapters = _peft_layers(trunk)
        if any(getattr(m, "merged", False) for m in adapters):
            raise RuntimeError("as_teacher=True needs unmerged adapters: the trunk's LoRA weights are merged into its base")
        disabled = [m for m in adapters if not m.disable_adapters]
        for m in disabled:
            m._disable_adapters = True  # peft's flag; enable_adapters() would also flip requires_grad
        temb_module = trunk.get_submodule(arch.temb_path)
        try:
            raw = trunk(return_dict=False, **kwargs)[0]
        finally:
            for m in disabled:
                m._disable_adapters = False
            for parent, attr, module in reversed(swaps):
                setattr(parent, attr, module)
            if arch.sets_out_channels:
                trunk.out_channels = student_channels
            temb_module.__dict__.pop("_piflow_temb", None)
        return native_prediction_to_image(self.teacher_class, raw, hw, self._patch, self._channels)

    def forward_native(self, *args: Any, **kwargs: Any) -> GMFlowOutput | DXOutput:
        """Call the trunk exactly as a pipeline calls the teacher; return the policy in the trunk's layout.

        Image teachers (UNet2DModel, DiT, SD3): fields (B, K, C, H, W) as from :meth:`forward`. FLUX /
        Qwen-Image (``hidden_states`` packed (B, L, 4C), ``timestep`` = sigma): token layout, means
        (B, K, C, L, 4), logweights (B, K, 1, L, 4), logstds (B, 1, 1, 1, 1), grid (B, N, C, L, 4); the
        matching latents are (B, C, L, 4) (:func:`~piflow_kernels.layouts.packed_to_tokens`).
        """
        kwargs.pop("return_dict", None)
        temb_module = self.trunk.get_submodule(self._arch.temb_path)
        temb_module.__dict__.pop("_piflow_temb", None)
        raw = self.trunk(*args, return_dict=False, **kwargs)[0]
        temb = temb_module.__dict__.pop("_piflow_temb", None)
        return self._split(raw, temb)

    def _split(self, raw: torch.Tensor, temb: torch.Tensor | None) -> GMFlowOutput | DXOutput:
        k, c, p2 = self.num_components, self._channels, self._patch**2
        gm = self.policy_type == "GMFlow"
        width = (k * c + k) * p2 if gm else k * c * p2
        if self._arch.layout == "tokens":
            if raw.dim() != 3 or raw.shape[-1] != width:
                raise RuntimeError(f"trunk output {tuple(raw.shape)} is not (B, L, {width})")
            to_tokens = lambda z, n: z.unflatten(-1, (k, n, p2)).permute(0, 2, 3, 1, 4)  # noqa: E731
            if gm:
                means, logweights = to_tokens(raw[..., : k * c * p2], c), to_tokens(raw[..., k * c * p2 :], 1)
            else:
                return DXOutput(grid=to_tokens(raw, c))
        else:
            per_pixel = width // p2
            if raw.dim() != self._latent_dims or raw.shape[1] != per_pixel:
                spatial = "T, H, W" if self._arch.video else "H, W"
                raise RuntimeError(f"trunk output {tuple(raw.shape)} is not (B, {per_pixel}, {spatial})")
            if not gm:
                return DXOutput(grid=raw.unflatten(1, (k, c)))
            means, logweights = raw[:, : k * c].unflatten(1, (k, c)), raw[:, k * c :].unsqueeze(2)
        logweights = torch.log_softmax(logweights.float(), dim=1).to(means.dtype)
        batch = means.shape[0]
        if self.constant_logstd is not None:  # the official heads' new_full((bs, 1, 1, 1, 1), constant_logstd)
            logstds = means.new_full((batch, 1, 1, *([1] * (means.dim() - 3))), self.constant_logstd)
            return GMFlowOutput(means=means, logweights=logweights, logstds=logstds)
        if temb is None:
            raise RuntimeError(f"the time embedding ({self._arch.temb_path}) was not computed by the trunk's forward")
        logstds = self.proj_out_logstds(temb.detach()[:batch].to(means.dtype))
        logstds = logstds.reshape(batch, 1, 1, *([1] * (means.dim() - 3)))
        return GMFlowOutput(means=means, logweights=logweights, logstds=logstds)


def build_student(
    teacher: ModelMixin,
    policy_type: str = "GMFlow",
    num_components: int = 8,
    num_points: int = 10,
    *,
    init_noise: float = 0.05,
    init_logstd: float = 0.05,
    logstd_inner_dim: int = 1024,
    num_logstd_layers: int = 2,
    constant_logstd: float | None = None,
    copy_teacher: bool = True,
    timestep_divisor: float | None = None,
    timestep_freq_shift: float | None = None,
    num_inference_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> PiFlowStudent:
    """Build a GMFlow (K components) or DX (N grid points) student from a diffusers teacher.

    Args:
        teacher: a diffusers ``UNet2DModel``, ``DiTTransformer2DModel``, ``SD3Transformer2DModel``,
            ``FluxTransformer2DModel``, ``QwenImageTransformer2DModel``, ``Flux2Transformer2DModel`` or
            ``WanTransformer3DModel`` (video, latents (B, C, T, H, W)).
        policy_type: "GMFlow" or "DX".
        num_components: K for GMFlow (the official students use 8 for FLUX.1 / FLUX.2 / Qwen-Image, 32 for DiT).
        num_points: N for DX.
        init_noise: std of the noise added to the replicated means bias, per (component, channel); 0 makes
            every component equal the teacher's output. GMFlow only (DX replicates exactly).
        init_logstd: initial std of every component (the log-std MLP starts constant at log(init_logstd)).
        logstd_inner_dim, num_logstd_layers: the log-std MLP on the detached time embedding.
        constant_logstd: a fixed log-std instead of the MLP (GMFlow; ``init_logstd`` then does not apply).
        copy_teacher: deep-copy the teacher (default); False turns the teacher module itself into the
            student's trunk (no second copy in memory; the teacher is then no longer usable as a teacher).
        timestep_divisor, timestep_freq_shift, num_inference_steps: see :class:`PiFlowStudent`.
        generator: for the init noise and the log-std MLP init.

    Returns:
        a :class:`PiFlowStudent` on the teacher's device and dtype, in the teacher's train/eval mode.

    Example:
        >>> student = build_student(flux_transformer, "GMFlow", num_components=8)
        >>> out = student(x_t, t, encoder_hidden_states=emb, pooled_projections=pooled, guidance=g)
    """
    name = teacher_class_name(teacher)
    arch = arch_for(name)
    trunk = copy.deepcopy(teacher) if copy_teacher else teacher
    layer = getattr(trunk, arch.out_attr)
    if isinstance(layer, _PolicyHead):
        raise TypeError(f"this {name} is already a student's trunk (its {arch.out_attr} is a policy head): pass the teacher")
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"{name}.{arch.out_attr} must be nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    weight, bias = layer.weight, layer.bias
    student = PiFlowStudent(
        teacher_class=name,
        teacher_config=_plain_config(teacher.config),
        policy_type=policy_type,
        num_components=num_components,
        num_points=num_points,
        logstd_inner_dim=logstd_inner_dim,
        num_logstd_layers=num_logstd_layers,
        constant_logstd=constant_logstd,
        timestep_divisor=timestep_divisor,
        timestep_freq_shift=timestep_freq_shift,
        num_inference_steps=num_inference_steps,
        trunk=trunk,
    )
    student.init_from_teacher_layer(weight, bias, init_noise=init_noise, init_logstd=init_logstd, generator=generator)
    student.train(teacher.training)
    return student
