"""A cache of image latents for data-dependent pi-ID: encode once (the VAE only), read lazily while training.

    >>> encode_images("FLUX.1-dev/", "photos/", "cache/latents", resolution=1024)   # one rank of torchrun
    >>> cache = LatentCache("cache/latents")
    >>> cache[3]["latents"].shape            # (16, 128, 128): image 3 as FLUX.1's transformer sees it (unpacked)
    >>> cache.prompts[3]                     # its caption; cache/latents/captions.jsonl holds them all for encode-prompts
    >>> cache.check_aligned(PromptCache("cache/prompts"))   # the prompt cache encodes exactly those captions

The images come from an image folder (png / jpg / jpeg / webp, in the order of their relative paths;
captions from the Hugging Face imagefolder ``metadata.jsonl`` / ``metadata.csv`` or a ``<stem>.txt``
beside each image) or a ``datasets.save_to_disk`` folder. Each is resized and center-cropped to
``resolution`` by diffusers' ``VaeImageProcessor``, encoded by the pipeline's VAE (the mean of the latent
distribution, or a seeded sample) and normalised the way the pipeline's transformer sees latents:
FLUX.1 / SD3 ``(z - shift_factor) * scaling_factor``, Qwen-Image ``(z - latents_mean) / latents_std``
with its frame axis of 1 dropped, FLUX.2 by its VAE's batch-norm statistics over the 2x2-patchified channels
(then unpatchified: the library's image layout). The folder has the prompt cache's layout (see docs/latent_cache.md):
per-rank safetensors shards of tensors ``"<image index>/latents"`` (C, H, W), per-rank index parts and
the merged ``index.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from piflow_kernels.distill import cache_files
from piflow_kernels.distill.cache_files import (
    VOLATILE_CONFIG_KEYS,
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
from piflow_kernels.files import DamagedFileError, read_json, read_text, require_file

__all__ = ["encode_images", "read_images", "ImageSource", "LatentCache", "vae_identity", "image_seed", "FORMAT", "CAPTIONS"]

PathLike = str | os.PathLike
FORMAT = "piflow-latent-cache/1"
INDEX = cache_files.INDEX
CAPTIONS = "captions.jsonl"
SHARD_SIZE = 1024  # images per shard: 512 MiB of FLUX.1 latents at 1024 px (16 x 128 x 128 bf16)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA = ("metadata.jsonl", "metadata.csv")
# the VAE class each pipeline's transformer was trained on
_VAE_CLASS = {"FluxPipeline": "AutoencoderKL", "StableDiffusion3Pipeline": "AutoencoderKL",
              "QwenImagePipeline": "AutoencoderKLQwenImage", "Flux2Pipeline": "AutoencoderKLFlux2"}  # fmt: skip
# a diffusers config.json also records the diffusers version it was saved with
_VOLATILE_VAE_KEYS = (*VOLATILE_CONFIG_KEYS, "_diffusers_version")
KIND = CacheKind(name="latent cache", format=FORMAT, command="encode-images", identity_key="vae", identity_what="VAEs",
                 item="image", count_key="num_images", sha_key="images_sha256", content_detail="names or captions",
                 salt="latent-cache")  # fmt: skip


# ---------------------------------------------------------------------------- image sources


class ImageSource:
    """Images with their captions, in order: ``names[i]`` (a relative path, or ``"row i"`` of a dataset),
    ``captions[i]``, and ``open(i)``, the image as an RGB PIL image with its EXIF orientation applied."""

    def __init__(self, root: Path, names: list[str], captions: list[str], opener: Callable[[int], Any]) -> None:
        self.root, self.names, self.captions, self._opener = root, names, captions, opener

    def __len__(self) -> int:
        return len(self.names)

    def open(self, i: int) -> Any:
        return self._opener(i)

    @property
    def records(self) -> list[list[str]]:
        """``[name, caption]`` per image: what the index records and what identifies the list."""
        return [[n, c] for n, c in zip(self.names, self.captions)]


def read_images(path: PathLike, caption_column: str = "prompt", image_column: str = "image") -> ImageSource:
    """The images and captions of an image folder or of a local ``datasets.save_to_disk`` folder.

    An image folder: every ``.png`` / ``.jpg`` / ``.jpeg`` / ``.webp`` file under ``path`` (not in hidden
    folders), ordered by relative path. An image's caption is the ``caption_column`` of its row in a
    ``metadata.jsonl`` or ``metadata.csv`` (the Hugging Face imagefolder convention: a ``file_name``
    column, relative to the metadata file's folder), else the text of ``<stem>.txt`` beside it. A dataset
    folder: the ``image_column`` (a ``datasets.Image`` column) and ``caption_column`` of each row, in row
    order. Captions are stripped of surrounding whitespace (as ``read_prompts`` reads them back) and must
    not be empty. An empty folder, a caption that is missing or empty, or a metadata row naming no image
    of the folder is a ValueError naming the file.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist (image folder)")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not an image folder or a datasets.save_to_disk folder")
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        return _dataset_source(root, image_column, caption_column)
    return _folder_source(root, caption_column)


