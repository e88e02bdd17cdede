"""Labeling by people: the batch a run publishes, the labels that come back, and where a waiting run is found.

A labeling batch is an artifact like any other, sealed by its manifest, holding ``batch.parquet``: ``pair_id``,
``prompt``, ``response_a``, ``response_b`` (what people see) and the hidden ``a_gold``, ``b_gold``, ``swapped``.
Labels come back as files (.jsonl, .csv, .parquet), form entries or Label Studio annotations with ``pair_id``,
``choice`` (a, b or tie), ``labeler`` and an optional ``strength`` (1-4). Every row is checked against the batch
before anything is written (:func:`check_labels`), and each accepted set is stored, sealed, under
``<batch key>.labels/<import id>/``: nothing imported is lost when a process dies, and a re-run of the same config
finds the same batch with its labels. A run waiting for labels leaves a record at
``<prefix>/labeling/waiting/<flow run id>.json`` (its Prefect API, the batch, since when), which
``rlhf label pending`` lists and ``rlhf label import`` uses to resume it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from infra.datasets import DatasetError, bad_text, read_rows, read_table, write_rows
from infra.storage import (
    MANIFEST,
    ArtifactRef,
    ObjectNotFoundError,
    ObjectStore,
    is_complete,
    read_manifest,
    upload_dir,
)
from rlhf_core.labelers import CHOICES, STRENGTH_SCALE, STRENGTHS, HumanLabel, LabelingPair

BATCH_FILE = "batch.parquet"
LABELS_FILE = "labels.parquet"
PUBLIC_COLUMNS = ("pair_id", "prompt", "response_a", "response_b")  # what people see
LABEL_COLUMNS = ("pair_id", "choice", "labeler", "strength")
LABEL_FORMATS = (".jsonl", ".csv", ".parquet")
WAITING_PREFIX = "labeling/waiting"


class LabelError(DatasetError):
    """Labels that cannot be used; the message names the file (or form field), row and column, and the run keeps
    waiting."""


class LabelTimeout(RuntimeError):
    """A run waited for labels past preferences.label_timeout_s; the message says how to continue."""


# ------------------------------------------------------------------------------------------------- batches


def write_batch(out_dir: Path, pairs: list[LabelingPair]) -> None:
    write_rows(out_dir / BATCH_FILE, [dataclasses.asdict(p) for p in pairs])


def read_batch(batch_dir: Path) -> list[LabelingPair]:
    return [LabelingPair(**row) for row in read_rows(batch_dir / BATCH_FILE)]


def export_batch(pairs: list[LabelingPair], path: Path) -> Path:
    """Write what people see of the pairs to ``path`` (.jsonl, .csv or .parquet), with empty ``choice``,
    ``strength`` and ``labeler`` columns to fill in and import back."""
    if path.suffix not in LABEL_FORMATS:
        raise LabelError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(LABEL_FORMATS)}")
    empty = pa.nulls(len(pairs), pa.string())
    columns = {c: pa.array([getattr(p, c) for p in pairs], pa.string()) for c in PUBLIC_COLUMNS}
    table = pa.table(columns | {"choice": empty, "strength": pa.nulls(len(pairs), pa.int64()), "labeler": empty})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        with path.open("w", encoding="utf-8") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# -------------------------------------------------------------------------------------------------- labels


def _strength(value: Any) -> int | str:
    """The strength as an int 1..4, or why it is not one."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value not in STRENGTHS:
        return f"{value!r} is not a strength from 1 to 4 ({STRENGTH_SCALE})"
    return value


