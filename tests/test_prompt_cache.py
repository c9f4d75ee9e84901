"""Prompt sources and the prompt-embedding cache, offline on CPU with tiny random text encoders.

A tiny FLUX.1 folder (CLIP + T5 built from configs, tokenizers built from in-memory vocabularies) is saved
with save_pretrained; the cache must hold exactly what the reloaded pipeline's encode_prompt returns for
the same batches, resume a killed run without duplicates or gaps, and refuse other encoders or prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline  # noqa: E402
from test_pipelines import tiny_vae  # noqa: E402
from test_students import tiny_teacher  # noqa: E402

from piflow_kernels import tiny  # noqa: E402
from piflow_kernels.distill import prompt_cache  # noqa: E402
from piflow_kernels.distill.prompt_cache import PromptCache, encode_prompts  # noqa: E402
from piflow_kernels.distill.prompts import Prompt, read_prompts  # noqa: E402
from piflow_kernels.files import DamagedFileError, load_safetensors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = tiny.TINY_WORDS
PROMPTS = tiny.tiny_prompts(16)
MSL = 8  # T5 tokens


# the tiny pipelines' own builders (piflow_kernels.tiny): the tokenizers from in-memory vocabularies, encoders from configs
clip_tokenizer, t5_tokenizer, clip, t5 = tiny._clip_tokenizer, tiny._t5_tokenizer, tiny._clip, tiny._t5


def save_flux(folder: Path, seed: int = 0) -> Path:
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = clip(len(tok), 10), t5(len(tok2))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(3), text_encoder=text_encoder, tokenizer=tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=tok2, transformer=tiny_teacher("flux"))  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return save_flux(tmp_path_factory.mktemp("pipes") / "flux")


@pytest.fixture(scope="module")
def flux(flux_dir) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(flux_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()  # as the pipeline's __call__ runs it (autograd can pick other CPU kernels)
def pipe_encode(pipe, prompts, *args, **kwargs):
    return pipe.encode_prompt(prompts, *args, **kwargs)


def encode(flux_dir, out, prompts=PROMPTS, **kwargs):
    options = {"batch_size": 4, "shard_size": 6, "dtype": "float32", "progress": False, "max_sequence_length": MSL}
    return encode_prompts(flux_dir, prompts, out, **{**options, **kwargs})


def batches_of(world_size=1, rank=0, shard_size=6, batch_size=4, n=16):
    """The batches encode_prompts runs: shards of the rank's prompts, then batches within a shard."""
    mine = list(range(rank, n, world_size))
    for s in range(0, len(mine), shard_size):
        chunk = mine[s : s + shard_size]
        for b in range(0, len(chunk), batch_size):
            yield chunk[b : b + batch_size]


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def flux_cache(flux_dir, tmp_path_factory) -> Path:
    return encode(flux_dir, tmp_path_factory.mktemp("caches") / "flux")


# ---------------------------------------------------------------------------- the cache holds the pipeline's embeddings


def test_cache_equals_the_pipelines_encode_prompt_bit_for_bit(flux, flux_cache):
    cache = PromptCache(flux_cache)
    assert len(cache) == 16 and cache.prompts == [Prompt(p) for p in PROMPTS]
    assert cache.names == ["pooled_prompt_embeds", "prompt_embeds"]  # text_ids: zeros (L, 3), not stored
    for idx in batches_of():
        embeds, pooled, text_ids = pipe_encode(flux, [PROMPTS[i] for i in idx], None, max_sequence_length=MSL)
        assert torch.equal(text_ids, torch.zeros(MSL, 3))
        for j, i in enumerate(idx):
            assert_same(cache[i], {"prompt_embeds": embeds[j], "pooled_prompt_embeds": pooled[j]})
    assert cache[0]["prompt_embeds"].shape == (MSL, 12) and cache[0]["pooled_prompt_embeds"].shape == (10,)


