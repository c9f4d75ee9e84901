"""What the prompt cache and the latent cache share: sharded safetensors folders written rank by rank.

A cache folder holds, for rank ``r`` of ``W``, the shards ``shard-r-of-W-k.safetensors`` (tensors named
``"<item index>/<name>"``) and the index part ``part-r-of-W.json`` that records each shard's items, tensor
shapes, size and sha256; ``index.json`` is every part merged. Everything is written under a temporary
name and renamed, and a shard counts as written only once its part records it, so a killed run resumes
without duplicates or gaps. A :class:`CacheKind` says what a kind of cache calls its items, its format and
the identity of the model that made it; :func:`open_rank` / :func:`write_rank_shards` write one rank's
part, :func:`merge_parts` joins the parts and :class:`ShardedCache` reads the folder lazily.
See docs/prompt_cache.md and docs/latent_cache.md for the two formats built on this.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from piflow_kernels.files import DamagedFileError, load_safetensors, read_json, require_file, sha256_file

__all__ = [
    "CacheKind",
    "INDEX",
    "component_identity",
    "identity_differences",
    "supported_pipeline",
    "dtype_name",
    "dtype_keyword",
    "write_json_atomic",
    "open_rank",
    "write_rank_shards",
    "merge_parts",
    "ShardedCache",
    "stack",
]

PathLike = str | os.PathLike
INDEX = "index.json"
# keys of a config.json that say where or with which version it was saved, not what the model is
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash")


@dataclass(frozen=True)
class CacheKind:
    """The words and keys one kind of cache uses; the prompt cache's make the messages of docs/prompt_cache.md."""

    name: str  # "prompt cache": in every message and file description
    format: str  # the "format" of its index and shards
    command: str  # the command that writes it ("encode-prompts")
    identity_key: str  # header key of the model identity ("encoder")
    identity_what: str  # what that identity is, plural ("encoders")
    item: str  # one item ("prompt"); its plural names the shard entry's records ("prompts")
    count_key: str  # header key of the number of items ("num_prompts")
    sha_key: str  # header key of the sha256 of the item list ("prompts_sha256")
    content_detail: str  # what else differs between two lists of one length ("text")
    salt: str  # seeds the epoch order ("prompt-cache")

    @property
    def items(self) -> str:
        return self.item + "s"


# ---------------------------------------------------------------------------- identity


def component_identity(folder: Path, spec: Sequence[Any], what: str,
                       volatile: Sequence[str] = VOLATILE_CONFIG_KEYS) -> dict[str, Any]:  # fmt: skip
    """``{"class": [library, class], "config": {...}, "files": {file: sha256}}`` of one component folder.

    The config is the folder's ``config.json`` without the ``volatile`` keys (where or with which version it
    was saved); the files are every file in the folder, by sha256 (weights, vocabularies).
    """
    entry: dict[str, Any] = {"class": list(spec)}
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json", f"{what} config")
        entry["config"] = {k: v for k, v in sorted(config.items()) if k not in volatile}
    entry["files"] = {f.name: sha256_file(f, f"{what} file") for f in sorted(folder.iterdir()) if f.is_file()}
    return entry


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two ``{"pipeline": ..., "components": {name: component_identity}}``, in words."""
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


def supported_pipeline(pipeline_dir: Path, supported: Sequence[str], doing: str) -> str | None:
    """Which of ``supported`` the folder's pipeline class is (or derives from); None when diffusers is missing.

    A class that is none of them (or that this diffusers does not have) is a ValueError naming the folder.
    """
    name = read_json(pipeline_dir / "model_index.json", "pipeline index").get("_class_name")
    try:
        import diffusers
    except ImportError:
        return None  # the loader names the missing package
    cls = getattr(diffusers, str(name), None)
    found = [c.__name__ for c in cls.__mro__ if c.__name__ in supported] if isinstance(cls, type) else []
    if not found:
        raise ValueError(f"{pipeline_dir}: {doing} of a {name} is not supported (supported: {', '.join(supported)})")
    return found[0]


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def dtype_name(dtype: torch.dtype | str, key: str = "dtype") -> str:
    """``"bfloat16"`` for torch.bfloat16, "bfloat16", "bf16"; a ValueError naming ``key`` for a non-float dtype."""
    if isinstance(dtype, str):
        resolved = getattr(torch, _DTYPE_ALIASES.get(dtype, dtype), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"{key} must be a floating torch dtype such as 'bfloat16', got {dtype!r}")
        dtype = resolved
    return str(dtype).removeprefix("torch.")


def dtype_keyword() -> str:
    """The ``from_pretrained`` keyword of the dtype: diffusers renamed torch_dtype to dtype (the old name warns)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


