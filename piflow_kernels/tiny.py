"""Tiny random text-to-image pipelines, saved like the real ones, to try a distillation recipe end to end on a CPU.

    $ python -m piflow_kernels make-tiny-pipeline flux runs/tiny/flux      # or sd3, qwen, flux2, wan
    >>> save_tiny_pipeline("flux", "runs/tiny/flux", seed=0)

Every component is built from a config with random weights (a few thousand parameters: the transformer, the VAE
and the text encoders), and the tokenizers from small in-memory vocabularies, so nothing is downloaded. The
folders have the layout of ``FLUX.1-dev``, ``stable-diffusion-3-medium-diffusers``, ``Qwen-Image`` and ``FLUX.2-dev``
(``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``, ``scheduler/``), so every
command that takes a real pipeline folder takes these. The images they make are noise: they check the plumbing,
the speed and the memory of a recipe, not its quality.

Geometry (latent channels C, VAE downsampling 2, packing 2x2 for FLUX / Qwen-Image / FLUX.2): FLUX.1 C = 3, SD3
C = 5, Qwen-Image C = 3, FLUX.2 C = 3; 16 x 16 images are 8 x 8 latents. Wan (text-to-video, ``WanPipeline``,
the layout of ``Wan2.1-T2V-1.3B-Diffusers``): C = 3, VAE downsampling 2 in time and space, (1, 2, 2) patches; 5
frames of 16 x 16 are latents (B, 3, 3, 8, 8). Its text encoder is a ``UMT5EncoderModel`` with the T5 tokenizer.

FLUX.2's text encoder is a ``Mistral3ForConditionalGeneration`` of 30 layers (``encode_prompt`` stacks layers 10, 20
and 30), and its tokenizer a ``PreTrainedTokenizerFast`` with a chat template, which ``encode_prompt`` calls as it
calls the real ``PixtralProcessor`` (``apply_chat_template``; the processor itself needs torchvision). Its byte-level
vocabulary spells the system prompt out byte by byte, about 190 tokens before the prompt's own: a
``max_sequence_length`` of 256 leaves some 60 bytes of prompt (the pipeline's default, 512, over 300).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["TINY_KINDS", "TINY_WORDS", "save_tiny_pipeline", "tiny_prompts"]

TINY_KINDS = ("flux", "sd3", "qwen", "flux2", "wan")
#: the words the tiny tokenizers know as whole tokens (other text is split into characters, or bytes for Qwen)
TINY_WORDS = "a photo of the cat dog red blue on in with big small tree house car sky".split()
_TEXT_DIM = 12  # T5 width (FLUX, SD3), Qwen2.5-VL width and 3 Mistral layers (FLUX.2): the joint_attention_dim


def tiny_prompts(n: int = 16) -> list[str]:
    """``n`` short distinct prompts in the tiny vocabulary."""
    w = TINY_WORDS
    return [f"{w[i % 16]} {w[(3 * i + 1) % 16]} {w[(5 * i + 2) % 16]} number {i}" for i in range(n)]


def _clip_tokenizer(words: Sequence[str] = TINY_WORDS, max_length: int = 32):
    """A CLIP tokenizer whose vocabulary is ``words`` and their characters (any prompt of them tokenizes)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(set("".join(words) + "number0123456789")):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in words:
        vocab.setdefault(w + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer(words: Sequence[str] = TINY_WORDS):
    """A unigram T5 tokenizer of ``words`` and their characters."""
    from transformers import T5Tokenizer

    chars = sorted(set("".join(words) + "number0123456789"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=pieces + [(c, -5.0) for c in chars], extra_ids=0)


def _clip(vocab: int, hidden: int, projection: bool = False) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=32, projection_dim=hidden, eos_token_id=1,
                            bos_token_id=0, pad_token_id=1)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(vocab: int) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab, d_model=_TEXT_DIM, d_kv=6, d_ff=16, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
        shift_factor=0.1, scaling_factor=0.5,
    ).eval()  # fmt: skip


