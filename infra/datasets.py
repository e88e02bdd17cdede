"""Datasets as Parquet files (a list of flat dict rows in, the same rows out), and users' text tables read
with every problem named by file, row and column."""

from __future__ import annotations

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


def _bad_text(value: Any) -> str | None:
    """Why ``value`` is not usable text, or None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing value (null or NaN)"
    if not isinstance(value, str):
        return f"expected text, got {type(value).__name__} {value!r:.40}"
    if not value.strip():
        return "empty or whitespace-only text"
    return None


def read_text_table(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Read a user's ``.parquet`` or ``.jsonl`` file whose ``required`` (and present ``optional``) columns must
    hold non-empty UTF-8 text in every row. DatasetError names the file, the row (1-based) and the column."""
    loaders = {".parquet": _load_parquet, ".jsonl": _load_jsonl}
    if path.suffix not in loaders:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use .parquet or .jsonl")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the file is empty")
    rows = loaders[path.suffix](path)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    table = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DatasetError(f"{path}: row {number}: expected an object with columns, got {type(row).__name__}")
        if missing := [c for c in required if c not in row]:
            raise DatasetError(f"{path}: row {number}: missing column(s) {missing}; required: {list(required)}")
        for column in (*required, *(c for c in optional if c in row)):
            if problem := _bad_text(row[column]):
                raise DatasetError(f"{path}: row {number}, column {column!r}: {problem}")
        table.append({c: row[c] for c in (*required, *optional) if c in row})
    return table
