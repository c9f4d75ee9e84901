"""Students built from diffusers teachers: heads, initialisation, layouts, save/load, bad input.

The tiny teachers below (built offline from configs, a few thousand parameters each) are also used by
test_pipelines.py and test_official_weights.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from piflow_kernels import DXOutput, GMFlowOutput

diffusers = pytest.importorskip("diffusers")  # students wrap diffusers models
from piflow_kernels import layouts  # noqa: E402
from piflow_kernels.students import SUPPORTED_TEACHERS, PiFlowStudent, build_student  # noqa: E402

TEACHERS = ("unet", "dit", "sd3", "flux", "qwen")
CHANNELS = {"unet": 3, "dit": 3, "sd3": 5, "flux": 3, "qwen": 3}
# DiT unpatchifies square images only; the others take odd-sized rectangles (3x5 tokens of 2x2 pixels)
SIZES = {"unet": (6, 10), "dit": (6, 6), "sd3": (6, 10), "flux": (6, 10), "qwen": (6, 10)}
TEXT_LEN, TEXT_DIM, POOLED_DIM = 7, 12, 10


def tiny_teacher(name: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny diffusers teacher, in eval mode."""
    torch.manual_seed(seed)
    if name == "unet":
        model = diffusers.UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        )  # fmt: skip
    elif name == "dit":  # learned variance: out_channels = 2 * in_channels, as facebook/DiT
        model = diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=4, in_channels=3, out_channels=6, num_layers=1, sample_size=6,
            patch_size=2, norm_num_groups=1,
        )  # fmt: skip
    elif name == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=5, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, out_channels=5,
            pos_embed_max_size=16,
        )  # fmt: skip
    elif name == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
    elif name == "qwen":
        model = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=12, out_channels=3, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
    else:
        raise KeyError(name)
    return model.eval()