def test_shards_round_trip_and_the_index_records_them(flux_cache):
    index = json.loads((flux_cache / "index.json").read_text())
    assert [s["indices"] for s in index["shards"]] == [list(range(0, 6)), list(range(6, 12)), list(range(12, 16))]
    assert index["encoder"]["pipeline"] == "FluxPipeline"
    assert sorted(index["encoder"]["components"]) == ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    assert index["encoder"]["components"]["text_encoder"]["class"] == ["transformers", "CLIPTextModel"]
    assert "model.safetensors" in index["encoder"]["components"]["text_encoder_2"]["files"]
    assert index["settings"] == {"dtype": "float32", "max_sequence_length": MSL, "shard_size": 6, "negatives": False}
    cache = PromptCache(flux_cache)
    for shard in index["shards"]:
        assert shard["tensors"]["prompt_embeds"] == {"shape": [MSL, 12], "dtype": "float32"}
        assert shard["prompts"] == [[PROMPTS[i], None] for i in shard["indices"]]
        tensors = load_safetensors(flux_cache / shard["file"])
        assert sorted(tensors) == sorted(f"{i}/{n}" for i in shard["indices"] for n in cache.names)
        for i in shard["indices"]:
            assert_same(cache[i], {n: tensors[f"{i}/{n}"] for n in cache.names})
    assert not list(flux_cache.glob("*.tmp*"))


def test_two_ranks_cover_every_prompt_once(flux, flux_dir, flux_cache, tmp_path):
    out = tmp_path / "ranks"
    encode(flux_dir, out, world_size=2, rank=0)
    assert not (out / "index.json").exists()
    with pytest.raises(ValueError, match=r"incomplete prompt cache: no part of rank\(s\) \[1\]"):
        PromptCache(out)
    encode(flux_dir, out, world_size=2, rank=1)
    assert (out / "index.json").is_file()  # the last rank to finish merged the parts
    cache = PromptCache(out)
    assert sorted(i for s in cache.index["shards"] for i in s["indices"]) == list(range(16))
    assert [s["indices"] for s in cache.index["shards"]] == [[0, 2, 4, 6, 8, 10], [12, 14], [1, 3, 5, 7, 9, 11], [13, 15]]
    for rank in (0, 1):
        for idx in batches_of(world_size=2, rank=rank):
            embeds, pooled, _ = pipe_encode(flux, [PROMPTS[i] for i in idx], None, max_sequence_length=MSL)
            for j, i in enumerate(idx):
                assert_same(cache[i], {"prompt_embeds": embeds[j], "pooled_prompt_embeds": pooled[j]})
    (out / "index.json").unlink()  # the reader merges the parts itself
    merged = PromptCache(out)
    assert merged.index["shards"] == cache.index["shards"]


def test_a_killed_encode_resumes_without_duplicates_or_gaps(flux_dir, flux_cache, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real = prompt_cache._encode_batch
    calls = []

    def dies_in_the_second_shard(pipe, batch, *args):
        calls.append([p.prompt for p in batch])
        if len(calls) == 3:  # shard 0 is two batches (4 + 2 prompts): killed during shard 1
            raise KeyboardInterrupt
        return real(pipe, batch, *args)

    monkeypatch.setattr(prompt_cache, "_encode_batch", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        encode(flux_dir, out)
    assert [s["file"] for s in json.loads((out / "part-00000-of-00001.json").read_text())["shards"]] == [
        "shard-00000-of-00001-00000.safetensors"
    ]
    with pytest.raises(ValueError, match="unfinished"):
        PromptCache(out)
    calls.clear()
    monkeypatch.setattr(prompt_cache, "_encode_batch", lambda pipe, batch, *a: calls.append(batch) or real(pipe, batch, *a))
    encode(flux_dir, out)
    assert sum(len(b) for b in calls) == 10  # shards 1 and 2 only
    resumed, whole = PromptCache(out), PromptCache(flux_cache)
    assert resumed.index["shards"] == whole.index["shards"]  # same files, same sha256: same bytes
    for i in range(16):
        assert_same(resumed[i], whole[i])

    # the last shard lost (or cut short), a temporary file left behind: only that shard is encoded again
    (out / "shard-00000-of-00001-00002.safetensors.tmp123").write_bytes(b"\0")
    (out / "shard-00000-of-00001-00002.safetensors").write_bytes(b"\0" * 10)
    calls.clear()
    encode(flux_dir, out)
    assert [p.prompt for b in calls for p in b] == PROMPTS[12:]
    assert not list(out.glob("*.tmp*"))
    assert PromptCache(out).index["shards"] == whole.index["shards"]
    calls.clear()
    encode(flux_dir, out)  # complete: nothing to do, the text encoders are not even loaded
    assert calls == []


def test_a_cache_of_other_encoders_or_prompts_is_refused(flux_dir, flux_cache, tmp_path):
    other = save_flux(tmp_path / "other", seed=1)  # the same configs, other random weights
    before = sorted(p.name for p in flux_cache.iterdir())
    with pytest.raises(ValueError, match=r"differs in: encoder: text_encoder weights/files \(model.safetensors differ") as e:
        encode(other, flux_cache)
    assert str(flux_cache) in str(e.value) and "text_encoder_2 weights/files" in str(e.value)
    with pytest.raises(ValueError, match="differs in: the prompt list"):
        encode(flux_dir, flux_cache, prompts=PROMPTS[:-1] + ["another prompt"])
    with pytest.raises(ValueError, match="max_sequence_length 8 vs 6"):
        encode(flux_dir, flux_cache, max_sequence_length=6)
    with pytest.raises(ValueError, match=r"world_size 1 vs 2 \(resume with the same number of processes\)"):
        encode(flux_dir, flux_cache, world_size=2)
    assert sorted(p.name for p in flux_cache.iterdir()) == before
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        encode(flux_dir, tmp_path / "x", dtype="int8")
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="StableDiffusionPipeline is not supported"):
        encode(unsupported, tmp_path / "x")


def test_a_damaged_or_missing_shard_is_an_error_naming_the_file(flux_cache, tmp_path):
    out = tmp_path / "damaged"
    out.mkdir()
    for f in flux_cache.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    shard = out / "shard-00000-of-00001-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, one tensor byte changed
    shard.write_bytes(bytes(data))
    cache = PromptCache(out)
    assert_same(cache[0], PromptCache(flux_cache)[0])  # the other shards still read
    with pytest.raises(DamagedFileError, match=f"{shard}: prompt cache shard: its sha256 differs"):
        cache[7]
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(DamagedFileError, match=rf"{shard}: prompt cache shard: {len(data) - 100} bytes, the index records"):
        cache[7]
    # without the sha256 check, a cut header is still caught by the safetensors reader
    shard.write_bytes(b"\x10" + bytes(len(data) - 1))
    with pytest.raises(DamagedFileError, match=f"{shard}: prompt cache shard: not a complete safetensors file"):
        PromptCache(out, verify=False)[7]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=str(shard)):
        cache[7]