def _caption(text: Any, where: str, image: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{where}: the caption of {image} is {type(text).__name__}, not a string")
    if not text.strip():
        raise ValueError(f"{where}: empty caption for {image}")
    return text.strip()


def _metadata_rows(path: Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    # the json and csv modules directly: datasets' imagefolder builder would first copy every image into
    # its Arrow cache under ~/.cache, does not read <stem>.txt captions and does not name a bad row's line
    text = read_text(path, "image metadata")
    if path.suffix == ".csv":
        try:
            return "row", list(enumerate(csv.DictReader(io.StringIO(text, newline="")), 2))  # row 1 is the header
        except csv.Error as err:
            raise DamagedFileError(path, "image metadata: not a readable CSV table", err) from err
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DamagedFileError(path, f"image metadata: line {number} is not JSON", err) from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return "line", rows


def _folder_source(root: Path, caption_column: str) -> ImageSource:
    images: list[str] = []
    metadata: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlinked folder reached twice (or a link loop): read it once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        found = [folder / m for m in METADATA if m in filenames]
        if len(found) > 1:
            raise ValueError(f"{folder}: both metadata.jsonl and metadata.csv (keep one)")
        metadata += found
        rel = folder.relative_to(root)
        images += [(rel / f).as_posix() for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    images.sort()
    if not images:
        raise ValueError(f"{root}: no images (files ending in {', '.join(IMAGE_SUFFIXES)})")
    listed: dict[str, tuple[Any, str]] = {}  # relative path -> (caption, "file: line n")
    have = set(images)
    for meta in sorted(metadata):
        where, rows = _metadata_rows(meta)
        base = meta.parent.relative_to(root)
        for number, row in rows:
            at = f"{meta}: {where} {number}"
            name = row.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{at}: no file_name (has {sorted(row)})")
            rel = Path(os.path.normpath(base / name)).as_posix()
            if rel not in have:
                raise ValueError(f"{at}: file_name {name!r} is not an image of {root}")
            if rel in listed:
                raise ValueError(f"{at}: {name!r} already has a caption ({listed[rel][1]})")
            if caption_column not in row:
                raise ValueError(f"{at}: no caption for {name!r}: no column {caption_column!r} (has {sorted(row)})")
            listed[rel] = (row[caption_column], at)
    captions = []
    for rel in images:
        if rel in listed:
            text, at = listed[rel]
        else:
            sidecar = (root / rel).with_suffix(".txt")
            if not sidecar.is_file():
                where = f"not in {', '.join(str(m) for m in metadata)}" if metadata else "no metadata.jsonl or metadata.csv"
                raise ValueError(f"{root / rel}: no caption ({where}, and no {sidecar.name} beside it)")
            text, at = read_text(sidecar, "caption file"), str(sidecar)
        captions.append(_caption(text, at, rel))
    return ImageSource(root, images, captions, lambda i: _open_image(root / images[i], root / images[i]))


def _dataset_source(root: Path, image_column: str, caption_column: str) -> ImageSource:
    from piflow_kernels.distill.prompts import load_dataset_folder

    ds = load_dataset_folder(root)  # datasets imports there, with a clear error when missing
    import datasets
    for column in (image_column, caption_column):
        if column not in ds.column_names:
            raise ValueError(f"{root}: no column {column!r} (columns: {ds.column_names})")
    if not isinstance(ds.features[image_column], datasets.Image):
        raise ValueError(f"{root}: column {image_column!r} is {ds.features[image_column]}, not a datasets.Image column")
    if len(ds) == 0:
        raise ValueError(f"{root}: no images (the dataset has no rows)")
    names = [f"row {i}" for i in range(len(ds))]
    texts = [row[caption_column] for row in ds.select_columns([caption_column]).to_list()]
    captions = [_caption(t, f"{root}: row {i}", f"column {caption_column!r}") for i, t in enumerate(texts)]
    # undecoded cells ({"bytes", "path"}): the image is decoded here, where an error can name the row
    cells = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))

    def opener(i: int) -> Any:
        cell = cells[i][image_column]
        name = f"{root}: row {i}" + (f" ({cell['path']})" if cell and cell.get("path") else "")
        if not cell or not (cell.get("bytes") or cell.get("path")):
            raise ValueError(f"{name}: no image in column {image_column!r}")
        return _open_image(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"], name)

    return ImageSource(root, names, captions, opener)


def _open_image(source: Any, name: PathLike) -> Any:
    """An RGB PIL image, read completely; an unreadable or truncated image is a DamagedFileError naming ``name``."""
    import PIL.Image
    from diffusers.utils import load_image

    try:
        with PIL.Image.open(source) as image:
            image.load()  # decode now: a truncated file fails here, naming the file
            return load_image(image)  # diffusers' loader: EXIF orientation applied, converted to RGB
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as err:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        raise DamagedFileError(name, "image: not a readable image", err) from err


# ---------------------------------------------------------------------------- the VAE


def vae_identity(pipeline_dir: PathLike) -> dict[str, Any]:
    """What identifies the VAE of a diffusers folder: ``{"pipeline": class name, "components": {"vae": ...}}``.

    The ``vae`` entry is its class, its ``config.json`` (without the keys that record where or with which
    version it was saved) and the sha256 of every file in ``vae/``.
    """
    root = Path(pipeline_dir)
    model_index = read_json(root / "model_index.json", "pipeline index")
    spec = model_index.get("vae")
    if not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
        raise ValueError(f"{root}: the pipeline has no VAE (model_index.json names none)")
    folder = root / "vae"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (the vae that {root / 'model_index.json'} names)")
    return {"pipeline": model_index.get("_class_name"),
            "components": {"vae": component_identity(folder, spec, "vae", _VOLATILE_VAE_KEYS)}}  # fmt: skip


def _geometry(root: Path, pipeline: str) -> tuple[str, int, int]:
    """(VAE class, the pipeline's vae_scale_factor, the factor height and width must be multiples of), from the configs."""
    spec = read_json(root / "model_index.json", "pipeline index").get("vae")
    expected = _VAE_CLASS[pipeline]
    if not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
        raise ValueError(f"{root}: the pipeline has no VAE (model_index.json names none)")
    if spec[1] != expected:
        raise ValueError(f"{root}: its vae is a {spec[1]}; a {pipeline} encodes with an {expected}")
    config = read_json(require_file(root / "vae" / "config.json", "vae config"), "vae config")
    # the pipelines' own vae_scale_factor (their __init__), from the config's values or the class defaults
    if expected == "AutoencoderKLQwenImage":
        vae_scale_factor = 2 ** len(config.get("temperal_downsample", [False, True, True]))
    else:
        vae_scale_factor = 2 ** (len(config.get("block_out_channels", [64])) - 1)
    patch = 2  # FLUX.1, FLUX.2 and Qwen-Image pack 2 x 2 latents into a token
    if pipeline == "StableDiffusion3Pipeline" and (root / "transformer" / "config.json").is_file():
        patch = int(read_json(root / "transformer" / "config.json", "transformer config").get("patch_size", 2))
    return expected, vae_scale_factor, vae_scale_factor * patch


def _resolution(resolution: Any, vae_scale_factor: int, factor: int) -> tuple[int, int]:
    valid = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
    if valid(resolution):
        h = w = resolution
    elif isinstance(resolution, (list, tuple)) and len(resolution) == 2 and all(valid(v) for v in resolution):
        h, w = resolution
    else:
        raise ValueError(f"resolution must be a positive integer or [height, width], got {resolution!r}")
    if h % factor or w % factor:
        raise ValueError(f"resolution [{h}, {w}]: height and width must be multiples of {factor} (the pipeline's "
                         f"vae_scale_factor {vae_scale_factor} x {factor // vae_scale_factor}), e.g. "
                         f"[{max(factor, h - h % factor)}, {max(factor, w - w % factor)}]")  # fmt: skip
    return h, w


def _load_vae(root: Path, class_name: str, dtype: torch.dtype, device: torch.device) -> Any:
    try:
        import diffusers
    except ImportError:
        raise ImportError("encoding images needs diffusers: pip install 'piflow_kernels[diffusers]'") from None
    vae = getattr(diffusers, class_name).from_pretrained(str(root / "vae"), **{dtype_keyword(): dtype})
    # no requires_grad_(False): encoding runs under no_grad anyway, and on CPU the convolutions of weights that
    # do not require grad take another kernel, whose rounding differs from the pipeline's own vae.encode
    return vae.to(device).eval()


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s generator with ``sample = true``: independent of the batching and the rank."""
    digest = hashlib.sha256(f"latent-cache:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def _encode_batch(vae: Any, pipeline: str, pixels: torch.Tensor, seeds: Sequence[int] | None) -> torch.Tensor:
    """Normalised latents (B, C, H, W) of preprocessed images (B, 3, h, w) in [-1, 1], in the VAE's dtype.

    The latent distribution's mean (``latent_dist.mode()``), or with ``seeds`` one sample per image from
    its own CPU generator (``latent_dist.sample(generator)`` row by row), normalised as the pipeline's
    image-to-image variant normalises what its VAE encodes.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    qwen = pipeline == "QwenImagePipeline"
    if qwen:
        pixels = pixels.unsqueeze(2)  # (B, 3, 1, h, w): an image is a video of one frame
    dist = vae.encode(pixels).latent_dist
    if seeds is None:
        z = dist.mode()
    else:
        z = torch.cat([DiagonalGaussianDistribution(dist.parameters[j : j + 1]).sample(torch.Generator().manual_seed(s))
                       for j, s in enumerate(seeds)])  # fmt: skip
    config = vae.config
    if pipeline == "Flux2Pipeline":  # Flux2Pipeline._encode_vae_image, in the 2x2-patchified channels, then unpatchified
        from diffusers import Flux2Pipeline

        # (the library's image layout; its 2x2 packing is Flux2Pipeline's _patchify_latents + _pack_latents)
        patched = Flux2Pipeline._patchify_latents(z)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patched.device, patched.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + config.batch_norm_eps).to(patched.device, patched.dtype)
        return Flux2Pipeline._unpatchify_latents((patched - mean) / std)
    if qwen:  # QwenImageImg2ImgPipeline._encode_vae_image: (z - mean) * (1 / std), then the frame axis dropped
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return ((z - mean) * inv_std)[:, :, 0]
    shift = config.shift_factor if config.shift_factor is not None else 0.0  # FluxImg2ImgPipeline / SD3's
    return (z - shift) * config.scaling_factor


def _batches_of_images(source: ImageSource, batches: list[list[int]], workers: int) -> Iterator[list[Any]]:
    """Each batch's images in order; with ``workers`` threads the next batch is decoded while this one is encoded."""
    if workers < 1:
        for idx in batches:
            yield [source.open(i) for i in idx]
        return
    with ThreadPoolExecutor(workers) as pool:
        ahead = [pool.submit(source.open, i) for i in batches[0]] if batches else []
        for k in range(len(batches)):
            current, ahead = ahead, ([pool.submit(source.open, i) for i in batches[k + 1]] if k + 1 < len(batches) else [])
            yield [f.result() for f in current]


def _write_captions(out: Path, captions: Sequence[str]) -> None:
    path = out / CAPTIONS
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps({"prompt": c}, ensure_ascii=False) + "\n" for c in captions), encoding="utf-8")
    os.replace(tmp, path)