def _blank(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


MAX_REPORTED_ROWS = 20  # bad rows named in one refusal; the rest are counted


class _BadRow(Exception):
    """One row's problem: the column at fault (or None) and what is wrong."""

    def __init__(self, column: str | None, problem: str) -> None:
        super().__init__(problem)
        self.column, self.problem = column, problem


def _label_of(row: dict[str, Any], batch_ids: set[str], seen: dict[tuple[str, str], int], number: int):
    """The row's HumanLabel, or None for an unlabeled pair; _BadRow for the first problem in it."""
    if unknown := sorted(set(row) - {*LABEL_COLUMNS, *PUBLIC_COLUMNS}):
        raise _BadRow(
            None,
            f"unknown column(s) {unknown}; a labels file has pair_id, choice, labeler and optionally strength (the "
            "exported prompt, response_a and response_b may stay)",
        )
    if missing := [c for c in ("pair_id", "choice", "labeler") if c not in row]:
        raise _BadRow(None, f"missing column(s) {missing}; required: pair_id, choice, labeler")
    if problem := bad_text(row["pair_id"]):
        raise _BadRow("pair_id", problem)
    pair_id = row["pair_id"].strip()
    if pair_id not in batch_ids:
        raise _BadRow("pair_id", f"{pair_id!r} is not a pair of this batch")
    if _blank(row["choice"]) and _blank(row["labeler"]):
        return None
    choice = str(row["choice"]).strip().lower() if not _blank(row["choice"]) else ""
    if choice not in CHOICES:
        raise _BadRow("choice", f"{row['choice']!r} is not one of a, b, tie")
    if problem := bad_text(row["labeler"]):
        raise _BadRow("labeler", f"{problem} (who gave the label)")
    labeler, strength = row["labeler"].strip(), None
    if not _blank(row.get("strength")):
        if choice == "tie":
            raise _BadRow("strength", "a tie has no strength; leave it empty")
        if isinstance(strength := _strength(row["strength"]), str):
            raise _BadRow("strength", strength)
    if (pair_id, labeler) in seen:
        raise _BadRow("pair_id", f"{labeler!r} labeled {pair_id!r} already in row {seen[pair_id, labeler]}")
    seen[pair_id, labeler] = number
    return HumanLabel(pair_id, choice, labeler, strength)


def check_labels(rows: Iterable[dict[str, Any]], batch_ids: set[str], source: str) -> tuple[list[HumanLabel], int]:
    """Labels from rows read from ``source`` (a file, or the form), checked against the batch's pair ids; a row
    with neither a choice nor a labeler is an unlabeled pair and is skipped (counted). LabelError names the source
    and every bad row (up to MAX_REPORTED_ROWS) with its column: a CSV's rows by the line a spreadsheet shows them
    on (the header is line 1), others by row (1-based)."""
    labels, blank, seen, bad = [], 0, {}, []
    for number, row in enumerate(rows, start=1):
        try:
            label = _label_of(row, batch_ids, seen, number)
        except _BadRow as e:
            where = f"line {number + 1}" if source.endswith(".csv") else f"row {number}"
            bad.append(f"{where}, column {e.column!r}: {e.problem}" if e.column else f"{where}: {e.problem}")
            continue
        if label is None:
            blank += 1
        else:
            labels.append(label)
    if len(bad) == 1:
        raise LabelError(f"{source}: {bad[0]}")
    if bad:
        shown = bad[:MAX_REPORTED_ROWS]
        more = f"\n  ... and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
        raise LabelError(f"{source}: {len(bad)} rows are not accepted:\n  " + "\n  ".join(shown) + more)
    return labels, blank


def read_labels_file(path: Path, batch_ids: set[str]) -> tuple[list[HumanLabel], int]:
    """:func:`check_labels` on a .jsonl, .csv or .parquet file."""
    try:
        rows = read_table(path, LABEL_FORMATS)
    except LabelError:
        raise
    except DatasetError as e:
        raise LabelError(str(e)) from e
    return check_labels(rows, batch_ids, str(path))


def covered(labels: Iterable[HumanLabel], batch_ids: set[str]) -> int:
    """How many of the batch's pairs have at least one label."""
    return len({label.pair_id for label in labels} & batch_ids)


def enough(labels: Iterable[HumanLabel], batch_ids: set[str], fraction: float) -> bool:
    """Whether the labels cover at least ``fraction`` of the batch's pairs."""
    return covered(labels, batch_ids) >= math.ceil(fraction * len(batch_ids))


def check_coverage(labels: list[HumanLabel], batch_ids: set[str], fraction: float, source: str) -> None:
    """LabelError unless the labels cover at least ``fraction`` of the batch's pairs."""
    n = covered(labels, batch_ids)
    if not enough(labels, batch_ids, fraction):
        raise LabelError(
            f"{source}: labels cover {n} of the batch's {len(batch_ids)} pairs ({n / len(batch_ids):.0%}); "
            f"preferences.min_labeled_fraction asks for {fraction:.0%}"
        )


def labels_prefix(batch_key: str) -> str:
    return f"{batch_key}.labels"


def store_labels(store: ObjectStore, batch_key: str, labels: list[HumanLabel], source: str) -> ArtifactRef:
    """Keep one accepted set of labels beside its batch, sealed, under a new import id (time-ordered)."""
    import_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="rlhf-labels-") as tmp:
        schema = pa.schema([(c, pa.int64() if c == "strength" else pa.string()) for c in LABEL_COLUMNS])
        write_rows(Path(tmp) / LABELS_FILE, [dataclasses.asdict(label) for label in labels], schema)
        metadata = {"source": source, "labels": len(labels), "imported_at": datetime.now(UTC).isoformat()}
        return upload_dir(store, Path(tmp), f"{labels_prefix(batch_key)}/{import_id}", metadata)