# ---------------------------------------------------------------------------- the per-rank batch stream


def test_iter_batches_is_seeded_disjoint_per_rank_and_stacks_the_tensors(flux_cache):
    cache = PromptCache(flux_cache)
    runs = [list(cache.iter_batches(3, seed=5, rank=r, world_size=2, epoch=1)) for r in (0, 1)]
    assert [len(r) for r in runs] == [2, 2]  # 8 prompts per rank: two full batches of 3, the rest dropped
    seen = [int(i) for r in runs for b in r for i in b["index"]]
    assert len(seen) == len(set(seen)) == 12
    order = cache.order(5, 1)
    assert sorted(order) == list(range(16))
    assert [int(i) for b in runs[0] for i in b["index"]] == order[0::2][:6]
    b = runs[1][0]
    assert b["prompt_embeds"].shape == (3, MSL, 12) and b["pooled_prompt_embeds"].shape == (3, 10)
    for j, i in enumerate(b["index"].tolist()):
        assert torch.equal(b["prompt_embeds"][j], cache[i]["prompt_embeds"])
    again = list(PromptCache(flux_cache).iter_batches(3, seed=5, rank=1, world_size=2, epoch=1))
    assert all(torch.equal(x["index"], y["index"]) for x, y in zip(again, runs[1]))
    assert cache.order(5, 2) != order and cache.order(6, 1) != order
    tail = list(cache.iter_batches(5, seed=0, drop_last=False))
    assert [len(t["index"]) for t in tail] == [5, 5, 5, 1]


def test_stacking_pads_prompts_of_different_lengths():
    a, b = torch.ones(2, 3), torch.ones(4, 3)
    stacked = prompt_cache._stack([a, b])
    assert stacked.shape == (2, 4, 3) and stacked[0, 2:].eq(0).all() and stacked[1].eq(1).all()


# ---------------------------------------------------------------------------- SD3: three encoders and negatives


