"""Datasets as Parquet files: a list of flat dict rows in, the same rows out."""

from __future__ import annotations

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