def _byte_level_vocab() -> dict[str, int]:
    """GPT-2's byte-to-unicode table as a vocabulary: every string tokenizes, one token per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars = printable + [256 + n for n in range(256 - len(printable))]
    return {chr(c): i for i, c in enumerate(chars)}


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=_TEXT_DIM, pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(scheduler=scheduler, vae=_vae(3), text_encoder=_clip(len(tok), 10), tokenizer=tok,
                        text_encoder_2=_t5(len(tok2)), tokenizer_2=tok2, transformer=transformer)  # fmt: skip


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok3 = _clip_tokenizer(), _t5_tokenizer()
    # two blocks (the last has no context feed-forward); the two CLIPs (4 + 4 wide) are padded to the T5 width
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=5, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=_TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=8, out_channels=5,
        pos_embed_max_size=16,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(5), text_encoder=_clip(len(tok), 4, True),
        tokenizer=tok, text_encoder_2=_clip(len(tok), 4, True), tokenizer_2=_clip_tokenizer(), text_encoder_3=_t5(len(tok3)),
        tokenizer_3=tok3, transformer=transformer,
    )  # fmt: skip


def _qwen_text_encoder(hidden: int = _TEXT_DIM, intermediate: int = 24, mrope_section: tuple[int, ...] = (1, 1, 1)):
    """(tokenizer, encoder): a byte-level Qwen2 tokenizer and a one-layer Qwen2.5-VL of width ``hidden`` (its
    vision tower one block of the same width), in eval mode: Qwen-Image's text encoder, tiny. The tests build theirs
    here too."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=_byte_level_vocab(), merges=[], unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])  # fmt: skip
    text = {"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1,
            "rope_scaling": {"type": "mrope", "mrope_section": list(mrope_section)},
            "bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}  # fmt: skip
    vision = {"depth": 1, "hidden_size": hidden, "intermediate_size": intermediate, "num_heads": 2,
              "out_hidden_size": hidden, "patch_size": 2, "spatial_merge_size": 1, "temporal_patch_size": 1,
              "window_size": 4, "fullatt_block_indexes": [0]}  # fmt: skip
    return tok, Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()


def _qwen():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    tok, encoder = _qwen_text_encoder()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=3, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 3, latents_std=[1.0] * 3)  # fmt: skip
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=12, out_channels=3, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=_TEXT_DIM, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9)
    return QwenImagePipeline(scheduler, vae, encoder, tok, transformer)


def _flux2_tokenizer():
    """A byte-level BPE tokenizer (every string tokenizes, one token per byte) with Mistral's special tokens and a
    chat template rendering ``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]``, as Mistral Small 3.1's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    vocab = {t: i for i, t in enumerate(special)}
    for c in _byte_level_vocab():
        vocab[c] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['content'] is string %}{% set text = m['content'] %}{% else %}"
        "{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
        "{% endif %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% else %}"
        "[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=special[4:], chat_template=template,
                                   model_max_length=512)  # fmt: skip


def _flux2():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = _flux2_tokenizer()
    hidden = _TEXT_DIM // 3  # encode_prompt concatenates the hidden states of layers 10, 20 and 30
    text = {"model_type": "mistral", "vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 8,
            "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": hidden // 2,
            "max_position_embeddings": 1024, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}  # fmt: skip
    vision = {"model_type": "pixtral", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "head_dim": 4, "patch_size": 2, "image_size": 16}  # fmt: skip
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=0, spatial_merge_size=1)
    encoder = Mistral3ForConditionalGeneration(config).eval()
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=3, norm_num_groups=4, sample_size=16,
    ).eval()  # fmt: skip
    transformer = Flux2Transformer2DModel(
        in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=_TEXT_DIM, timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return Flux2Pipeline(scheduler, vae, encoder, tok, transformer)


def _wan():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = _t5_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=_TEXT_DIM, d_kv=6, d_ff=16, num_layers=1,
                                          num_heads=2, relative_attention_num_buckets=8)).eval()  # fmt: skip
    # 2x temporal and spatial downsampling: 5 frames of 16 x 16 are latents (3, 3, 8, 8)
    vae = AutoencoderKLWan(base_dim=8, z_dim=3, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[True], latents_mean=[0.0] * 3, latents_std=[1.0] * 3,
                           scale_factor_temporal=2, scale_factor_spatial=2).eval()  # fmt: skip
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
        text_dim=_TEXT_DIM, freq_dim=8, ffn_dim=16, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tok, text_encoder=encoder, transformer=transformer, vae=vae, scheduler=scheduler)


_BUILDERS = {"flux": _flux, "sd3": _sd3, "qwen": _qwen, "flux2": _flux2, "wan": _wan}


def save_tiny_pipeline(kind: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny random ``kind`` pipeline ("flux", "sd3", "qwen", "flux2" or "wan") from ``seed`` and ``save_pretrained`` it
    to ``folder`` (which must not hold files). Returns the folder."""
    if kind not in _BUILDERS:
        raise ValueError(f"kind must be one of {', '.join(TINY_KINDS)}, got {kind!r}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty: a tiny pipeline is written to a new or empty folder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[kind]()
    pipe.save_pretrained(folder)
    return folder
