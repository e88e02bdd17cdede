"""What a completed pipeline run leaves in the store so that running the same thing again finds it, as ``make`` finds
a target up to date: a record under ``<prefix>/runs/<key>.json`` holding the run's summary and the keys of every
artifact it rests on. ``key`` digests everything that decides the run's outcome (the caller says what: config, code,
the content of the user's inputs, where it logs), so an identical run finds the record; the record stands only while
its artifacts are complete in the store and its MLflow run is still there.

Storage and the MLflow run's existence only: no Prefect, no torch, and no mlflow import (the run is looked up in
MLflow's SQLite file or through its REST API), so the check costs well under a second.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from infra.mlflow_relocation import sqlite_path
from infra.storage import ObjectNotFoundError, ObjectStore, is_complete

RUNS = "runs"


class RunRecord(BaseModel):
    """A completed run: its summary (the flow's return value) and the store-relative keys of its artifacts."""

    model_config = ConfigDict(extra="forbid")
    key: str
    finished_at: str
    summary: dict[str, Any]
    artifacts: list[str]


def run_key(identity: dict[str, Any]) -> str:
    """sha256 of a run's identity (JSON-serializable, order-free)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def record_key(prefix: str, key: str) -> str:
    return f"{prefix}/{RUNS}/{key}.json"


def write_record(store: ObjectStore, prefix: str, *, key: str, summary: dict[str, Any], artifacts: list[str]) -> None:
    """Record a completed run (one write: readers see the old record or the new one)."""
    record = RunRecord(key=key, finished_at=datetime.now(UTC).isoformat(), summary=summary, artifacts=artifacts)
    store.put_bytes(record_key(prefix, key), record.model_dump_json(indent=1).encode())


def read_record(store: ObjectStore, prefix: str, key: str) -> RunRecord | None:
    """The record of the run ``key``, or None where there is none (or it is unreadable: the run is simply done
    again, and writes a good one)."""
    try:
        return RunRecord.model_validate_json(store.get_bytes(record_key(prefix, key)))
    except (ObjectNotFoundError, ValidationError):
        return None


def why_stale(record: RunRecord, store: ObjectStore, tracking_uri: str) -> str | None:
    """None while the record stands: every artifact complete in ``store`` and its MLflow run active at
    ``tracking_uri``; else what is missing."""
    missing = [key for key in record.artifacts if not is_complete(store, key)]
    if missing:
        return f"{len(missing)} of its artifacts are gone or incomplete in {store.full_uri('')} ({missing[0]}, ...)"
    run_id = record.summary.get("mlflow_run_id")
    if run_id and mlflow_run_is_active(tracking_uri, run_id) is not True:
        return f"its MLflow run {run_id} is not found active at {tracking_uri} (or that cannot be checked cheaply)"
    return None


def mlflow_run_is_active(tracking_uri: str, run_id: str) -> bool | None:
    """Whether MLflow holds ``run_id``, not deleted: read from a SQLite store's ``runs`` table or asked of a tracking
    server's REST API (``runs/get``, with MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD). None where
    that cannot be told this way (another kind of store, an unexpected schema or answer)."""
    if (path := sqlite_path(tracking_uri)) is not None:
        if not path.is_file():
            return False
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                row = db.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        except sqlite3.Error:
            return None
        return row is not None and row[0] == "active"
    if tracking_uri.startswith(("http://", "https://")):
        query = urllib.parse.urlencode({"run_id": run_id})
        request = urllib.request.Request(f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/runs/get?{query}")
        if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
            request.add_header("Authorization", f"Bearer {token}")
        elif (user := os.environ.get("MLFLOW_TRACKING_USERNAME")) is not None:
            login = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
            request.add_header("Authorization", f"Basic {base64.b64encode(login).decode()}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.load(response)["run"]["info"]["lifecycle_stage"] == "active"
        except urllib.error.HTTPError as e:
            return False if e.code == 404 else None
        except (OSError, ValueError, KeyError):
            return None
    return None
