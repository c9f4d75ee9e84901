"""The image latent cache, offline on CPU with tiny random VAEs saved in tiny pipeline folders.

The stored latents must be exactly what the pipeline's VAE encodes (the latent distribution's mean, or a
seeded sample) normalised as the pipeline's transformer sees latents: the pipeline's own decoding in
``__call__`` (driven here by a transformer that predicts zero velocity, so the latents reach the VAE
untouched) must give the image the VAE decodes from its raw latents. The folder must resume a killed run
without duplicates or gaps, refuse another VAE, name a damaged shard, and its captions.jsonl must feed
encode-prompts into a prompt cache aligned with it by index.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    QwenImagePipeline,
)
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.utils import load_image  # noqa: E402
from PIL import Image  # noqa: E402
from test_prompt_cache import MSL, WORDS, save_flux  # noqa: E402
from test_students import pack, tiny_teacher  # noqa: E402

from piflow_kernels import cli  # noqa: E402
from piflow_kernels.distill import latent_cache  # noqa: E402
from piflow_kernels.distill.latent_cache import LatentCache, encode_images, image_seed, read_images  # noqa: E402
from piflow_kernels.distill.prompt_cache import PromptCache, encode_prompts  # noqa: E402
from piflow_kernels.distill.prompts import Prompt, read_prompts  # noqa: E402
from piflow_kernels.files import DamagedFileError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 16, 24  # pixels; both tiny VAEs downsample by 2: latents 8 x 12
CAPTIONS = [f"{WORDS[i % 16]} {WORDS[(3 * i + 1) % 16]} number {i}" for i in range(10)]
# the image folder: (relative path, PIL mode, size (w, h), where the caption is)
IMAGES = [("a/00.png", "RGB", (32, 20), "jsonl"), ("a/01.png", "RGB", (20, 32), "jsonl"), ("a/02.png", "RGB", (24, 16), "jsonl"),
          ("a/03.png", "RGBA", (40, 30), "jsonl"), ("b/04.jpg", "RGB", (30, 30), "txt"), ("b/05.webp", "RGB", (26, 18), "txt"),
          ("b/06.png", "L", (24, 24), "txt"), ("b/c/07.png", "RGB", (48, 16), "csv"), ("b/c/08.png", "P", (16, 48), "csv"),
          ("b/c/09.jpeg", "RGB", (28, 22), "csv")]  # fmt: skip


def write_images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    jsonl, csv_rows = [], ["file_name,prompt,other"]
    for i, (rel, mode, (w, h), where) in enumerate(IMAGES):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        image = image.convert("RGB").convert("P") if mode == "P" else image.convert(mode)
        image.save(path)
        if where == "jsonl":
            jsonl.append(json.dumps({"file_name": rel, "prompt": CAPTIONS[i]}))
        elif where == "csv":
            csv_rows.append(f'{Path(rel).name},"{CAPTIONS[i]}",{i}')
        else:
            path.with_suffix(".txt").write_text(f"  {CAPTIONS[i]} \n", encoding="utf-8")  # stripped
    (root / "metadata.jsonl").write_text("\n".join(jsonl) + "\n", encoding="utf-8")
    (root / "b" / "c" / "metadata.csv").write_text("\n".join(csv_rows) + "\n", encoding="utf-8")
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "skipped.png")  # hidden folders are not read
    (root / "b" / "notes.md").write_text("not an image\n", encoding="utf-8")
    return root


def qwen_vae(seed: int = 4) -> AutoencoderKLQwenImage:
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=3, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.1, -0.2, 0.3], latents_std=[0.5, 1.5, 2.0]).eval()  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:  # text encoders too: the same folder makes the prompt cache
    return save_flux(tmp_path_factory.mktemp("pipes") / "flux")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipes") / "qwen"
    pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(shift=3.0), qwen_vae(), None, None, tiny_teacher("qwen"))
    pipe.save_pretrained(folder)
    return folder


def encode(pipeline_dir, images, out, **kwargs):
    options = {"resolution": [HEIGHT, WIDTH], "batch_size": 2, "shard_size": 3, "dtype": "float32", "progress": False}
    return encode_images(pipeline_dir, images, out, **{**options, **kwargs})


@pytest.fixture(scope="module")
def flux_cache(flux_dir, images, tmp_path_factory) -> Path:
    return encode(flux_dir, images, tmp_path_factory.mktemp("caches") / "flux")


def batches_of(world_size=1, rank=0, shard_size=3, batch_size=2, n=10):
    """The batches encode_images runs: shards of the rank's images, then batches within a shard."""
    mine = list(range(rank, n, world_size))
    for s in range(0, len(mine), shard_size):
        chunk = mine[s : s + shard_size]
        for b in range(0, len(chunk), batch_size):
            yield chunk[b : b + batch_size]


