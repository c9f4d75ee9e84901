"""A cache of a teacher pipeline's prompt embeddings: encode once (text encoders only), read lazily while training.

    >>> from piflow_kernels.distill.prompts import read_prompts
    >>> encode_prompts("FLUX.1-dev/", read_prompts("prompts.txt"), "cache/", batch_size=16)   # one rank of torchrun
    >>> cache = PromptCache("cache/")
    >>> cache[3]["prompt_embeds"].shape                    # (L, D): T5 tokens of prompt 3
    >>> for batch in cache.iter_batches(8, seed=0, rank=0, world_size=1, epoch=0): ...

The embeddings are what the pipeline's own ``encode_prompt`` returns, row by row (FLUX.1: ``prompt_embeds``
(L, D) and ``pooled_prompt_embeds`` (P,); SD3: those and ``negative_*`` for classifier-free guidance;
Qwen-Image: ``prompt_embeds`` (L_i, D) and ``prompt_embeds_mask`` (L_i,), L_i the prompt's own length;
FLUX.2: ``prompt_embeds`` (L, D), the text encoder's layers 10, 20 and 30 side by side, padded to
``max_sequence_length``; Wan: ``prompt_embeds`` (L, D), the UMT5 states zero-padded past the prompt's tokens to
``max_sequence_length``). FLUX.1's ``text_ids`` are not stored: the pipeline makes them as zeros (L, 3), the same for
every prompt; nor are FLUX.2's, (0, 0, 0, l) for token l.

Layout of ``out_dir`` (see docs/prompt_cache.md)::

    part-00000-of-00002.json                      rank 0's index part, rewritten after each of its shards
    shard-00000-of-00002-00000.safetensors        rank 0's first shard: tensors "<prompt index>/<name>"
    shard-00001-of-00002-00000.safetensors
    ...
    index.json                                    the merged parts, written by the last rank to finish

Ranks never wait for each other: each writes only its own shards and part, and whichever rank finds every
part complete when it finishes writes ``index.json``; :class:`PromptCache` merges the parts itself when
``index.json`` is not there yet, so no barrier is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from piflow_kernels.distill import cache_files
from piflow_kernels.distill.cache_files import (
    CacheKind,
    ShardedCache,
    component_identity,
    dtype_keyword,
    dtype_name,
    items_sha256,
    open_rank,
    supported_pipeline,
    write_rank_shards,
)
from piflow_kernels.distill.prompts import Prompt
from piflow_kernels.files import read_json, require_file

__all__ = ["encode_prompts", "encoder_identity", "PromptCache", "FORMAT"]

PathLike = str | os.PathLike
FORMAT = "piflow-prompt-cache/1"
INDEX = cache_files.INDEX
SHARD_SIZE = 256  # prompts per shard: 1 GiB of FLUX.1 T5 embeddings (512 x 4096 bf16) per shard
_SUPPORTED = ("FluxPipeline", "StableDiffusion3Pipeline", "QwenImagePipeline", "Flux2Pipeline", "WanPipeline")
KIND = CacheKind(name="prompt cache", format=FORMAT, command="encode-prompts", identity_key="encoder",
                 identity_what="encoders", item="prompt", count_key="num_prompts", sha_key="prompts_sha256",
                 content_detail="text", salt="prompt-cache")  # fmt: skip


def _is_text_component(name: str) -> bool:
    return name.startswith("text_encoder") or name.startswith("tokenizer")


# ---------------------------------------------------------------------------- encoder identity


def encoder_identity(pipeline_dir: PathLike) -> dict[str, Any]:
    """What identifies the encoders of a diffusers folder: everything that can change an embedding.

    ``{"pipeline": class name, "components": {name: {"class": [library, class], "config": {...}, "files":
    {file: sha256}}}}`` for each text encoder and tokenizer named in ``model_index.json``: its class, its
    ``config.json`` without the keys that only record where or with which version it was saved, and the
    sha256 of every file in its folder (weights, tokenizer vocabularies). The dtype it is loaded in and
    ``max_sequence_length`` are recorded beside it, in the cache's settings.
    """
    root = Path(pipeline_dir)
    model_index = read_json(root / "model_index.json", "pipeline index")
    components: dict[str, Any] = {}
    for name in sorted(model_index):
        spec = model_index[name]
        if not _is_text_component(name) or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist (the {name} that {root / 'model_index.json'} names)")
        components[name] = component_identity(folder, spec, name)
    if not any(n.startswith("text_encoder") for n in components):
        raise ValueError(f"{root}: the pipeline has no text encoder (model_index.json names none)")
    return {"pipeline": model_index.get("_class_name"), "components": components}


def _prompts_sha256(prompts: Sequence[Prompt]) -> str:
    return items_sha256(prompts)


# ---------------------------------------------------------------------------- writing


def _as_prompts(prompts: Sequence[str | Prompt]) -> list[Prompt]:
    out = []
    for i, p in enumerate(prompts):
        p = Prompt(p) if isinstance(p, str) else Prompt(*p)
        if not isinstance(p.prompt, str) or not p.prompt.strip():
            raise ValueError(f"prompt {i} is empty")
        out.append(p)
    if not out:
        raise ValueError("no prompts to encode")
    return out


def _load_text_pipeline(pipeline_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The pipeline with only its text encoders and tokenizers (every other model component None)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise ImportError(
            "encoding prompts needs diffusers and transformers: pip install 'piflow_kernels[diffusers]' transformers"
        ) from None
    model_index = read_json(pipeline_dir / "model_index.json", "pipeline index")
    skip = {n: None for n, spec in model_index.items()
            if isinstance(spec, list) and not _is_text_component(n) and n != "scheduler"}  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), **skip, **{dtype_keyword(): dtype})
    names = [cls.__name__ for cls in type(pipe).__mro__]
    if not any(n in _SUPPORTED for n in names):
        raise ValueError(f"{pipeline_dir}: encoding prompts of a {type(pipe).__name__} is not supported ({_SUPPORTED})")
    pipe.set_progress_bar_config(disable=True)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return pipe


def _kind(pipe: Any) -> str:
    names = [cls.__name__ for cls in type(pipe).__mro__]
    return next(n for n in names if n in _SUPPORTED)


@torch.no_grad()
def _encode_batch(
    pipe: Any, batch: list[Prompt], negatives: bool, msl: int | None, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """One dict of tensors per prompt, each the prompt's row of what ``pipe.encode_prompt`` returns for the batch."""
    kind = _kind(pipe)
    texts = [p.prompt for p in batch]
    negs = [p.negative_prompt or "" for p in batch]
    extra = {} if msl is None else {"max_sequence_length": msl}
    out: dict[str, torch.Tensor] = {}
    if kind == "Flux2Pipeline":  # (prompt_embeds, text_ids); the ids are the same for every prompt
        out["prompt_embeds"], _ = pipe.encode_prompt(texts, device=device, **extra)
        if negatives:
            out["negative_prompt_embeds"], _ = pipe.encode_prompt(negs, device=device, **extra)
    elif kind == "WanPipeline":  # (prompt_embeds, negative_prompt_embeds), zero-padded to max_sequence_length
        pe, npe = pipe.encode_prompt(texts, negs if negatives else None, do_classifier_free_guidance=negatives,
                                     device=device, **extra)  # fmt: skip
        out = {"prompt_embeds": pe, **({"negative_prompt_embeds": npe} if negatives else {})}
    elif kind == "FluxPipeline":
        out["prompt_embeds"], out["pooled_prompt_embeds"], _ = pipe.encode_prompt(texts, None, device=device, **extra)
        if negatives:
            out["negative_prompt_embeds"], out["negative_pooled_prompt_embeds"], _ = pipe.encode_prompt(
                negs, None, device=device, **extra
            )
    elif kind == "StableDiffusion3Pipeline":
        pe, npe, pp, npp = pipe.encode_prompt(texts, None, None, device=device, do_classifier_free_guidance=negatives,
                                              negative_prompt=negs if negatives else None, **extra)  # fmt: skip
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
        if negatives:
            out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npp)
    else:  # QwenImagePipeline: embeddings padded to the batch's longest prompt; each row keeps its own length
        todo = [("prompt_embeds", "prompt_embeds_mask", texts)]
        if negatives:
            todo.append(("negative_prompt_embeds", "negative_prompt_embeds_mask", negs))
        rows: list[dict[str, torch.Tensor]] = [{} for _ in batch]
        for name, mask_name, strings in todo:
            embeds, mask = pipe.encode_prompt(strings, device=device, **extra)
            if mask is None:  # the pipeline drops an all-ones mask
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            for j, row in enumerate(rows):
                n = int(mask[j].sum())
                row[name] = embeds[j, :n].cpu().contiguous()
                row[mask_name] = mask[j, :n].cpu().contiguous()
        return rows
    return [{k: v[j].cpu().contiguous() for k, v in out.items()} for j in range(len(batch))]


