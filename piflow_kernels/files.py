"""Reading files: every file the library reads goes through here, so a damaged one is one clear error.

Adapters, configs, training checkpoints, tensor caches and the native build cache are read with these
helpers. A file that is there but cannot be read as what it should be (garbled, truncated, empty, not
UTF-8, not JSON or TOML, a safetensors header that does not cover the file, a torch file that does not
load) raises :class:`DamagedFileError`, a ``ValueError`` whose message is ``PATH: what: what is wrong
(the underlying error)``::

    runs/a/checkpoints/iter_00000200/state.pt: training state: not a complete torch file
        (RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory ...)

A missing file stays a ``FileNotFoundError`` and a directory is an ``IsADirectoryError``, both naming
the path; ``PermissionError`` passes through unchanged.

    >>> cfg = read_toml("examples/distill_exact_teacher.toml", "training config")
    >>> weights = load_safetensors(folder / "diffusion_pytorch_model.safetensors", "adapter weights", device="cpu")
    >>> state = torch_load(checkpoint / "state.pt", "training state")
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DamagedFileError",
    "require_file",
    "read_bytes",
    "read_text",
    "read_json",
    "read_toml",
    "load_safetensors",
    "safetensors_metadata",
    "torch_load",
    "check_torch_file",
    "sha256_file",
]

PathLike = str | os.PathLike

# errors that say something about the file system, not the file's contents: passed through as they are
_PASS_THROUGH = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, MemoryError)
_DETAIL_CHARS = 240  # torch's and safetensors' messages run to several sentences; the first line says what broke


class DamagedFileError(ValueError):
    """A file that exists but cannot be read as what it should be.

    Attributes: ``path`` (a :class:`~pathlib.Path`), ``problem`` (what is wrong, e.g. "training state: not
    a complete torch file") and ``detail`` (the underlying error as "Type: message", or None).
    """

    def __init__(self, path: PathLike, problem: str, detail: BaseException | str | None = None) -> None:
        if isinstance(detail, BaseException):
            detail = describe(detail)
        super().__init__(str(path), problem, detail)  # args round-trip through pickle (cls(*args))
        self.path = Path(path)
        self.problem = problem
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" + (f" ({self.detail})" if self.detail else "")


def describe(err: BaseException) -> str:
    """``"Type: first line of the message"``, at most a few hundred characters."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if len(text) > _DETAIL_CHARS:
        text = text[: _DETAIL_CHARS - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def require_file(path: PathLike, what: str = "file") -> Path:
    """``path`` as a Path when it is an existing file; else FileNotFoundError / IsADirectoryError naming it."""
    p = Path(path)
    if p.is_dir():
        err: OSError = IsADirectoryError(f"{p} is a directory, not a file ({what})")
    elif not p.exists():
        err = FileNotFoundError(f"{p} does not exist ({what})")
    else:
        return p
    raise err


def _damaged(path: Path, what: str, reason: str, err: BaseException | None = None) -> DamagedFileError:
    return DamagedFileError(path, f"{what}: {reason}", err)


def read_bytes(path: PathLike, what: str = "file") -> bytes:
    """The whole file."""
    p = require_file(path, what)
    try:
        return p.read_bytes()
    except _PASS_THROUGH:
        raise
    except OSError as err:
        raise _damaged(p, what, "unreadable", err) from err


def read_text(path: PathLike, what: str = "text file") -> str:
    """The file as UTF-8 text (a BOM is dropped); bytes that are not UTF-8 are a DamagedFileError."""
    p = Path(path)
    data = read_bytes(p, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _damaged(p, what, "not UTF-8 text", err) from err


def _read_document(path: PathLike, what: str, parse: Callable[[str], Any], error: type[Exception], kind: str) -> Any:
    """``parse`` of the file's text; an empty (or blank) file or an ``error`` of ``parse`` is a DamagedFileError."""
    p = Path(path)
    text = read_text(p, what)
    if not text.strip():
        raise _damaged(p, what, "empty file")
    try:
        return parse(text)
    except error as err:
        raise _damaged(p, what, f"invalid {kind}", err) from err


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """The parsed JSON document (an empty file is a DamagedFileError)."""
    return _read_document(path, what, json.loads, json.JSONDecodeError, "JSON")


def read_toml(path: PathLike, what: str = "TOML file") -> dict[str, Any]:
    """The parsed TOML document (tomllib on Python 3.11+, tomli before).

    An empty (or blank) file is a DamagedFileError, not an empty table: a zero-byte config is a failed
    copy far more often than a request for every default.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ModuleNotFoundError("reading TOML files on Python < 3.11 needs the tomli package") from None
    return _read_document(path, what, tomllib.loads, tomllib.TOMLDecodeError, "TOML")


def load_safetensors(
    path: PathLike, what: str = "safetensors file", device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on ``device``."""
    from safetensors.torch import load_file

    p = require_file(path, what)
    try:
        return load_file(str(p), device=str(device))
    except _PASS_THROUGH:
        raise
    except Exception as err:  # SafetensorError (header, coverage), OSError from the mmap, bad dtypes
        raise _damaged(p, what, "not a complete safetensors file", err) from err


def safetensors_metadata(path: PathLike, what: str = "safetensors file") -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} when it has none), read without loading a tensor.

    Opening the file checks its header and that the header's tensors cover the file exactly, so this is
    also the cheap check that a safetensors file is not truncated.
    """
    from safetensors import safe_open

    p = require_file(path, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except _PASS_THROUGH:
        raise
    except Exception as err:
        raise _damaged(p, what, "not a complete safetensors file", err) from err


def torch_load(
    path: PathLike, what: str = "torch file", map_location: str | torch.device | None = "cpu", weights_only: bool = True
) -> Any:
    """``torch.load(path, map_location, weights_only)``; any failure to load the file is a DamagedFileError."""
    p = require_file(path, what)
    try:
        return torch.load(p, map_location=map_location, weights_only=weights_only)
    except _PASS_THROUGH:
        raise
    except Exception as err:  # truncated: RuntimeError (miniz), OSError (Errno 22); empty: EOFError; garbled: UnpicklingError
        raise _damaged(p, what, "not a complete torch file", err) from err


def check_torch_file(path: PathLike, what: str = "torch file") -> None:
    """Check a ``torch.save`` file without unpickling it: a zip archive whose members match their CRC-32s."""
    p = require_file(path, what)
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()
    except _PASS_THROUGH:
        raise
    except Exception as err:  # BadZipFile for a truncated, empty or garbled file
        raise _damaged(p, what, "not a complete torch file", err) from err
    if bad is not None:
        raise _damaged(p, what, f"member {bad!r} fails its CRC check")


def sha256_file(path: PathLike, what: str = "file") -> str:
    """The hex sha256 of the file's bytes, read in 8 MiB chunks."""
    p = require_file(path, what)
    digest = hashlib.sha256()
    try:
        with open(p, "rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
    except _PASS_THROUGH:
        raise
    except OSError as err:
        raise _damaged(p, what, "unreadable", err) from err
    return digest.hexdigest()
