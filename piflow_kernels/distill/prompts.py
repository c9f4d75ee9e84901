"""Prompt sources for distilling text-to-image teachers: a list of :class:`Prompt` read from a file or dataset.

    >>> prompts = read_prompts("prompts.txt")                      # one prompt per line
    >>> prompts = read_prompts("prompts.jsonl")                    # {"prompt": ..., "negative_prompt": ...} per line
    >>> prompts = read_prompts("prompts.csv", column="caption")    # a header row, then one row per prompt
    >>> prompts = read_prompts("prompts.parquet")                  # needs pyarrow
    >>> prompts = read_prompts("my_dataset/")                      # a datasets.save_to_disk folder; needs datasets

Every prompt must be non-empty: an empty line, an empty cell or a missing column is a ``ValueError`` naming
the file and the line / row; bytes that are not UTF-8 are a :class:`~piflow_kernels.files.DamagedFileError`.
A negative prompt may be empty (the usual unconditional branch of classifier-free guidance). Leading and
trailing whitespace is stripped from every prompt; blank lines at the end of a text file are ignored.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from piflow_kernels.files import DamagedFileError, read_bytes, read_text, require_file

__all__ = ["Prompt", "read_prompts"]

PathLike = str | os.PathLike


class Prompt(NamedTuple):
    """One prompt; ``negative_prompt`` is None where the source has no negative column."""

    prompt: str
    negative_prompt: str | None = None


def read_prompts(path: PathLike, column: str = "prompt", negative_column: str | None = "negative_prompt") -> list[Prompt]:
    """The prompts of a text / JSONL / CSV / Parquet file or a local ``datasets`` folder, in file order.

    ``column`` names the prompt column of a table (ignored for a ``.txt`` file, where each line is a prompt);
    ``negative_column`` an optional column of negative prompts (absent from the table: no negatives; None: do
    not look for one). The format follows the suffix: ``.jsonl`` / ``.ndjson``, ``.csv``, ``.parquet``, a
    directory (``datasets.load_from_disk``); anything else is read as plain text.
    """
    p = Path(path)
    if p.is_dir():
        rows, where = _dataset_rows(p, column, negative_column), "row"
    else:
        require_file(p, "prompt file")
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            rows, where = _jsonl_rows(p), "line"
        elif suffix == ".csv":
            rows, where = _csv_rows(p), "row"
        elif suffix == ".parquet":
            rows, where = _parquet_rows(p), "row"
        else:
            return _text_prompts(p)
    return _prompts_from_rows(p, rows, column, negative_column, where)


def _text_prompts(path: Path) -> list[Prompt]:
    text = read_text(path, "prompt file")
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines are an editor's, not an empty prompt
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: prompt file: no prompts (the file is empty)")
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}: line {number}: empty prompt (every line must hold one prompt)")
        prompts.append(Prompt(line.strip()))
    return prompts


def _jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    lines = read_text(path, "prompt file").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path}: line {number}: empty line (every line must hold one JSON object)")
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DamagedFileError(path, f"prompt file: line {number} is not JSON", err) from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    # the csv module, not pyarrow: every cell stays a string (a prompt "1984" is not a number) and rows are
    # numbered the way a spreadsheet shows the file; a million prompts read in seconds either way
    text = read_text(path, "prompt file")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(number, row) for number, row in enumerate(reader, 2)]  # row 1 is the header
    except csv.Error as err:
        raise DamagedFileError(path, "prompt file: not a readable CSV table", err) from err


def _parquet_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading the Parquet file {path} needs pyarrow: pip install pyarrow") from None
    read_bytes(path, "prompt file")  # missing / unreadable: the library's errors
    try:
        table = pq.read_table(str(path))
    except Exception as err:
        raise DamagedFileError(path, "prompt file: not a complete Parquet file", err) from err
    return list(enumerate(table.to_pylist(), 1))


def load_dataset_folder(path: Path) -> Any:
    """The ``datasets.Dataset`` of a ``save_to_disk`` folder of one split, else a clear error naming the folder."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading the dataset folder {path} needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: not a datasets.save_to_disk folder ({err})") from err
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{path}: a DatasetDict with splits {sorted(ds)}: pass the folder of one split")
    return ds


def _dataset_rows(path: Path, column: str, negative_column: str | None) -> list[tuple[int, dict[str, Any]]]:
    ds = load_dataset_folder(path)
    names = [n for n in (column, negative_column) if n is not None and n in ds.column_names]
    if column not in names:
        raise ValueError(f"{path}: no column {column!r} (columns: {ds.column_names})")
    return [(number, row) for number, row in enumerate(ds.select_columns(names).to_list(), 1)]


def _prompts_from_rows(path: Path, rows: list[tuple[int, dict[str, Any]]], column: str, negative_column: str | None,
                       where: str) -> list[Prompt]:  # fmt: skip
    if not rows:
        raise ValueError(f"{path}: prompt file: no prompts (the table has no rows)")
    has_negative = negative_column is not None and any(negative_column in row for _, row in rows)
    prompts = []
    for number, row in rows:
        if column not in row:
            raise ValueError(f"{path}: {where} {number}: no column {column!r} (has {sorted(row)})")
        text = row[column]
        if not isinstance(text, str):
            raise ValueError(f"{path}: {where} {number}: column {column!r} is {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"{path}: {where} {number}: empty prompt in column {column!r}")
        negative = None
        if has_negative:
            negative = row.get(negative_column)
            negative = "" if negative is None else negative  # a missing negative is the empty (unconditional) prompt
            if not isinstance(negative, str):
                raise ValueError(
                    f"{path}: {where} {number}: column {negative_column!r} is {type(negative).__name__}, not a string"
                )
            negative = negative.strip()
        prompts.append(Prompt(text.strip(), negative))
    return prompts