def encode_prompts(
    pipeline_dir: PathLike,
    prompts: Sequence[str | Prompt],
    out_dir: PathLike,
    *,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype | str = torch.bfloat16,
    progress: bool = True,
    max_sequence_length: int | None = None,
    shard_size: int = SHARD_SIZE,
    negatives: bool | None = None,
    device: str | torch.device | None = None,
) -> Path:
    """Encode this rank's prompts (``i % world_size == rank``) with the pipeline's own ``encode_prompt``.

    Loads only the text encoders and tokenizers of the diffusers folder ``pipeline_dir`` (in ``dtype``, on
    ``device``: default ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU) and writes the rank's
    shards of ``shard_size`` prompts, each under a temporary name and renamed, then its index part with
    the shard's size and sha256. Run again, it keeps the shards whose size and sha256 match the part and
    encodes only the rest; a folder made by other encoders, from other prompts or with other settings
    (dtype, max_sequence_length, shard_size, negatives, world_size) is refused with a ValueError naming
    what differs. ``negatives`` (default: always for SD3, else where any prompt has a negative prompt)
    also stores the embeddings of the negative prompts ("" where a prompt has none).
    ``max_sequence_length`` None keeps the pipeline's default. Returns ``out_dir``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    root = Path(pipeline_dir)
    require_file(root / "model_index.json", "pipeline index")
    items = _as_prompts(prompts)
    dtype_str = dtype_name(dtype)
    supported_pipeline(root, _SUPPORTED, "encoding prompts")  # before hashing gigabytes of weights
    identity = encoder_identity(root)
    if negatives is None:
        negatives = identity["pipeline"] == "StableDiffusion3Pipeline" or any(p.negative_prompt is not None for p in items)
    header = {
        "format": FORMAT,
        "encoder": identity,
        "settings": {"dtype": dtype_str, "max_sequence_length": max_sequence_length, "shard_size": shard_size,
                     "negatives": bool(negatives)},  # fmt: skip
        "num_prompts": len(items),
        "prompts_sha256": _prompts_sha256(items),
    }
    out = open_rank(out_dir, KIND, header, world_size)

    pipe = None
    torch_dtype = getattr(torch, dtype_str)
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)

    def encode_chunk(chunk: list[int], bar: Any) -> dict[str, torch.Tensor]:
        nonlocal pipe
        if pipe is None:  # only once a shard is left to encode
            pipe = _load_text_pipeline(root, torch_dtype, device)
        tensors: dict[str, torch.Tensor] = {}
        for s in range(0, len(chunk), batch_size):
            idx = chunk[s : s + batch_size]
            rows = _encode_batch(pipe, [items[i] for i in idx], bool(negatives), max_sequence_length, device)
            for i, row in zip(idx, rows):
                for tname, t in row.items():
                    tensors[f"{i}/{tname}"] = t
            bar.update(len(idx))
        return tensors

    return write_rank_shards(out, KIND, header, items, encode_chunk, rank=rank, world_size=world_size,
                             shard_size=shard_size, progress=progress, desc=f"encoding prompts (rank {rank})")  # fmt: skip


# ---------------------------------------------------------------------------- reading


class PromptCache(ShardedCache):
    """Read-only access to an :func:`encode_prompts` folder, loading at most ``max_open_shards`` shards at a time.

    ``cache[i]`` is a dict of prompt ``i``'s tensors (FLUX.1: ``prompt_embeds`` (L, D) and
    ``pooled_prompt_embeds`` (P,)); ``cache.prompts[i]`` its :class:`Prompt`. A shard is checked when it is
    first opened: its size always, its sha256 too with ``verify`` (once per shard per process); a missing,
    truncated or altered shard raises an error naming its file. ``order`` and ``iter_batches`` (the seeded
    per-rank batch stream) are :class:`~piflow_kernels.distill.cache_files.ShardedCache`'s.
    """

    kind = KIND

    def __init__(self, out_dir: PathLike, *, max_open_shards: int = 2, verify: bool = True) -> None:
        super().__init__(out_dir, max_open_shards=max_open_shards, verify=verify)
        self._prompts: list[Prompt] = [Prompt(*p) for p in self._records]

    @property
    def prompts(self) -> list[Prompt]:
        return list(self._prompts)


_stack = cache_files.stack  # pads prompts of different lengths (Qwen-Image) as the pipeline pads a batch
