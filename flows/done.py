"""Whether a run was done already: the same config, pipeline code, user inputs and MLflow store as a run that completed
and whose artifacts and MLflow run are all still there (``infra/run_records.py``). ``rlhf run`` answers an identical
run from its record in about a second, before it imports torch or starts Prefect; ``--rerun`` runs the flow anyway.

Where the store lives is not part of a run's identity, as it is not part of an artifact's: the record is looked up in
the current store, and its URIs are this store's. Nor is where a SQLite MLflow store inside the working folder lives:
it is named by its path in that folder, so a folder copied or moved whole (artifacts and MLflow store) stays up to
date.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.config import PipelineConfig
from infra.codebase import source_digest
from infra.credentials import open_configured_store
from infra.mlflow_relocation import settle_local_store, sqlite_path
from infra.run_records import RunRecord, read_record, run_key, why_stale, write_record
from infra.sources import StoreOpener, inputs_digest
from infra.storage import ObjectStore

PIPELINE_CODE = ("flows.pipeline",)  # the flow and everything it runs, phases and publishing included


def source_store_opener(config: PipelineConfig) -> StoreOpener:
    """How a data source in a bucket is opened: with the storage's credentials (its Prefect block or the AWS env)."""
    return lambda uri: open_configured_store(uri, config.storage.aws_credentials_block)


def tracking_identity(tracking_uri: str) -> str:
    """The MLflow store as part of a run's identity: a SQLite file inside the working folder by its path relative to
    that folder (the default store, ``rlhf-mlflow/mlflow.db``, is the same store in a copy of the folder); any other
    store by its URI."""
    path = sqlite_path(tracking_uri)
    if path is not None and path.resolve().is_relative_to(cwd := Path.cwd().resolve()):
        return f"sqlite:{path.resolve().relative_to(cwd).as_posix()}"
    return tracking_uri


def run_identity(config: PipelineConfig, inputs: str | None) -> str:
    """The key of a run of ``config`` (``inputs``: :func:`infra.sources.inputs_digest` of its data): its config
    less where the store lives, the pipeline's code, its inputs' content and the MLflow store it logs to."""
    settings = config.model_dump(mode="json")
    settings["storage"] = {"prefix": config.storage.prefix}
    settings["tracking"] |= {"uri": None}  # the store is named below, where it lives aside
    code, tracking = source_digest(PIPELINE_CODE), tracking_identity(config.tracking.resolved_uri())
    return run_key({"config": settings, "code": code, "inputs": inputs, "tracking_uri": tracking})


def store_of(config: PipelineConfig) -> ObjectStore:
    return open_configured_store(config.storage.uri, config.storage.aws_credentials_block)


def finished_run(config: PipelineConfig) -> tuple[RunRecord | None, str]:
    """The record of a completed run identical to ``config``'s that still stands, its summary's URIs this store's;
    or None and why not. A lineage's run is never identical to an earlier one: it trains further iterations."""
    if config.lineage:
        return None, "a lineage's run continues the lineage"
    store = store_of(config)
    key = run_identity(config, inputs_digest(config.data, source_store_opener(config)))
    record = read_record(store, config.storage.prefix, key)
    if record is None:
        return None, "no run of this config and code has completed in this store"
    settle_local_store(config.tracking.resolved_uri())  # a copied folder's store reads its own artifacts
    if reason := why_stale(record, store, config.tracking.resolved_uri()):
        return None, f"the run that did it has lost something: {reason}"
    summary = record.summary | {
        "mlflow_tracking_uri": config.tracking.resolved_uri(),
        "artifacts_uri": store.full_uri(config.storage.prefix),
        "final_policy_uri": store.full_uri(record.summary["final_policy_key"]),
    }
    return record.model_copy(update={"summary": summary}), ""


def record_run(config: PipelineConfig, *, inputs: str | None, summary: dict[str, Any], artifacts: list[str]) -> None:
    """Leave the record an identical run finds (:func:`finished_run`); not for a lineage's run."""
    if config.lineage:
        return
    key = run_identity(config, inputs)
    write_record(store_of(config), config.storage.prefix, key=key, summary=summary, artifacts=artifacts)