def pixels(images: Path, idx) -> torch.Tensor:
    """The batch as the pipelines preprocess images: diffusers' loader, then VaeImageProcessor (resize, center crop)."""
    pil = [load_image(str(images / IMAGES[i][0])) for i in idx]
    return VaeImageProcessor(vae_scale_factor=4).preprocess(pil, height=HEIGHT, width=WIDTH, resize_mode="crop")


def zero_velocity(pipe):
    """The pipeline's transformer predicts zero velocity: a sampling step leaves the latents as they are."""
    pipe.transformer.forward = lambda *args, hidden_states, **kwargs: (torch.zeros_like(hidden_states),)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------- the image folder


def test_the_image_folder_is_read_in_path_order_with_its_captions(images):
    source = read_images(images)
    assert source.names == [rel for rel, *_ in IMAGES]  # sorted by relative path, hidden folders and notes.md skipped
    assert source.captions == CAPTIONS  # metadata.jsonl at the top, metadata.csv in b/c (relative to it), sidecar .txt
    assert source.open(3).mode == "RGB" and source.open(3).size == (40, 30)
    assert source.open(8).mode == "RGB"


# ---------------------------------------------------------------------------- FLUX.1: what is stored


@torch.no_grad()
def test_two_ranks_store_the_vaes_mean_latents_normalised_as_flux_sees_them(flux_dir, images, flux_cache, tmp_path):
    out = tmp_path / "ranks"
    encode(flux_dir, images, out, world_size=2, rank=0)
    assert not (out / "index.json").exists()
    with pytest.raises(ValueError, match=r"incomplete latent cache: no part of rank\(s\) \[1\]"):
        LatentCache(out)
    encode(flux_dir, images, out, world_size=2, rank=1)
    cache = LatentCache(out)  # the last rank to finish merged the parts
    assert (out / "index.json").is_file() and len(cache) == 10
    assert [s["indices"] for s in cache.index["shards"]] == [[0, 2, 4], [6, 8], [1, 3, 5], [7, 9]]
    assert cache.prompts == CAPTIONS and cache.paths == [rel for rel, *_ in IMAGES]
    assert cache.latent_shape == (3, HEIGHT // 2, WIDTH // 2)
    assert cache.index["settings"] == {"resolution": [HEIGHT, WIDTH], "dtype": "float32", "vae_dtype": "float32",
                                       "sample": False, "seed": None, "shard_size": 3}  # fmt: skip
    assert cache.index["vae"]["components"]["vae"]["class"] == ["diffusers", "AutoencoderKL"]
    assert not list(out.glob("*.tmp*"))

    vae = AutoencoderKL.from_pretrained(flux_dir / "vae").eval()
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert (shift, scale) == (0.1, 0.5)
    for rank in (0, 1):
        for idx in batches_of(world_size=2, rank=rank):
            z = vae.encode(pixels(images, idx)).latent_dist.mode()
            for j, i in enumerate(idx):
                latents = cache[i]["latents"]
                assert latents.dtype == torch.float32 and latents.shape == (3, 8, 12)
                assert torch.equal(latents, (z[j] - shift) * scale)  # FluxImg2ImgPipeline's normalisation, bit for bit

    # the pipeline's own __call__ decodes the stored latents (latents / scaling_factor + shift_factor) into
    # the image the VAE decodes from its raw latents
    pipe = zero_velocity(FluxPipeline.from_pretrained(flux_dir))
    idx = [0, 7]
    stored = torch.stack([cache[i]["latents"] for i in idx])
    decoded = pipe(prompt_embeds=torch.zeros(2, MSL, 12), pooled_prompt_embeds=torch.zeros(2, 10), latents=pack(stored),
                   height=HEIGHT, width=WIDTH, num_inference_steps=1, output_type="pt").images  # fmt: skip
    raw = vae.encode(pixels(images, idx)).latent_dist.mode()
    expected = pipe.image_processor.postprocess(vae.decode(raw).sample, output_type="pt")
    torch.testing.assert_close(decoded, expected)

    whole = LatentCache(flux_cache)  # one rank, other shards: the same latents
    for i in range(10):
        torch.testing.assert_close(cache[i]["latents"], whole[i]["latents"], rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_sampled_latents_are_the_pipelines_own_seeded_encoding(flux_dir, images, tmp_path):
    out = encode(flux_dir, images, tmp_path / "sampled", sample=True, seed=5, batch_size=1)
    cache = LatentCache(out)
    assert cache.index["settings"]["sample"] is True and cache.index["settings"]["seed"] == 5
    vae = AutoencoderKL.from_pretrained(flux_dir / "vae").eval()
    pipe = SimpleNamespace(vae=vae)  # FluxImg2ImgPipeline._encode_vae_image reads only self.vae
    for i in (0, 4, 9):
        generator = torch.Generator().manual_seed(image_seed(5, i))
        expected = FluxImg2ImgPipeline._encode_vae_image(pipe, pixels(images, [i]), generator)
        assert torch.equal(cache[i]["latents"], expected[0])
        mode = (vae.encode(pixels(images, [i])).latent_dist.mode()[0] - 0.1) * 0.5
        assert not torch.equal(cache[i]["latents"], mode)
    assert image_seed(5, 0) != image_seed(5, 1) and image_seed(5, 0) != image_seed(6, 0)
    again = LatentCache(encode(flux_dir, images, tmp_path / "again", sample=True, seed=5, batch_size=1))
    assert again.index["shards"] == cache.index["shards"]  # same seeds: same bytes


def test_bfloat16_is_the_default_storage(flux_dir, images, tmp_path):
    out = encode_images(flux_dir, images, tmp_path / "bf16", resolution=[HEIGHT, WIDTH], progress=False, num_workers=0)
    cache = LatentCache(out)
    assert cache[0]["latents"].dtype == torch.bfloat16 and cache.index["settings"]["dtype"] == "bfloat16"
    assert cache.index["settings"]["shard_size"] == latent_cache.SHARD_SIZE and len(cache.index["shards"]) == 1


# ---------------------------------------------------------------------------- Qwen-Image: 5-D latents, mean and std


@torch.no_grad()
def test_qwen_image_latents_are_normalised_by_mean_and_std_without_the_frame_axis(qwen_dir, images, tmp_path):
    out = encode(qwen_dir, images, tmp_path / "qwen")
    cache = LatentCache(out)
    assert cache.latent_shape == (3, HEIGHT // 2, WIDTH // 2)
    vae = AutoencoderKLQwenImage.from_pretrained(qwen_dir / "vae").eval()
    mean = torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.5, 1.5, 2.0]).view(1, 3, 1, 1, 1)
    for idx in batches_of():
        z = vae.encode(pixels(images, idx).unsqueeze(2)).latent_dist.mode()  # (B, 3, 1, 8, 12)
        for j, i in enumerate(idx):
            assert torch.equal(cache[i]["latents"], ((z - mean) * (1.0 / std))[j, :, 0])  # the pipeline's own arithmetic
            torch.testing.assert_close(cache[i]["latents"], ((z - mean) / std)[j, :, 0])

    pipe = zero_velocity(QwenImagePipeline.from_pretrained(qwen_dir, text_encoder=None, tokenizer=None))
    idx = [1, 8]
    stored = torch.stack([cache[i]["latents"] for i in idx])
    decoded = pipe(prompt_embeds=torch.zeros(2, 7, 12), prompt_embeds_mask=torch.ones(2, 7, dtype=torch.long),
                   latents=pack(stored), height=HEIGHT, width=WIDTH, num_inference_steps=1, output_type="pt").images  # fmt: skip
    raw = vae.encode(pixels(images, idx).unsqueeze(2)).latent_dist.mode()
    expected = pipe.image_processor.postprocess(vae.decode(raw).sample[:, :, 0], output_type="pt")
    torch.testing.assert_close(decoded, expected)


@torch.no_grad()
def test_sd3_latents_and_its_transformers_patch_size(images, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from test_pipelines import tiny_vae

    none = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"])
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(5), transformer=tiny_teacher("sd3"),
                                    **none)  # fmt: skip
    pipe.save_pretrained(tmp_path / "sd3")
    cache = LatentCache(encode(tmp_path / "sd3", images, tmp_path / "cache", batch_size=10, shard_size=10))
    assert cache.latent_shape == (5, 8, 12) and cache.index["vae"]["pipeline"] == "StableDiffusion3Pipeline"
    z = pipe.vae.encode(pixels(images, range(10))).latent_dist.mode()
    for i in range(10):
        assert torch.equal(cache[i]["latents"], (z[i] - 0.1) * 0.5)  # StableDiffusion3Img2ImgPipeline's normalisation
    with pytest.raises(ValueError, match=r"multiples of 4 \(the pipeline's vae_scale_factor 2 x 2\)"):  # x its patch_size
        encode(tmp_path / "sd3", images, tmp_path / "x", resolution=[16, 18])


# ---------------------------------------------------------------------------- resuming and refusing


def test_a_killed_encode_resumes_without_duplicates_or_gaps(flux_dir, images, flux_cache, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real = latent_cache._encode_batch
    calls = []

    def dies_in_the_second_shard(vae, pipeline, pixels, seeds):
        calls.append(len(pixels))
        if len(calls) == 3:  # shard 0 is two batches (2 + 1 images): killed during shard 1
            raise KeyboardInterrupt
        return real(vae, pipeline, pixels, seeds)

    monkeypatch.setattr(latent_cache, "_encode_batch", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        encode(flux_dir, images, out)
    part = json.loads((out / "part-00000-of-00001.json").read_text())
    assert [s["file"] for s in part["shards"]] == ["shard-00000-of-00001-00000.safetensors"] and not part["complete"]
    with pytest.raises(ValueError, match="unfinished"):
        LatentCache(out)
    calls.clear()
    monkeypatch.setattr(latent_cache, "_encode_batch", lambda vae, p, x, s: calls.append(len(x)) or real(vae, p, x, s))
    encode(flux_dir, images, out)
    assert sum(calls) == 7  # shards 1, 2 and 3 only
    resumed, whole = LatentCache(out), LatentCache(flux_cache)
    assert resumed.index["shards"] == whole.index["shards"]  # same files, same sha256: same bytes
    assert sorted(i for s in resumed.index["shards"] for i in s["indices"]) == list(range(10))

    # the last shard lost (cut short), a temporary file left behind: only that shard is encoded again
    (out / "shard-00000-of-00001-00003.safetensors.tmp99").write_bytes(b"\0")
    (out / "shard-00000-of-00001-00003.safetensors").write_bytes(b"\0" * 10)
    calls.clear()
    encode(flux_dir, images, out)
    assert calls == [1] and not list(out.glob("*.tmp*"))
    assert LatentCache(out).index["shards"] == whole.index["shards"]
    loads = []
    monkeypatch.setattr(latent_cache, "_load_vae", lambda *a: loads.append(a))
    encode(flux_dir, images, out)  # complete: nothing to do, the VAE is not even loaded
    assert loads == []


def test_a_folder_of_another_vae_images_or_settings_is_refused(flux_dir, images, flux_cache, tmp_path):
    other = tmp_path / "other"
    FluxPipeline.from_pretrained(flux_dir).save_pretrained(other)
    torch.manual_seed(1)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(flux_dir / "vae"))  # the same config, other weights
    vae.save_pretrained(other / "vae")
    before = sorted(p.name for p in flux_cache.iterdir())
    with pytest.raises(ValueError, match=r"differs in: vae: vae weights/files \(diffusion_pytorch_model.safetensors differ") as e:
        encode(other, images, flux_cache)
    assert str(flux_cache) in str(e.value) and "Use a new folder or delete this one" in str(e.value)
    with pytest.raises(ValueError, match=r"resolution \[16, 24\] vs \[16, 16\]"):
        encode(flux_dir, images, flux_cache, resolution=16)
    with pytest.raises(ValueError, match=r"sample False vs True; seed None vs 0"):
        encode(flux_dir, images, flux_cache, sample=True)
    with pytest.raises(ValueError, match=r"world_size 1 vs 2 \(resume with the same number of processes\)"):
        encode(flux_dir, images, flux_cache, world_size=2)
    changed = write_images(tmp_path / "changed")
    (changed / "b" / "06.txt").write_text("another caption\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"differs in: the image list \(10 images there, 10 here, or the same number with other "
                                         r"names or captions\)"):  # fmt: skip
        encode(flux_dir, changed, flux_cache)
    assert sorted(p.name for p in flux_cache.iterdir()) == before


def test_a_damaged_or_missing_shard_is_an_error_naming_the_file(flux_cache, tmp_path):
    out = tmp_path / "damaged"
    out.mkdir()
    for f in flux_cache.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    shard = out / "shard-00000-of-00001-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, one tensor byte changed
    shard.write_bytes(bytes(data))
    cache = LatentCache(out)
    assert torch.equal(cache[0]["latents"], LatentCache(flux_cache)[0]["latents"])  # the other shards still read
    with pytest.raises(DamagedFileError, match=f"{shard}: latent cache shard: its sha256 differs"):
        cache[4]
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(DamagedFileError, match=rf"{shard}: latent cache shard: {len(data) - 100} bytes, the index records"):
        cache[4]
    shard.write_bytes(b"\x10" + bytes(len(data) - 1))
    with pytest.raises(DamagedFileError, match=f"{shard}: latent cache shard: not a complete safetensors file"):
        LatentCache(out, verify=False)[4]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=str(shard)):
        cache[4]


def test_lazy_reading_keeps_at_most_max_open_shards_and_batches_stack(flux_cache):
    cache = LatentCache(flux_cache, max_open_shards=2)
    for i in (0, 3, 6, 9, 1):
        cache[i]
    assert list(cache._open) == [3, 0]  # least recently used first out
    batches = list(cache.iter_batches(2, seed=1, rank=1, world_size=2))
    assert [b["latents"].shape for b in batches] == [(2, 3, 8, 12)] * 2 and len(batches) == 2
    with pytest.raises(IndexError, match=r"image 10 out of range \(the cache holds 10\)"):
        cache[10]


# ---------------------------------------------------------------------------- captions -> prompt cache, alignment


def test_captions_feed_encode_prompts_and_check_aligned(flux_dir, images, flux_cache, tmp_path):
    prompts = read_prompts(flux_cache / "captions.jsonl")
    assert prompts == [Prompt(c) for c in CAPTIONS]
    options = {"batch_size": 4, "dtype": "float32", "progress": False, "max_sequence_length": MSL}
    aligned = encode_prompts(flux_dir, prompts, tmp_path / "prompts", **options)
    cache = LatentCache(flux_cache)
    cache.check_aligned(PromptCache(aligned))
    cache.check_aligned(aligned)  # a folder works too
    shuffled = encode_prompts(flux_dir, prompts[1:] + prompts[:1], tmp_path / "shuffled", **options)
    with pytest.raises(ValueError, match=rf"the prompt cache {shuffled} is not aligned with the latent cache {flux_cache}: "
                                         rf"10 of its 10 prompts are not the images' captions, first prompt 0: "
                                         rf"'{CAPTIONS[1]}', the caption of a/00.png: '{CAPTIONS[0]}'"):  # fmt: skip
        cache.check_aligned(PromptCache(shuffled))
    shorter = encode_prompts(flux_dir, prompts[:9], tmp_path / "shorter", **options)
    with pytest.raises(ValueError, match=rf"{shorter} is not aligned with the latent cache {flux_cache}: it holds 9 prompts "
                                         r"for 10 images \(encode .*captions.jsonl with encode-prompts\)"):  # fmt: skip
        cache.check_aligned(shorter)


# ---------------------------------------------------------------------------- a datasets folder


def test_a_datasets_folder_gives_the_same_latents_as_the_image_files(flux_dir, images, flux_cache, tmp_path):
    datasets = pytest.importorskip("datasets")
    pngs = [i for i, (rel, *_) in enumerate(IMAGES) if rel.endswith(".png")]  # stored losslessly by datasets
    ds = datasets.Dataset.from_dict({"picture": [Image.open(images / IMAGES[i][0]) for i in pngs],
                                     "text": [CAPTIONS[i] for i in pngs]})  # fmt: skip
    ds.cast_column("picture", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    cache = LatentCache(encode(flux_dir, tmp_path / "ds", tmp_path / "out", image_column="picture", caption_column="text",
                               batch_size=1))  # fmt: skip
    assert cache.paths == [f"row {k}" for k in range(len(pngs))] and cache.prompts == [CAPTIONS[i] for i in pngs]
    whole = LatentCache(flux_cache)
    for k, i in enumerate(pngs):
        torch.testing.assert_close(cache[k]["latents"], whole[i]["latents"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"no column 'image' \(columns: \['picture', 'text'\]\)"):
        read_images(tmp_path / "ds", caption_column="text")


# ---------------------------------------------------------------------------- bad input


def test_bad_image_folders_and_settings_are_clear_errors(flux_dir, images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here\n")
    with pytest.raises(ValueError, match=rf"^{empty}: no images \(files ending in .png, .jpg, .jpeg, .webp\)$"):
        read_images(empty)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        read_images(tmp_path / "nowhere")

    folder = write_images(tmp_path / "missing-caption")
    (folder / "b" / "05.txt").unlink()
    with pytest.raises(ValueError, match=rf"^{folder / 'b' / '05.webp'}: no caption \(not in .*metadata.jsonl, "
                                         r".*metadata.csv, and no 05.txt beside it\)$"):  # fmt: skip
        read_images(folder)
    (folder / "b" / "05.txt").write_text(" \n")
    with pytest.raises(ValueError, match=rf"{folder / 'b' / '05.txt'}: empty caption for b/05.webp"):
        read_images(folder)
    (folder / "b" / "05.txt").write_text("fine\n")
    (folder / "metadata.jsonl").write_text('{"file_name": "a/00.png", "prompt": "x"}\n{"file_name": "a/99.png", "prompt": "y"}\n')
    with pytest.raises(ValueError, match=rf"{folder / 'metadata.jsonl'}: line 2: file_name 'a/99.png' is not an image of"):
        read_images(folder)
    (folder / "metadata.jsonl").write_text('{"file_name": "a/00.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"line 1: no caption for 'a/00.png': no column 'prompt' \(has \['caption', 'file_"):
        read_images(folder)

    broken = write_images(tmp_path / "broken")
    (broken / "b" / "c" / "08.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DamagedFileError, match=rf"{broken / 'b' / 'c' / '08.png'}: image: not a readable image"):
        encode(flux_dir, broken, tmp_path / "out-broken")

    with pytest.raises(ValueError, match=r"resolution \[16, 22\]: height and width must be multiples of 4 \(the pipeline's "
                                         r"vae_scale_factor 2 x 2\), e.g. \[16, 20\]"):  # fmt: skip
        encode(flux_dir, images, tmp_path / "x", resolution=[16, 22])
    with pytest.raises(ValueError, match="resolution must be a positive integer or"):
        encode(flux_dir, images, tmp_path / "x", resolution=[16])
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        encode(flux_dir, images, tmp_path / "x", dtype="int8")
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "X"]}')
    with pytest.raises(ValueError, match="encoding images of a StableDiffusionPipeline is not supported"):
        encode(unsupported, images, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before anything was written


# ---------------------------------------------------------------------------- the command line


def test_cli_encodes_and_refuses_bad_configs_with_exit_code_2(flux_dir, images, flux_cache, tmp_path, monkeypatch, capsys):
    config = tmp_path / "encode.toml"
    config.write_text(f'pipeline = "{flux_dir}"\nimages = "{images}"\nout = "cache"\nresolution = [{HEIGHT}, {WIDTH}]\n'
                      'batch_size = 2\ndtype = "float32"\n', encoding="utf-8")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "piflow_kernels", "encode-images", str(config), "--no-progress"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "rank 0 of 1: 10 of 10 images cached in cache" in done.stdout
    cache, ref = LatentCache(tmp_path / "cache"), LatentCache(flux_cache)
    assert len(cache) == 10 and cache.index["settings"]["shard_size"] == latent_cache.SHARD_SIZE
    for i in (0, 5, 9):
        torch.testing.assert_close(cache[i]["latents"], ref[i]["latents"], rtol=1e-6, atol=1e-6)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    config.write_text(f'pipeline = "{flux_dir}"\nimages = "{images}"\nout = "ranks"\nresolution = {HEIGHT}\n'
                      'dtype = "float32"\nnum_workers = 0\n', encoding="utf-8")  # fmt: skip
    assert cli.main(["encode-images", str(config), "--no-progress"]) == 0
    assert "rank 1 of 2: 5 of 10 images cached in ranks" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ranks").glob("part-*")) == ["part-00001-of-00002.json"]

    head = f'pipeline = "{flux_dir}"\nimages = "{images}"\nout = "o"\n'
    bad = {"unknown key(s) ['resolutions']": head + "resolutions = 16\n",
           "missing key(s) ['resolution']": head,
           "resolution [16, 18]: height and width must be multiples of 4": head + "resolution = [16, 18]\n",
           "sample must be true or false": head + "resolution = 16\nsample = 1\n",
           "none does not exist (image folder)": head.replace(str(images), "none") + "resolution = 16\n"}  # fmt: skip
    for message, text in bad.items():
        config.write_text(text, encoding="utf-8")
        assert cli.main(["encode-images", str(config)]) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err


@torch.no_grad()
def test_flux2_latents_are_the_pipelines_encoding_in_the_image_layout(images, tmp_path):
    """FLUX.2: Flux2Pipeline._encode_vae_image (the mode, 2x2-patchified, normalised by the VAE's batch-norm
    statistics) stored unpatchified, the library's image layout: patchified again it is the pipeline's, bit for bit."""
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline

    from piflow_kernels import tiny

    torch.manual_seed(3)
    pipe = tiny._flux2()
    pipe.vae.bn.running_mean.copy_(torch.randn(12))  # not the identity normalisation of a fresh VAE
    pipe.vae.bn.running_var.copy_(torch.rand(12) + 0.5)
    pipe.save_pretrained(tmp_path / "flux2")
    cache = LatentCache(encode(tmp_path / "flux2", images, tmp_path / "cache", batch_size=10, shard_size=10))
    assert cache.latent_shape == (3, HEIGHT // 2, WIDTH // 2) and cache.index["vae"]["pipeline"] == "Flux2Pipeline"
    vae = AutoencoderKLFlux2.from_pretrained(tmp_path / "flux2" / "vae").eval()
    owner = SimpleNamespace(vae=vae, _patchify_latents=Flux2Pipeline._patchify_latents)  # what _encode_vae_image reads
    want = Flux2Pipeline._encode_vae_image(owner, pixels(images, range(10)), None)  # (10, 12, H/4, W/4)
    stored = torch.stack([cache[i]["latents"] for i in range(10)])
    assert torch.equal(Flux2Pipeline._patchify_latents(stored), want)
