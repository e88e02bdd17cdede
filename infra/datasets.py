"""Datasets as Parquet files (a list of flat dict rows in, the same rows out), and users' text tables read
with every problem named by file, row and column."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def write_rows(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    """Write ``rows`` (all with the same keys) as one Parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema) if rows else pa.table({}, schema=schema)
    pq.write_table(table, path)
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a Parquet file back as a list of dict rows."""
    return pq.read_table(path).to_pylist()


class DatasetError(ValueError):
    """A user dataset that cannot be used; the message names the file, and the row and column where one is at fault."""


def _load_jsonl(path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}: row {number}: not UTF-8 text (byte {e.start})") from e
        if not text.strip():
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: row {number}: not a JSON object ({e.msg})") from e
    return rows


def _load_parquet(path: Path) -> list[Any]:
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable Parquet file ({e})") from e


def _load_csv(path: Path) -> list[Any]:
    """A CSV file with a header row; empty cells read as missing values."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except csv.Error as e:
        raise DatasetError(f"{path}: not a readable CSV file ({e})") from e
    for number, row in enumerate(rows, start=1):
        if None in row:  # more cells than the header has columns
            raise DatasetError(f"{path}: row {number}: more cells than the header's {len(row) - 1} columns")
    return [{k: (v if v != "" else None) for k, v in row.items()} for row in rows]


TABLE_LOADERS = {".parquet": _load_parquet, ".jsonl": _load_jsonl, ".csv": _load_csv}


def read_table(
    path: Path, formats: tuple[str, ...] = (".parquet", ".jsonl"), name: str | None = None
) -> list[dict[str, Any]]:
    """The rows of a user's table in one of ``formats``; DatasetError names the file (as ``name``, e.g. the URI it
    was downloaded from), and the row where one is at fault, for a wrong type, a missing or empty file, unreadable
    content or a row that is not an object."""
    name = name or str(path)
    if path.suffix not in formats:
        raise DatasetError(f"{name}: unsupported file type {path.suffix!r}; use {' or '.join(formats)}")
    if not path.is_file():
        raise DatasetError(f"{name}: no such file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{name}: the file is empty")
    try:
        rows = TABLE_LOADERS[path.suffix](path)
    except DatasetError as e:
        raise DatasetError(str(e).replace(str(path), name, 1)) from e
    if not rows:
        raise DatasetError(f"{name}: no rows")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DatasetError(f"{name}: row {number}: expected an object with columns, got {type(row).__name__}")
    return rows


def bad_text(value: Any) -> str | None:
    """Why ``value`` is not usable text, or None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing value (null or NaN)"
    if not isinstance(value, str):
        return f"expected text, got {type(value).__name__} {value!r:.40}"
    if not value.strip():
        return "empty or whitespace-only text"
    return None


def text_rows(
    label: str, rows: list[dict[str, Any]], required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> list[dict[str, str]]:
    """The ``required`` (and present ``optional``) columns of ``rows``, which must hold non-empty UTF-8 text in every
    row. DatasetError names the source (``label``), the row (1-based) and the column."""
    table = []
    for number, row in enumerate(rows, start=1):
        if missing := [c for c in required if c not in row]:
            raise DatasetError(
                f"{label}: row {number}: missing column(s) {missing}; required: {list(required)} (it has "
                f"{sorted(row)}; map other names with data.columns, e.g. data.columns: {{{missing[0]}: yours}})"
            )
        for column in (*required, *(c for c in optional if c in row)):
            if problem := bad_text(row[column]):
                raise DatasetError(f"{label}: row {number}, column {column!r}: {problem}")
        table.append({c: row[c] for c in (*required, *optional) if c in row})
    return table
