"""A cache of a teacher pipeline's prompt embeddings: encode once (text encoders only), read lazily while training.

    >>> from piflow_kernels.distill.prompts import read_prompts
    >>> encode_prompts("FLUX.1-dev/", read_prompts("prompts.txt"), "cache/", batch_size=16)   # one rank of torchrun
    >>> cache = PromptCache("cache/")
    >>> cache[3]["prompt_embeds"].shape                    # (L, D): T5 tokens of prompt 3
    >>> for batch in cache.iter_batches(8, seed=0, rank=0, world_size=1, epoch=0): ...

The embeddings are what the pipeline's own ``encode_prompt`` returns, row by row (FLUX.1: ``prompt_embeds``
(L, D) and ``pooled_prompt_embeds`` (P,); SD3: those and ``negative_*`` for classifier-free guidance;
Qwen-Image: ``prompt_embeds`` (L_i, D) and ``prompt_embeds_mask`` (L_i,), L_i the prompt's own length).
FLUX.1's ``text_ids`` are not stored: the pipeline makes them as zeros (L, 3), the same for every prompt.

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

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from piflow_kernels.distill.prompts import Prompt
from piflow_kernels.files import DamagedFileError, load_safetensors, read_json, require_file, sha256_file

__all__ = ["encode_prompts", "encoder_identity", "PromptCache", "FORMAT"]

PathLike = str | os.PathLike
FORMAT = "piflow-prompt-cache/1"
INDEX = "index.json"
SHARD_SIZE = 256  # prompts per shard: 1 GiB of FLUX.1 T5 embeddings (512 x 4096 bf16) per shard
# keys of a transformers config.json that say where or with which version it was saved, not what the model is
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash")
_SUPPORTED = ("FluxPipeline", "StableDiffusion3Pipeline", "QwenImagePipeline")


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
        entry: dict[str, Any] = {"class": list(spec)}
        if (folder / "config.json").is_file():
            config = read_json(folder / "config.json", f"{name} config")
            entry["config"] = {k: v for k, v in sorted(config.items()) if k not in _VOLATILE_CONFIG_KEYS}
        entry["files"] = {f.name: sha256_file(f, f"{name} file") for f in sorted(folder.iterdir()) if f.is_file()}
        components[name] = entry
    if not any(n.startswith("text_encoder") for n in components):
        raise ValueError(f"{root}: the pipeline has no text encoder (model_index.json names none)")
    return {"pipeline": model_index.get("_class_name"), "components": components}


def _identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    if old.get("pipeline") != new.get("pipeline"):
        return [f"pipeline class {old.get('pipeline')} vs {new.get('pipeline')}"]
    out = []
    a, b = old.get("components", {}), new.get("components", {})
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            out.append(f"{name} {'missing' if name not in b else 'added'}")
            continue
        if a[name].get("class") != b[name].get("class"):
            out.append(f"{name} class {a[name].get('class')} vs {b[name].get('class')}")
        ca, cb = a[name].get("config", {}), b[name].get("config", {})
        keys = [k for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
        if keys:
            out.append(f"{name} config ({', '.join(keys)})")
        fa, fb = a[name].get("files", {}), b[name].get("files", {})
        files = [f for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)]
        if files:
            out.append(f"{name} weights/files ({', '.join(files)} differ by sha256)")
    return out


def _prompts_sha256(prompts: Sequence[Prompt]) -> str:
    return hashlib.sha256(json.dumps([list(p) for p in prompts], ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------------------- writing


def _part_name(rank: int, world_size: int) -> str:
    return f"part-{rank:05d}-of-{world_size:05d}.json"


def _shard_name(rank: int, world_size: int, k: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}-{k:05d}.safetensors"


def _write_json_atomic(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        resolved = getattr(torch, _DTYPE_ALIASES.get(dtype, dtype), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype such as 'bfloat16', got {dtype!r}")
        dtype = resolved
    return str(dtype).removeprefix("torch.")


def _check_existing(out: Path, header: dict[str, Any], world_size: int) -> None:
    """Refuse a folder holding a cache made by other encoders, from other prompts or with other settings."""
    for doc_path in sorted(out.glob("part-*-of-*.json")) + ([out / INDEX] if (out / INDEX).is_file() else []):
        doc = read_json(doc_path, "prompt cache index")
        if doc.get("format") != FORMAT:
            raise ValueError(f"{out}: {doc_path.name} is not a prompt cache index of format {FORMAT!r}")
        what = []
        if doc.get("prompts_sha256") != header["prompts_sha256"]:
            what.append(f"the prompt list ({doc.get('num_prompts')} prompts there, {header['num_prompts']} here, "
                        "or the same number with other text)")  # fmt: skip
        what += [f"encoder: {d}" for d in _identity_differences(doc.get("encoder", {}), header["encoder"])]
        settings = doc.get("settings", {})
        what += [f"{k} {settings.get(k)!r} vs {v!r}" for k, v in header["settings"].items() if settings.get(k) != v]
        if doc.get("world_size") != world_size:
            what.append(f"world_size {doc.get('world_size')} vs {world_size} (resume with the same number of processes)")
        if what:
            raise ValueError(f"{out} holds a different prompt cache ({doc_path.name}); it differs in: " + "; ".join(what)
                             + ". Use a new folder or delete this one")  # fmt: skip


def _shard_is_complete(out: Path, entry: dict[str, Any]) -> bool:
    path = out / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["size"]:
        return False
    return sha256_file(path, "prompt cache shard") == entry["sha256"]


def _check_pipeline_class(pipeline_dir: Path) -> None:
    name = read_json(pipeline_dir / "model_index.json", "pipeline index").get("_class_name")
    try:
        import diffusers
    except ImportError:
        return  # _load_text_pipeline names the missing package
    cls = getattr(diffusers, str(name), None)
    if not isinstance(cls, type) or not any(c.__name__ in _SUPPORTED for c in cls.__mro__):
        raise ValueError(f"{pipeline_dir}: encoding prompts of a {name} is not supported (supported: {', '.join(_SUPPORTED)})")


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
    # diffusers renamed torch_dtype to dtype (the old name warns); older releases know only torch_dtype
    from diffusers.utils import deprecation_utils

    key = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), **skip, **{key: dtype})
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
    if kind == "FluxPipeline":
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
    dtype_name = _dtype_name(dtype)
    _check_pipeline_class(root)  # before hashing gigabytes of weights
    identity = encoder_identity(root)
    if negatives is None:
        negatives = identity["pipeline"] == "StableDiffusion3Pipeline" or any(p.negative_prompt is not None for p in items)
    header = {
        "format": FORMAT,
        "encoder": identity,
        "settings": {"dtype": dtype_name, "max_sequence_length": max_sequence_length, "shard_size": shard_size,
                     "negatives": bool(negatives)},  # fmt: skip
        "num_prompts": len(items),
        "prompts_sha256": _prompts_sha256(items),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_existing(out, header, world_size)

    part_path = out / _part_name(rank, world_size)
    # leftovers of a killed run of this rank: only this rank writes these names
    for stale in (*out.glob(f"shard-{rank:05d}-of-{world_size:05d}-*.tmp*"), *out.glob(part_path.name + ".tmp*")):
        stale.unlink(missing_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if part_path.is_file():
        for entry in read_json(part_path, "prompt cache index").get("shards", []):
            if _shard_is_complete(out, entry):
                done[entry["file"]] = entry
    mine = list(range(rank, len(items), world_size))
    chunks = [mine[s : s + shard_size] for s in range(0, len(mine), shard_size)]
    part = {**header, "world_size": world_size, "rank": rank, "complete": False, "shards": []}
    todo = sum(len(c) for k, c in enumerate(chunks) if _shard_name(rank, world_size, k) not in done)
    if todo:  # an index from an earlier complete run would claim shards that are about to be rewritten
        (out / INDEX).unlink(missing_ok=True)

    pipe = None
    torch_dtype = getattr(torch, dtype_name)
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    from tqdm.auto import tqdm

    with tqdm(total=todo, desc=f"encoding prompts (rank {rank})", unit="prompt", disable=not progress or todo == 0) as bar:
        for k, chunk in enumerate(chunks):
            name = _shard_name(rank, world_size, k)
            if name in done:
                part["shards"].append(done[name])
                continue
            if pipe is None:
                pipe = _load_text_pipeline(root, torch_dtype, device)
            tensors: dict[str, torch.Tensor] = {}
            shapes: dict[str, Any] = {}
            for s in range(0, len(chunk), batch_size):
                idx = chunk[s : s + batch_size]
                rows = _encode_batch(pipe, [items[i] for i in idx], bool(negatives), max_sequence_length, device)
                for i, row in zip(idx, rows):
                    for tname, t in row.items():
                        tensors[f"{i}/{tname}"] = t
                        shape = list(t.shape)
                        # a dimension that differs between prompts (Qwen-Image's lengths) is recorded as null
                        old = shapes.get(tname, shape)
                        shapes[tname] = [a if a == b else None for a, b in zip(old, shape)]
                bar.update(len(idx))
            dtypes = {n: str(tensors[f"{chunk[0]}/{n}"].dtype).removeprefix("torch.") for n in shapes}
            path = out / name
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"format": FORMAT})
            os.replace(tmp, path)
            entry = {"file": name, "indices": chunk, "prompts": [list(items[i]) for i in chunk],
                     "tensors": {n: {"shape": shapes[n], "dtype": dtypes[n]} for n in sorted(shapes)},
                     "size": path.stat().st_size, "sha256": sha256_file(path, "prompt cache shard")}  # fmt: skip
            part["shards"].append(entry)
            _write_json_atomic(part_path, part)  # the shard counts as written only once its part says so
    part["complete"] = True
    _write_json_atomic(part_path, part)
    _try_write_index(out, world_size)
    return out


def _merge_parts(out: Path, world_size: int | None = None) -> dict[str, Any]:
    """The parts of every rank merged into one index; a ValueError when a part is missing or unfinished."""
    parts = sorted(out.glob("part-*-of-*.json"))
    if not parts:
        raise FileNotFoundError(f"{out} holds no prompt cache ({INDEX} and part-*.json are missing)")
    docs = [read_json(p, "prompt cache index") for p in parts]
    world_size = docs[0].get("world_size") if world_size is None else world_size
    by_rank = {d.get("rank"): (p, d) for p, d in zip(parts, docs) if d.get("world_size") == world_size}
    missing = [r for r in range(world_size) if r not in by_rank]
    unfinished = [r for r, (_, d) in by_rank.items() if not d.get("complete")]
    if missing or unfinished:
        what = ([f"no part of rank(s) {missing}"] if missing else []) + (
            [f"rank(s) {sorted(unfinished)} unfinished"] if unfinished else []
        )
        raise ValueError(f"{out}: incomplete prompt cache: {'; '.join(what)} (run encode-prompts again with the same settings)")
    first = by_rank[0][1]
    for p, d in by_rank.values():
        if d.get("prompts_sha256") != first.get("prompts_sha256") or d.get("encoder") != first.get("encoder") \
                or d.get("settings") != first.get("settings"):  # fmt: skip
            raise ValueError(f"{out}: {p.name} was made from other prompts or encoders than {by_rank[0][0].name}")
    shards = [s for r in range(world_size) for s in by_rank[r][1]["shards"]]
    keep = ("format", "encoder", "settings", "num_prompts", "prompts_sha256")
    return {**{k: first[k] for k in keep}, "world_size": world_size, "shards": shards}


def _try_write_index(out: Path, world_size: int) -> None:
    try:
        index = _merge_parts(out, world_size)
    except ValueError:  # another rank is still encoding; it writes the index when it finishes
        return
    _write_json_atomic(out / INDEX, index)


# ---------------------------------------------------------------------------- reading


class PromptCache:
    """Read-only access to an :func:`encode_prompts` folder, loading at most ``max_open_shards`` shards at a time.

    ``cache[i]`` is a dict of prompt ``i``'s tensors (FLUX.1: ``prompt_embeds`` (L, D) and
    ``pooled_prompt_embeds`` (P,)); ``cache.prompts[i]`` its :class:`Prompt`. A shard is checked when it is
    first opened: its size always, its sha256 too with ``verify`` (once per shard per process); a missing,
    truncated or altered shard raises an error naming its file.
    """

    def __init__(self, out_dir: PathLike, *, max_open_shards: int = 2, verify: bool = True) -> None:
        self.root = Path(out_dir)
        if (self.root / INDEX).is_file():
            self.index = read_json(self.root / INDEX, "prompt cache index")
        else:
            self.index = _merge_parts(self.root)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{self.root / INDEX}: not a prompt cache index of format {FORMAT!r}")
        self.max_open_shards = max(1, int(max_open_shards))
        self.verify = verify
        n = int(self.index["num_prompts"])
        self._where: list[tuple[int, int] | None] = [None] * n  # prompt -> (shard, position in shard)
        self._prompts: list[Prompt | None] = [None] * n
        duplicates = []
        for s, shard in enumerate(self.index["shards"]):
            for j, (i, p) in enumerate(zip(shard["indices"], shard["prompts"])):
                if not 0 <= i < n or self._where[i] is not None:
                    duplicates.append(i)
                    continue
                self._where[i], self._prompts[i] = (s, j), Prompt(*p)
        gaps = [i for i, w in enumerate(self._where) if w is None]
        if duplicates or gaps:
            raise ValueError(f"{self.root}: prompt cache index is inconsistent: prompts {duplicates[:10]} appear twice "
                             f"or out of range, prompts {gaps[:10]} are in no shard")  # fmt: skip
        self.names: list[str] = sorted(self.index["shards"][0]["tensors"]) if self.index["shards"] else []
        self._open: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return len(self._where)

    @property
    def prompts(self) -> list[Prompt]:
        return list(self._prompts)  # type: ignore[arg-type]

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        entry = self.index["shards"][s]
        path = require_file(self.root / entry["file"], "prompt cache shard")
        size = path.stat().st_size
        if size != entry["size"]:
            raise DamagedFileError(path, f"prompt cache shard: {size} bytes, the index records {entry['size']}")
        if self.verify and s not in self._verified:
            if sha256_file(path, "prompt cache shard") != entry["sha256"]:
                raise DamagedFileError(path, "prompt cache shard: its sha256 differs from the one the index records")
            self._verified.add(s)
        tensors = load_safetensors(path, "prompt cache shard")
        self._open[s] = tensors
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return tensors

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"prompt {i} out of range (the cache holds {len(self)})")
        i = i % len(self)
        s, _ = self._where[i]  # type: ignore[misc]
        tensors = self._shard(s)
        return {name: tensors[f"{i}/{name}"] for name in self.index["shards"][s]["tensors"]}

    def order(self, seed: int, epoch: int = 0) -> list[int]:
        """Epoch ``epoch``'s seeded permutation of all prompts, shuffled shard-group by shard-group.

        The shards are permuted, then taken ``max_open_shards`` at a time and the prompts of each group
        permuted together: every shard is read once per epoch per rank while a batch still mixes prompts
        from several shards of the group.
        """
        digest = hashlib.sha256(f"prompt-cache:{seed}:{epoch}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        shards = self.index["shards"]
        shard_order = torch.randperm(len(shards), generator=g).tolist()
        out: list[int] = []
        for start in range(0, len(shard_order), self.max_open_shards):
            group = [i for s in shard_order[start : start + self.max_open_shards] for i in shards[s]["indices"]]
            out += [group[j] for j in torch.randperm(len(group), generator=g).tolist()]
        return out

    def iter_batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, epoch: int = 0,
                     drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
        """Rank ``rank``'s batches of epoch ``epoch``: dicts of stacked tensors (B, ...) plus ``index`` (B,).

        The epoch's :meth:`order` is cut to a multiple of ``world_size`` (every rank gets the same number of
        prompts) and rank ``r`` takes every ``world_size``-th prompt from position ``r``: the ranks' prompts
        are disjoint and together cover the cut order. Tensors whose length differs between prompts
        (Qwen-Image's ``prompt_embeds`` (L_i, D) and masks (L_i,)) are padded with zeros at the end of dim 0,
        the way the pipeline pads a batch. With ``drop_last`` a last batch smaller than ``batch_size`` is left out.
        """
        if world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        order = self.order(seed, epoch)
        order = order[: len(order) // world_size * world_size][rank::world_size]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            rows = [self[i] for i in idx]
            batch = {name: _stack([r[name] for r in rows]) for name in rows[0]}
            batch["index"] = torch.tensor(idx, dtype=torch.long)
            yield batch


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    longest = max(t.shape[0] for t in tensors)
    return torch.stack([torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))]) for t in tensors])