def label_imports(store: ObjectStore, batch_key: str) -> list[ArtifactRef]:
    """The sealed label imports of the batch, oldest first."""
    prefix = labels_prefix(batch_key)
    keys = sorted({f"{prefix}/{key[len(prefix) + 1 :].split('/', 1)[0]}" for key in store.list_keys(prefix)})
    return [
        ArtifactRef(store.full_uri(key), key, read_manifest(store, key)["digest"])
        for key in keys
        if is_complete(store, key)
    ]


def read_imports(store: ObjectStore, imports: list[ArtifactRef]) -> list[HumanLabel]:
    """The labels of these imports, a later import replacing an earlier label of the same labeler and pair."""
    merged: dict[tuple[str, str], HumanLabel] = {}
    for ref in imports:
        with tempfile.TemporaryDirectory(prefix="rlhf-labels-") as tmp:
            store.get_file(f"{ref.key}/{LABELS_FILE}", Path(tmp) / LABELS_FILE)
            for row in read_rows(Path(tmp) / LABELS_FILE):
                merged[row["pair_id"], row["labeler"]] = HumanLabel(**row)
    return list(merged.values())


def stored_labels(store: ObjectStore, batch_key: str) -> tuple[list[HumanLabel], list[ArtifactRef]]:
    """Every label stored for the batch (:func:`read_imports`), and the imports."""
    imports = label_imports(store, batch_key)
    return read_imports(store, imports), imports


# -------------------------------------------------------------------------------------------- waiting runs


class WaitingRecord(BaseModel):
    """A run that waits for labels: where to find it and its batch."""

    flow_run_id: str = Field(description="The Prefect flow run that waits (an iteration's subflow run).")
    api_url: str = Field(description="The Prefect API that run talks to (its temporary server in ephemeral mode).")
    lineage: str | None = None
    iteration: int
    kind: Literal["preferences", "evaluation"] = "preferences"
    n_pairs: int
    batch_key: str
    batch_uri: str
    min_labeled_fraction: float
    since: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    timeout_s: float
    state: Literal["waiting", "timed out"] = "waiting"


def _waiting_key(prefix: str, flow_run_id: str) -> str:
    return f"{prefix}/{WAITING_PREFIX}/{flow_run_id}.json"


def write_waiting(store: ObjectStore, prefix: str, record: WaitingRecord) -> None:
    store.put_bytes(_waiting_key(prefix, record.flow_run_id), record.model_dump_json(indent=1).encode())


def delete_waiting(store: ObjectStore, prefix: str, batch_key: str) -> None:
    """Forget every run recorded as waiting for this batch (an earlier run that timed out, say)."""
    for record in list_waiting(store, prefix):
        if record.batch_key == batch_key:
            store.delete_prefix(_waiting_key(prefix, record.flow_run_id))


def list_waiting(store: ObjectStore, prefix: str) -> list[WaitingRecord]:
    records = []
    for key in store.list_keys(f"{prefix}/{WAITING_PREFIX}"):
        if key.endswith(".json") and not key.endswith(MANIFEST):
            records.append(WaitingRecord.model_validate_json(store.get_bytes(key)))
    return sorted(records, key=lambda r: r.since)


def read_waiting(store: ObjectStore, prefix: str, flow_run_id: str) -> WaitingRecord:
    try:
        return WaitingRecord.model_validate_json(store.get_bytes(_waiting_key(prefix, flow_run_id)))
    except ObjectNotFoundError:
        raise LabelError(
            f"no labeling batch waits for flow run {flow_run_id} under {store.full_uri(prefix)}; "
            "`rlhf label pending` lists those that do (with the same --config/--set storage options)"
        ) from None


def resume_run(record: WaitingRecord, patience_s: float = 30.0) -> str | None:
    """Tell the waiting run its labels are stored (through the Prefect API it uses). Returns None when it resumed,
    else why not (it no longer waits, or its API cannot be reached): the labels stay stored either way. A run
    recorded as waiting may be a moment from pausing (or from saving its form): that is tried for ``patience_s``."""
    if record.state != "waiting":
        return f"flow run {record.flow_run_id} no longer waits ({record.state})"
    import httpx
    from prefect.exceptions import FlowPauseTimeout, NotPausedError
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + patience_s
    while True:
        try:
            with temporary_settings({PREFECT_API_URL: record.api_url}):
                resume_flow_run(record.flow_run_id, run_input={})
            return None
        except FlowPauseTimeout:
            return f"flow run {record.flow_run_id} no longer waits (timed out)"
        except (httpx.HTTPError, OSError) as e:
            return f"flow run {record.flow_run_id} could not be reached at {record.api_url}: {e}"
        except (NotPausedError, RuntimeError) as e:  # not paused (yet), or its form not saved (yet)
            if time.monotonic() > deadline:
                return f"flow run {record.flow_run_id} does not wait: {e or type(e).__name__}"
            time.sleep(1)