def encode_images(
    pipeline_dir: PathLike,
    images: PathLike | ImageSource,
    out_dir: PathLike,
    *,
    resolution: int | Sequence[int],
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype | str = torch.bfloat16,
    vae_dtype: torch.dtype | str = torch.float32,
    sample: bool = False,
    seed: int = 0,
    progress: bool = True,
    shard_size: int = SHARD_SIZE,
    caption_column: str = "prompt",
    image_column: str = "image",
    num_workers: int = 4,
    device: str | torch.device | None = None,
) -> Path:
    """Encode this rank's images (``i % world_size == rank``) with the VAE of the diffusers folder ``pipeline_dir``.

    ``images`` is an image folder or a ``datasets.save_to_disk`` folder (see :func:`read_images`, which
    ``caption_column`` and ``image_column`` are passed to) or an :class:`ImageSource`. Only the VAE is
    loaded (``vae/``, in ``vae_dtype``, on ``device``: default ``cuda:LOCAL_RANK`` where CUDA is
    available, else the CPU). Each image is resized and center-cropped to ``resolution`` (an int or
    [height, width], multiples of the pipeline's ``vae_scale_factor * 2``) by diffusers' VaeImageProcessor,
    encoded to the mean of its latent distribution (``sample``: one draw from a generator seeded with
    :func:`image_seed`), normalised as the pipeline's transformer sees latents, and stored (C, H, W) in
    ``dtype``. ``num_workers`` threads decode the next batch's images while a batch is encoded.

    Writes the rank's shards of ``shard_size`` images and its index part, and ``captions.jsonl`` (one
    ``{"prompt": caption}`` per image, in index order, for ``encode-prompts``). Run again, it keeps the
    shards whose size and sha256 match the part and encodes only the rest; a folder made by another VAE,
    from other images or captions or with other settings (resolution, dtype, vae_dtype, sample, seed,
    shard_size, world_size) is refused with a ValueError naming what differs. Returns ``out_dir``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    root = Path(pipeline_dir)
    require_file(root / "model_index.json", "pipeline index")
    dtype_str, vae_dtype_str = dtype_name(dtype), dtype_name(vae_dtype, "vae_dtype")
    pipeline = supported_pipeline(root, tuple(_VAE_CLASS), "encoding images")
    if pipeline is None:
        raise ImportError("encoding images needs diffusers: pip install 'piflow_kernels[diffusers]'")
    vae_class, vae_scale_factor, factor = _geometry(root, pipeline)
    height, width = _resolution(list(resolution) if isinstance(resolution, tuple) else resolution, vae_scale_factor, factor)
    source = images if isinstance(images, ImageSource) else read_images(images, caption_column, image_column)
    identity = vae_identity(root)  # hashes the VAE's weights: after every cheaper check
    header = {
        "format": FORMAT,
        "vae": identity,
        "settings": {"resolution": [height, width], "dtype": dtype_str, "vae_dtype": vae_dtype_str, "sample": bool(sample),
                     "seed": int(seed) if sample else None, "shard_size": shard_size},  # fmt: skip
        "num_images": len(source),
        "images_sha256": items_sha256(source.records),
    }
    out = open_rank(out_dir, KIND, header, world_size)
    _write_captions(out, source.captions)  # every rank writes the same bytes, each atomically

    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    store = getattr(torch, dtype_str)
    vae = None
    from diffusers.image_processor import VaeImageProcessor

    # the pipelines' own preprocessing (resize keeping the aspect ratio, center crop, [0, 1] -> [-1, 1])
    processor = VaeImageProcessor(vae_scale_factor=factor, do_convert_rgb=True)

    def encode_chunk(chunk: list[int], bar: Any) -> dict[str, torch.Tensor]:
        nonlocal vae
        if vae is None:  # only once a shard is left to encode
            vae = _load_vae(root, vae_class, getattr(torch, vae_dtype_str), device)
        tensors: dict[str, torch.Tensor] = {}
        batches = [chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size)]
        for idx, pil in zip(batches, _batches_of_images(source, batches, num_workers)):
            pixels = processor.preprocess(pil, height=height, width=width, resize_mode="crop")
            seeds = [image_seed(seed, i) for i in idx] if sample else None
            latents = _encode_batch(vae, pipeline, pixels, seeds).to(store).cpu().contiguous()
            for j, i in enumerate(idx):
                tensors[f"{i}/latents"] = latents[j].clone()
            bar.update(len(idx))
        return tensors

    return write_rank_shards(out, KIND, header, source.records, encode_chunk, rank=rank, world_size=world_size,
                             shard_size=shard_size, progress=progress, desc=f"encoding images (rank {rank})")  # fmt: skip


# ---------------------------------------------------------------------------- reading


class LatentCache(ShardedCache):
    """Read-only access to an :func:`encode_images` folder, loading at most ``max_open_shards`` shards at a time.

    ``cache[i]`` is ``{"latents": (C, H, W)}``, image ``i`` as the pipeline's transformer sees it;
    ``cache.prompts[i]`` its caption and ``cache.paths[i]`` its relative path (``"row i"`` for a dataset).
    A shard is checked when it is first opened: its size always, its sha256 too with ``verify`` (once per
    shard per process); a missing, truncated or altered shard raises an error naming its file.
    ``order`` / ``iter_batches`` give the seeded per-rank batch stream, as for the prompt cache.
    """

    kind = KIND

    def __init__(self, out_dir: PathLike, *, max_open_shards: int = 2, verify: bool = True) -> None:
        super().__init__(out_dir, max_open_shards=max_open_shards, verify=verify)
        self._paths: list[str] = [r[0] for r in self._records]
        self._captions: list[str] = [r[1] for r in self._records]

    @property
    def prompts(self) -> list[str]:
        """The captions, in index order."""
        return list(self._captions)

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image's latents."""
        return tuple(self.index["shards"][0]["tensors"]["latents"]["shape"])  # type: ignore[return-value]

    def check_aligned(self, prompt_cache: Any) -> None:
        """Refuse a ``prompt_cache`` (a PromptCache or its folder) whose prompts are not the captions, in order.

        The ValueError names both folders and the first index that differs.
        """
        if not hasattr(prompt_cache, "prompts"):
            from piflow_kernels.distill.prompt_cache import PromptCache

            prompt_cache = PromptCache(prompt_cache)
        theirs = [p.prompt for p in prompt_cache.prompts]
        where = f"the prompt cache {prompt_cache.root} is not aligned with the latent cache {self.root}"
        fix = f"encode {self.root / CAPTIONS} with encode-prompts"
        if len(theirs) != len(self):
            raise ValueError(f"{where}: it holds {len(theirs)} prompts for {len(self)} images ({fix})")
        bad = [i for i, (p, c) in enumerate(zip(theirs, self._captions)) if p != c]
        if bad:
            i = bad[0]
            raise ValueError(f"{where}: {len(bad)} of its {len(theirs)} prompts are not the images' captions, first prompt "
                             f"{i}: {theirs[i]!r}, the caption of {self._paths[i]}: {self._captions[i]!r} ({fix})")  # fmt: skip