def test_sd3_cache_holds_the_negatives_for_guidance(tmp_path):
    tok, tok3 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(2)
    # the SD3 pipeline pads the two CLIP embeddings (4 + 4 wide) to the T5 width (12)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(5), text_encoder=clip(len(tok), 4, True), tokenizer=tok,
        text_encoder_2=clip(len(tok), 4, True), tokenizer_2=clip_tokenizer(), text_encoder_3=t5(len(tok3)), tokenizer_3=tok3,
        transformer=tiny_teacher("sd3"),
    )  # fmt: skip
    pipe.save_pretrained(tmp_path / "sd3")
    prompts = [Prompt("a red cat", "blue"), Prompt("a big house", None), Prompt("the sky", "")]
    out = encode_prompts(tmp_path / "sd3", prompts, tmp_path / "cache", batch_size=3, dtype="float32", progress=False,
                         max_sequence_length=MSL)  # fmt: skip
    cache = PromptCache(out)
    assert cache.names == ["negative_pooled_prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "prompt_embeds"]
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3", dtype=torch.float32)
    pe, npe, pp, npp = pipe_encode(loaded, [p.prompt for p in prompts], None, None, negative_prompt=["blue", "", ""],
                                            max_sequence_length=MSL)  # fmt: skip
    for j in range(3):
        assert_same(cache[j], {"prompt_embeds": pe[j], "negative_prompt_embeds": npe[j], "pooled_prompt_embeds": pp[j],
                               "negative_pooled_prompt_embeds": npp[j]})  # fmt: skip
    assert cache[0]["prompt_embeds"].shape == (32 + MSL, 12)  # CLIP tokens, then T5 tokens


# ---------------------------------------------------------------------------- Qwen-Image: prompts of their own lengths


def test_qwen_image_cache_keeps_each_prompts_length_and_pads_like_the_pipeline(tmp_path):
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    torch.manual_seed(3)
    tok, encoder = tiny._qwen_text_encoder(hidden=16, intermediate=32, mrope_section=(1, 1, 2))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=3, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 3, latents_std=[1.0] * 3)  # fmt: skip
    pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), vae, encoder, tok, tiny_teacher("qwen"))
    pipe.save_pretrained(tmp_path / "qwen")
    prompts = [Prompt("a cat", "dark"), Prompt("a much longer prompt about a dog", ""), Prompt("sky", "blurry, low quality")]
    cache = PromptCache(encode_prompts(tmp_path / "qwen", prompts, tmp_path / "cache", batch_size=3, dtype="float32",
                                       progress=False))  # fmt: skip
    assert cache.index["shards"][0]["tensors"]["prompt_embeds"]["shape"] == [None, 16]  # lengths differ
    loaded = QwenImagePipeline.from_pretrained(tmp_path / "qwen", dtype=torch.float32)
    lengths = {}
    for name, strings in (("prompt_embeds", [p.prompt for p in prompts]), ("negative_prompt_embeds", [p[1] for p in prompts])):
        embeds, mask = pipe_encode(loaded, strings)
        assert mask is not None and mask.sum(1).unique().numel() == 3
        lengths[name] = mask.shape[1]
        rows = [cache[i] for i in range(3)]
        for j, row in enumerate(rows):
            n = int(mask[j].sum())
            assert row[name].shape == (n, 16) and torch.equal(row[name], embeds[j, :n])
            assert row[name + "_mask"].dtype == torch.long and row[name + "_mask"].eq(1).all()
        # a batch of them, padded at the end, is what the pipeline returns for the batch
        assert torch.equal(prompt_cache._stack([r[name] for r in rows]), embeds)
        assert torch.equal(prompt_cache._stack([r[name + "_mask"] for r in rows]), mask)
    batch = next(cache.iter_batches(3, seed=0))
    assert batch["prompt_embeds"].shape == (3, lengths["prompt_embeds"], 16)
    assert batch["negative_prompt_embeds_mask"].shape == (3, lengths["negative_prompt_embeds"])


# ---------------------------------------------------------------------------- prompt files