# ---------------------------------------------------------------------------- writing


def part_name(rank: int, world_size: int) -> str:
    return f"part-{rank:05d}-of-{world_size:05d}.json"


def shard_name(rank: int, world_size: int, k: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}-{k:05d}.safetensors"


def write_json_atomic(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def items_sha256(records: Sequence[Sequence[Any]]) -> str:
    """The sha256 of the JSON list of the items' records (a prompt: [prompt, negative_prompt])."""
    return hashlib.sha256(json.dumps([list(r) for r in records], ensure_ascii=False).encode()).hexdigest()


def check_existing(out: Path, kind: CacheKind, header: dict[str, Any], world_size: int) -> None:
    """Refuse a folder holding a cache made by another model, from other items or with other settings."""
    for doc_path in sorted(out.glob("part-*-of-*.json")) + ([out / INDEX] if (out / INDEX).is_file() else []):
        doc = read_json(doc_path, f"{kind.name} index")
        if doc.get("format") != kind.format:
            raise ValueError(f"{out}: {doc_path.name} is not a {kind.name} index of format {kind.format!r}")
        what = []
        if doc.get(kind.sha_key) != header[kind.sha_key]:
            what.append(f"the {kind.item} list ({doc.get(kind.count_key)} {kind.items} there, {header[kind.count_key]} here, "
                        f"or the same number with other {kind.content_detail})")  # fmt: skip
        key = kind.identity_key
        what += [f"{key}: {d}" for d in identity_differences(doc.get(key, {}), header[key])]
        settings = doc.get("settings", {})
        what += [f"{k} {settings.get(k)!r} vs {v!r}" for k, v in header["settings"].items() if settings.get(k) != v]
        if doc.get("world_size") != world_size:
            what.append(f"world_size {doc.get('world_size')} vs {world_size} (resume with the same number of processes)")
        if what:
            raise ValueError(f"{out} holds a different {kind.name} ({doc_path.name}); it differs in: " + "; ".join(what)
                             + ". Use a new folder or delete this one")  # fmt: skip


def open_rank(out_dir: PathLike, kind: CacheKind, header: dict[str, Any], world_size: int) -> Path:
    """Create ``out_dir`` if needed and refuse it when it holds another cache (:func:`check_existing`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_existing(out, kind, header, world_size)
    return out


def _shard_is_complete(out: Path, entry: dict[str, Any], kind: CacheKind) -> bool:
    path = out / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["size"]:
        return False
    return sha256_file(path, f"{kind.name} shard") == entry["sha256"]


def tensor_specs(tensors: dict[str, torch.Tensor], chunk: Sequence[int]) -> dict[str, dict[str, Any]]:
    """``{name: {"shape": [...], "dtype": ...}}`` of a shard's ``"<index>/<name>"`` tensors.

    A dimension that differs between the items (Qwen-Image's prompt lengths) is None; the dtype is the
    first item's.
    """
    shapes: dict[str, list[int | None]] = {}
    for key, t in tensors.items():
        name = key.split("/", 1)[1]
        shape = list(t.shape)
        old = shapes.get(name, shape)
        shapes[name] = [a if a == b else None for a, b in zip(old, shape)]
    dtypes = {n: str(tensors[f"{chunk[0]}/{n}"].dtype).removeprefix("torch.") for n in shapes}
    return {n: {"shape": shapes[n], "dtype": dtypes[n]} for n in sorted(shapes)}


def write_rank_shards(
    out: Path,
    kind: CacheKind,
    header: dict[str, Any],
    records: Sequence[Sequence[Any]],
    encode_chunk: Callable[[list[int], Any], dict[str, torch.Tensor]],
    *,
    rank: int,
    world_size: int,
    shard_size: int,
    progress: bool,
    desc: str,
) -> Path:
    """Write rank ``rank``'s shards of the items ``i % world_size == rank``, its part, and the index if all are done.

    ``encode_chunk(indices, bar)`` returns the tensors ``"<index>/<name>"`` of one shard's items (and
    advances the tqdm ``bar`` by the items it encodes); it is called only for the shards not already
    written, so a complete folder loads no model. ``records[i]`` is item ``i``'s JSON record in the
    shard entry (a prompt: [prompt, negative_prompt]).
    """
    part_path = out / part_name(rank, world_size)
    # leftovers of a killed run of this rank: only this rank writes these names
    for stale in (*out.glob(f"shard-{rank:05d}-of-{world_size:05d}-*.tmp*"), *out.glob(part_path.name + ".tmp*")):
        stale.unlink(missing_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if part_path.is_file():
        for entry in read_json(part_path, f"{kind.name} index").get("shards", []):
            if _shard_is_complete(out, entry, kind):
                done[entry["file"]] = entry
    mine = list(range(rank, header[kind.count_key], world_size))
    chunks = [mine[s : s + shard_size] for s in range(0, len(mine), shard_size)]
    part = {**header, "world_size": world_size, "rank": rank, "complete": False, "shards": []}
    todo = sum(len(c) for k, c in enumerate(chunks) if shard_name(rank, world_size, k) not in done)
    if todo:  # an index from an earlier complete run would claim shards that are about to be rewritten
        (out / INDEX).unlink(missing_ok=True)

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    with tqdm(total=todo, desc=desc, unit=kind.item, disable=not progress or todo == 0) as bar:
        for k, chunk in enumerate(chunks):
            name = shard_name(rank, world_size, k)
            if name in done:
                part["shards"].append(done[name])
                continue
            tensors = encode_chunk(chunk, bar)
            path = out / name
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            save_file(tensors, str(tmp), metadata={"format": kind.format})
            os.replace(tmp, path)
            entry = {"file": name, "indices": chunk, kind.items: [list(records[i]) for i in chunk],
                     "tensors": tensor_specs(tensors, chunk), "size": path.stat().st_size,
                     "sha256": sha256_file(path, f"{kind.name} shard")}  # fmt: skip
            part["shards"].append(entry)
            write_json_atomic(part_path, part)  # the shard counts as written only once its part says so
    part["complete"] = True
    write_json_atomic(part_path, part)
    try_write_index(out, kind, world_size)
    return out


def merge_parts(out: Path, kind: CacheKind, world_size: int | None = None) -> dict[str, Any]:
    """The parts of every rank merged into one index; a ValueError when a part is missing or unfinished."""
    parts = sorted(out.glob("part-*-of-*.json"))
    if not parts:
        raise FileNotFoundError(f"{out} holds no {kind.name} ({INDEX} and part-*.json are missing)")
    docs = [read_json(p, f"{kind.name} index") for p in parts]
    world_size = docs[0].get("world_size") if world_size is None else world_size
    by_rank = {d.get("rank"): (p, d) for p, d in zip(parts, docs) if d.get("world_size") == world_size}
    missing = [r for r in range(world_size) if r not in by_rank]
    unfinished = [r for r, (_, d) in by_rank.items() if not d.get("complete")]
    if missing or unfinished:
        what = ([f"no part of rank(s) {missing}"] if missing else []) + (
            [f"rank(s) {sorted(unfinished)} unfinished"] if unfinished else []
        )
        raise ValueError(f"{out}: incomplete {kind.name}: {'; '.join(what)} (run {kind.command} again with the same settings)")
    first = by_rank[0][1]
    for p, d in by_rank.values():
        if d.get(kind.sha_key) != first.get(kind.sha_key) or d.get(kind.identity_key) != first.get(kind.identity_key) \
                or d.get("settings") != first.get("settings"):  # fmt: skip
            other = f"other {kind.items} or {kind.identity_what}"
            raise ValueError(f"{out}: {p.name} was made from {other} than {by_rank[0][0].name}")
    shards = [s for r in range(world_size) for s in by_rank[r][1]["shards"]]
    keep = ("format", kind.identity_key, "settings", kind.count_key, kind.sha_key)
    return {**{k: first[k] for k in keep}, "world_size": world_size, "shards": shards}


def try_write_index(out: Path, kind: CacheKind, world_size: int) -> None:
    try:
        index = merge_parts(out, kind, world_size)
    except ValueError:  # another rank is still encoding; it writes the index when it finishes
        return
    write_json_atomic(out / INDEX, index)


# ---------------------------------------------------------------------------- reading


class ShardedCache:
    """Read-only access to a cache folder of kind :attr:`kind`, loading at most ``max_open_shards`` shards at a time.

    ``cache[i]`` is a dict of item ``i``'s tensors. A shard is checked when it is first opened: its size
    always, its sha256 too with ``verify`` (once per shard per process); a missing, truncated or altered
    shard raises an error naming its file. ``self._records[i]`` is item ``i``'s record from the index.
    """

    kind: CacheKind  # set by each kind of cache

    def __init__(self, out_dir: PathLike, *, max_open_shards: int = 2, verify: bool = True) -> None:
        kind = self.kind
        self.root = Path(out_dir)
        if (self.root / INDEX).is_file():
            self.index = read_json(self.root / INDEX, f"{kind.name} index")
        else:
            self.index = merge_parts(self.root, kind)
        if self.index.get("format") != kind.format:
            raise ValueError(f"{self.root / INDEX}: not a {kind.name} index of format {kind.format!r}")
        self.max_open_shards = max(1, int(max_open_shards))
        self.verify = verify
        n = int(self.index[kind.count_key])
        self._where: list[tuple[int, int] | None] = [None] * n  # item -> (shard, position in shard)
        self._records: list[Any] = [None] * n
        duplicates = []
        for s, shard in enumerate(self.index["shards"]):
            for j, (i, r) in enumerate(zip(shard["indices"], shard[kind.items])):
                if not 0 <= i < n or self._where[i] is not None:
                    duplicates.append(i)
                    continue
                self._where[i], self._records[i] = (s, j), r
        gaps = [i for i, w in enumerate(self._where) if w is None]
        if duplicates or gaps:
            raise ValueError(f"{self.root}: {kind.name} index is inconsistent: {kind.items} {duplicates[:10]} appear twice "
                             f"or out of range, {kind.items} {gaps[:10]} are in no shard")  # fmt: skip
        self.names: list[str] = sorted(self.index["shards"][0]["tensors"]) if self.index["shards"] else []
        self._open: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return len(self._where)

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        what = f"{self.kind.name} shard"
        entry = self.index["shards"][s]
        path = require_file(self.root / entry["file"], what)
        size = path.stat().st_size
        if size != entry["size"]:
            raise DamagedFileError(path, f"{what}: {size} bytes, the index records {entry['size']}")
        if self.verify and s not in self._verified:
            if sha256_file(path, what) != entry["sha256"]:
                raise DamagedFileError(path, f"{what}: its sha256 differs from the one the index records")
            self._verified.add(s)
        tensors = load_safetensors(path, what)
        self._open[s] = tensors
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return tensors

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.kind.item} {i} out of range (the cache holds {len(self)})")
        i = i % len(self)
        s, _ = self._where[i]  # type: ignore[misc]
        tensors = self._shard(s)
        return {name: tensors[f"{i}/{name}"] for name in self.index["shards"][s]["tensors"]}

    def order(self, seed: int, epoch: int = 0) -> list[int]:
        """Epoch ``epoch``'s seeded permutation of all items, shuffled shard-group by shard-group.

        The shards are permuted, then taken ``max_open_shards`` at a time and the items of each group
        permuted together: every shard is read once per epoch per rank while a batch still mixes items
        from several shards of the group.
        """
        digest = hashlib.sha256(f"{self.kind.salt}:{seed}:{epoch}".encode()).digest()
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
        items) and rank ``r`` takes every ``world_size``-th item from position ``r``: the ranks' items are
        disjoint and together cover the cut order. Tensors whose length differs between items (Qwen-Image's
        ``prompt_embeds`` (L_i, D) and masks (L_i,)) are padded with zeros at the end of dim 0, the way the
        pipeline pads a batch. With ``drop_last`` a last batch smaller than ``batch_size`` is left out.
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
            batch = {name: stack([r[name] for r in rows]) for name in rows[0]}
            batch["index"] = torch.tensor(idx, dtype=torch.long)
            yield batch


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, first padding tensors of different lengths (dim 0) with zeros at the end."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    longest = max(t.shape[0] for t in tensors)
    return torch.stack([torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))]) for t in tensors])