def teacher_inputs(name: str, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fresh random (x_t (B, C, H, W), timestep = sigma * 1000 (B,), conditioning kwargs)."""
    g = torch.Generator().manual_seed(seed)
    h, w = SIZES[name]
    x = torch.randn(batch, CHANNELS[name], h, w, generator=g)
    t = torch.rand(batch, generator=g) * 980 + 10
    kwargs: dict = {}
    if name == "dit":
        kwargs = {"class_labels": torch.randint(0, 1000, (batch,), generator=g)}
    elif name in ("sd3", "flux"):
        kwargs = {
            "encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
            "pooled_projections": torch.randn(batch, POOLED_DIM, generator=g),
        }
        if name == "flux":
            kwargs["guidance"] = torch.full((batch,), 3.5)
    elif name == "qwen":
        kwargs = {
            "encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
            "encoder_hidden_states_mask": torch.ones(batch, TEXT_LEN),
        }
    return x, t, kwargs


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> FLUX packed (B, H/2 * W/2, 4C), written out independently of the library."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """FLUX packed (B, L, 4C) -> (B, C, H, W)."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


@torch.no_grad()
def teacher_velocity(name: str, teacher: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The teacher's prediction (B, C, H, W) in each model's own calling convention."""
    b, c, h, w = x.shape
    if name == "unet":
        return teacher(x, t, **kwargs).sample
    if name == "dit":
        return teacher(x, t, **kwargs).sample[:, :c]  # drop the learned-variance channels
    if name == "sd3":
        return teacher(hidden_states=x, timestep=t, **kwargs).sample
    if name == "flux":
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        out = teacher(
            hidden_states=pack(x), timestep=t / 1000, img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT_LEN, 3), **kwargs
        ).sample
        return unpack(out, h, w)
    out = teacher(hidden_states=pack(x), timestep=t / 1000, img_shapes=[[(1, h // 2, w // 2)]] * b, **kwargs).sample
    return unpack(out, h, w)


def gm_mean(out: GMFlowOutput) -> torch.Tensor:
    """The mixture's mean velocity at the source point: sum_k softmax(logweights)_k means_k."""
    return (out.logweights.float().exp() * out.means.float()).sum(1)


# ---------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("name", TEACHERS)
@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"K{k}")
def test_gm_init_equals_teacher(name, k):
    teacher = tiny_teacher(name)
    student = build_student(teacher, "GMFlow", num_components=k, init_noise=0.0, logstd_inner_dim=16).eval()
    x, t, kwargs = teacher_inputs(name)
    ref = teacher_velocity(name, teacher, x, t, kwargs)
    with torch.no_grad():
        out = student(x, t, **kwargs)
    b, c, h, w = x.shape
    assert isinstance(out, GMFlowOutput)
    assert out.means.shape == (b, k, c, h, w)
    assert out.logweights.shape == (b, k, 1, h, w)
    assert out.logstds.shape == (b, 1, 1, 1, 1)
    torch.testing.assert_close(out.logweights.logsumexp(1), torch.zeros(b, 1, h, w), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logstds, torch.full_like(out.logstds, math.log(0.05)), atol=1e-6, rtol=0)
    for i in range(k):  # every component is the teacher: the mixture mean is the teacher's output
        torch.testing.assert_close(out.means[:, i], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(gm_mean(out), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TEACHERS)
def test_dx_init_equals_teacher(name):
    teacher = tiny_teacher(name)
    student = build_student(teacher, "DX", num_points=4).eval()
    x, t, kwargs = teacher_inputs(name, batch=3)
    ref = teacher_velocity(name, teacher, x, t, kwargs)
    with torch.no_grad():
        out = student(x, t, **kwargs)
    assert isinstance(out, DXOutput)
    assert out.grid.shape == (3, 4, *x.shape[1:])
    for n in range(4):
        torch.testing.assert_close(out.grid[:, n], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_init_noise_is_per_component_and_channel(name):
    teacher = tiny_teacher(name)
    g = torch.Generator().manual_seed(5)
    student = build_student(teacher, num_components=4, init_noise=0.05, logstd_inner_dim=16, generator=g).eval()
    x, t, kwargs = teacher_inputs(name)
    ref = teacher_velocity(name, teacher, x, t, kwargs)
    with torch.no_grad():
        offset = student(x, t, **kwargs).means - ref[:, None]  # (B, K, C, H, W): the bias noise
    per_kc = offset[0, :, :, 0, 0]
    torch.testing.assert_close(offset, per_kc[None, :, :, None, None].expand_as(offset), atol=1e-5, rtol=0)
    assert per_kc.abs().min() > 0
    assert 0.01 < per_kc.std() < 0.15
    # the logstd MLP starts constant: last layer weight zero, bias log(0.05)
    last = student.proj_out_logstds[-1]
    assert torch.count_nonzero(last.weight) == 0 and last.bias.item() == pytest.approx(math.log(0.05))


def test_token_layout_forward_native_matches_forward():
    teacher = tiny_teacher("flux")
    student = build_student(teacher, num_components=3, logstd_inner_dim=16).eval()
    x, t, kwargs = teacher_inputs("flux")
    b, c, h, w = x.shape
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    with torch.no_grad():
        image = student(x, t, **kwargs)
        native = student.forward_native(
            hidden_states=pack(x), timestep=t / 1000, img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT_LEN, 3), **kwargs
        )
    assert student.latent_layout == "tokens"
    assert native.means.shape == (b, 3, c, h * w // 4, 4)
    # token layout (B, K, C, L, 4) -> image: sub-pixel p = 2 * py + px of token (i, j)
    as_image = native.means.reshape(b, 3, c, h // 2, w // 2, 2, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(b, 3, c, h, w)
    torch.testing.assert_close(as_image, image.means, atol=0, rtol=0)
    torch.testing.assert_close(native.logstds, image.logstds, atol=0, rtol=0)


def test_layout_reshapes_round_trip_and_match_flux_packing():
    x = torch.randn(2, 3, 6, 10)
    packed = layouts.image_to_packed(x, 2)
    assert packed.shape == (2, 15, 12)
    torch.testing.assert_close(packed, pack(x), atol=0, rtol=0)  # channel index c*4 + py*2 + px, token (i, j) -> 5i + j
    tokens = layouts.packed_to_tokens(packed, 4)
    assert tokens.shape == (2, 3, 15, 4)
    torch.testing.assert_close(layouts.tokens_to_packed(tokens), packed, atol=0, rtol=0)
    torch.testing.assert_close(layouts.tokens_to_image(tokens, 3, 5, 2), x, atol=0, rtol=0)
    # the spatial fields of a policy output change layout, logstds stay
    out = GMFlowOutput(means=tokens.unsqueeze(1), logweights=tokens[:, :1].unsqueeze(1), logstds=torch.zeros(2, 1, 1, 1, 1))
    image = layouts.map_output(out, lambda z: layouts.tokens_to_image(z, 3, 5, 2))
    assert image.means.shape == (2, 1, 3, 6, 10) and image.logweights.shape == (2, 1, 1, 6, 10) and image.logstds is out.logstds


@pytest.mark.parametrize("name", TEACHERS)
def test_geometry_and_arch_table(name):
    teacher = tiny_teacher(name)
    cls = type(teacher).__name__
    assert layouts.teacher_class_name(teacher) == cls and layouts.arch_for(cls) is layouts.ARCHS[cls]
    c, c_teacher, p = layouts.geometry(cls, teacher.config)
    assert c == CHANNELS[name] and c_teacher in (c, 2 * c)
    assert p == {"unet": 1, "dit": 2, "sd3": 2, "flux": 2, "qwen": 2}[name]
    assert layouts.geometry(cls, dict(teacher.config)) == (c, c_teacher, p)  # a mapping or an attribute config
    with pytest.raises(TypeError, match="unsupported teacher class 'AutoencoderKL'"):
        layouts.arch_for("AutoencoderKL")


def test_bf16_teacher_gives_bf16_student():
    teacher = tiny_teacher("sd3").to(torch.bfloat16)
    student = build_student(teacher, num_components=1, init_noise=0.0, logstd_inner_dim=16).eval()
    x, t, kwargs = teacher_inputs("sd3")
    x = x.bfloat16()
    kwargs = {k: v.bfloat16() for k, v in kwargs.items()}
    ref = teacher_velocity("sd3", teacher, x, t, kwargs)
    with torch.no_grad():
        out = student(x, t, **kwargs)
    assert out.means.dtype == torch.bfloat16 and out.logstds.dtype == torch.bfloat16
    torch.testing.assert_close(out.means[:, 0], ref, atol=0, rtol=0)


# ---------------------------------------------------------------------------- training behaviour


def test_logstd_sees_a_detached_time_embedding_and_heads_get_gradients():
    student = build_student(tiny_teacher("flux"), num_components=2, logstd_inner_dim=16).train()
    x, t, kwargs = teacher_inputs("flux")
    out = student(x, t, **kwargs)
    out.logstds.sum().backward()
    assert student.proj_out_logstds[1].weight.grad is not None
    assert torch.count_nonzero(student.proj_out_logstds[-1].weight.grad) > 0
    assert all(p.grad is None for p in student.trunk.time_text_embed.parameters())
    student.zero_grad(set_to_none=True)
    out = student(x, t, **kwargs)
    gm_mean(out).square().mean().backward()  # the components differ (init noise): logweights matter
    head = student.trunk.proj_out
    assert torch.count_nonzero(head.means.weight.grad) > 0 and torch.count_nonzero(head.logweights.weight.grad) > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, kwargs = teacher_inputs("sd3")
    grads = []
    for ckpt in (False, True):
        student = build_student(
            tiny_teacher("sd3"), num_components=2, logstd_inner_dim=16, generator=torch.Generator().manual_seed(0)
        )
        if ckpt:
            student.enable_gradient_checkpointing()
        student.train()
        gm_mean(student(x, t, **kwargs)).square().mean().backward()
        grads.append(student.trunk.pos_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_copy_teacher_keeps_the_teacher_and_deepcopy_keeps_hooks_separate():
    teacher = tiny_teacher("flux")
    x, t, kwargs = teacher_inputs("flux")
    before = teacher_velocity("flux", teacher, x, t, kwargs)
    student = build_student(teacher, num_components=2, logstd_inner_dim=16).eval()
    assert isinstance(teacher.proj_out, torch.nn.Linear)  # untouched
    torch.testing.assert_close(teacher_velocity("flux", teacher, x, t, kwargs), before, atol=0, rtol=0)

    ema = copy.deepcopy(student)  # as an EMA copy: its time-embedding hook must write to its own trunk
    with torch.no_grad():
        ema.proj_out_logstds[-1].bias.add_(1.0)
        a, b = student(x, t, **kwargs), ema(x, t, **kwargs)
    torch.testing.assert_close(b.logstds, a.logstds + 1.0, atol=1e-6, rtol=0)

    owned = build_student(teacher, num_components=2, logstd_inner_dim=16, copy_teacher=False)
    assert owned.trunk is teacher


# ---------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name,policy", [(n, "GMFlow") for n in TEACHERS] + [("flux", "DX"), ("dit", "DX")])
def test_save_and_load_round_trip_exactly(tmp_path, name, policy):
    student = build_student(tiny_teacher(name), policy, num_components=3, num_points=3, logstd_inner_dim=16).eval()
    student.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = PiFlowStudent.from_pretrained(tmp_path).eval()
    a, b = student.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x, t, kwargs = teacher_inputs(name)
    with torch.no_grad():
        out_a, out_b = student(x, t, **kwargs), loaded(x, t, **kwargs)
    for key in out_a.keys():
        assert torch.equal(getattr(out_a, key), getattr(out_b, key)), key


def test_timestep_freq_shift_survives_save_and_load(tmp_path):
    student = build_student(tiny_teacher("dit"), num_components=2, logstd_inner_dim=16, timestep_freq_shift=0.0).eval()
    student.save_pretrained(tmp_path)
    loaded = PiFlowStudent.from_pretrained(tmp_path)
    shifts = {m.downscale_freq_shift for m in loaded.modules() if isinstance(m, diffusers.models.embeddings.Timesteps)}
    assert shifts == {0.0}


# ---------------------------------------------------------------------------- bad input


class _SubclassedFlux(diffusers.FluxTransformer2DModel):
    pass


def test_unsupported_teachers_are_refused_by_name():
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        build_student(torch.nn.Linear(4, 4))
    vae = diffusers.AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=2)
    with pytest.raises(TypeError, match="AutoencoderKL"):
        build_student(vae)
    sub = _SubclassedFlux(
        num_layers=1, num_single_layers=0, attention_head_dim=8, num_attention_heads=1, in_channels=8,
        joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    with pytest.raises(TypeError, match="subclasses are not supported"):
        build_student(sub)
    fourier = diffusers.UNet2DModel(
        in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16), time_embedding_type="fourier",
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match="fourier"):
        build_student(fourier)
    assert set(SUPPORTED_TEACHERS) >= {"UNet2DModel", "DiTTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"policy_type": "gm"}, "policy_type must be one of"),
        ({"num_components": 0}, "num_components must be an int >= 1"),
        ({"policy_type": "DX", "num_points": 0}, "num_points must be an int >= 1"),
        ({"init_noise": -1.0}, "init_noise"),
        ({"num_logstd_layers": 0}, "num_logstd_layers"),
    ],
    ids=["policy-type", "K0", "N0", "negative-noise", "no-logstd-layers"],
)
def test_bad_build_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_student(tiny_teacher("sd3"), **kwargs)


def test_bad_forward_inputs_name_what_was_expected():
    student = build_student(tiny_teacher("flux"), num_components=2, logstd_inner_dim=16).eval()
    x, t, kwargs = teacher_inputs("flux")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) with C = 3"):
        student(x[:, :2], t, **kwargs)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) with C = 3"):
        student(x[0], t, **kwargs)
    with pytest.raises(ValueError, match="multiples of 2"):
        student(x[..., :5], t, **kwargs)
    with pytest.raises(TypeError, match="floating-point"):
        student(x.long(), t, **kwargs)
    with pytest.raises(ValueError, match=r"a 0-d or a \(2,\) tensor"):
        student(x, t[:1].expand(3), **kwargs)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        student(x, t, pooled_projections=kwargs["pooled_projections"], guidance=kwargs["guidance"])
    with torch.no_grad():
        out = student(x, t, **kwargs)
    with pytest.raises(TypeError, match="cannot be indexed"):
        out[0]  # a stock pipeline's `[0]` must not silently pick the means