def test_prompt_files_of_each_format(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n  a dog  \n\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.txt") == [Prompt("a cat"), Prompt("a dog")]
    rows = [{"prompt": "a cat", "negative_prompt": "blurry"}, {"prompt": "a dog"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert read_prompts(tmp_path / "p.jsonl") == [Prompt("a cat", "blurry"), Prompt("a dog", "")]
    assert read_prompts(tmp_path / "p.jsonl", negative_column=None) == [Prompt("a cat"), Prompt("a dog")]
    (tmp_path / "p.csv").write_text('caption,other\n"a cat, sitting",1\na dog,2\n', encoding="utf-8")
    assert read_prompts(tmp_path / "p.csv", column="caption") == [Prompt("a cat, sitting"), Prompt("a dog")]


def test_parquet_prompts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a cat", "a dog"]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == [Prompt("a cat"), Prompt("a dog")]


def test_dataset_folder_prompts(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a cat", "a dog"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_prompts(tmp_path / "ds", column="text") == [Prompt("a cat"), Prompt("a dog")]


# bad prompt files: (file name, content, read_prompts keywords, error, message with {path} for the file)
BAD_PROMPT_FILES = {
    "txt-empty-line": ("bad.txt", "a cat\na dog\n \na tree\n", {}, ValueError,
                       r"^{path}: line 3: empty prompt \(every line must hold one prompt\)$"),
    "txt-not-utf8": ("bad.txt", b"a cat\n\xff\xfe dog\n", {}, DamagedFileError,
                     r"^{path}: prompt file: not UTF-8 text \(UnicodeDecodeError"),
    "txt-empty": ("bad.txt", "\n\n", {}, ValueError, r"^{path}: prompt file: no prompts \(the file is empty\)$"),
    "csv-empty-cell": ("bad.csv", 'prompt\na cat\n""\n', {}, ValueError,
                       r"^{path}: row 3: empty prompt in column 'prompt'$"),
    "csv-missing-column": ("bad.csv", 'prompt\na cat\n""\n', {"column": "caption"}, ValueError,
                           r"^{path}: row 2: no column 'caption' \(has \['prompt'\]\)$"),
    "csv-no-rows": ("bad.csv", "prompt\n", {}, ValueError, r"^{path}: prompt file: no prompts \(the table has no rows\)$"),
    "jsonl-missing-column": ("bad.jsonl", '{"prompt": "a cat"}\n{"text": "a dog"}\n', {}, ValueError,
                             r"^{path}: line 2: no column 'prompt' \(has \['text'\]\)$"),
    "jsonl-empty-line": ("bad.jsonl", '{"prompt": "a cat"}\n\n{"prompt": "a dog"}\n', {}, ValueError,
                         r"^{path}: line 2: empty line"),
    "jsonl-not-json": ("bad.jsonl", '{"prompt": "a cat"\n', {}, DamagedFileError, r"^{path}: prompt file: line 1 is not JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_PROMPT_FILES))
def test_bad_prompt_files_name_the_file_and_the_line(tmp_path, case):
    name, content, kwargs, error, message = BAD_PROMPT_FILES[case]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=message.format(path=path)):
        read_prompts(path, **kwargs)


def test_missing_prompt_file_or_reader_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.txt does not exist"):
        read_prompts(tmp_path / "nothing.txt")
    if not _has("pyarrow"):
        (tmp_path / "p.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            read_prompts(tmp_path / "p.parquet")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------- the command line


def test_cli_encodes_end_to_end_and_refuses_a_bad_config(flux_dir, flux_cache, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    config = tmp_path / "encode.toml"
    config.write_text(f'pipeline = "{flux_dir}"\nprompts = "prompts.txt"\nout = "cache"\nbatch_size = 4\n'
                      f'dtype = "float32"\nmax_sequence_length = {MSL}\n', encoding="utf-8")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = lambda *args: subprocess.run([sys.executable, "-m", "piflow_kernels", *args], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=300)  # fmt: skip
    done = run("encode-prompts", str(config), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "rank 0 of 1: 16 of 16 prompts cached in cache" in done.stdout
    cache, ref = PromptCache(tmp_path / "cache"), PromptCache(flux_cache)
    assert len(cache) == 16 and cache.index["settings"]["shard_size"] == prompt_cache.SHARD_SIZE
    for i in (0, 5, 15):  # other batches than the fixture's (16 prompts in 4 batches of 4, one shard): same values
        torch.testing.assert_close(cache[i], ref[i], rtol=1e-5, atol=1e-6)

    config.write_text(f'pipeline = "{flux_dir}"\nout = "cache"\nbatch = 4\n', encoding="utf-8")
    bad = run("encode-prompts", str(config))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "unknown key(s) ['batch']" in bad.stderr
    config.write_text(f'pipeline = "{flux_dir}"\nout = "cache"\n', encoding="utf-8")
    bad = run("encode-prompts", str(config))
    assert bad.returncode == 2 and "missing key(s) ['prompts']" in bad.stderr
    config.write_text(f'pipeline = "{flux_dir}"\nprompts = "none.txt"\nout = "cache"\n', encoding="utf-8")
    bad = run("encode-prompts", str(config))
    assert bad.returncode == 2 and "error: none.txt does not exist (prompt file)" in bad.stderr
