"""MLflow experiment tracking: runs, nested runs, secret-safe params, tables and plots.

Everything goes through an explicit ``MlflowClient`` and run ids, never MLflow's global
active run, so nested and parallel runs in one process cannot interfere.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per report download clutters logs

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.entities.lifecycle_stage import LifecycleStage  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.tracking.context.registry import resolve_tags  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID  # noqa: E402
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH  # noqa: E402
from pydantic import BaseModel, SecretBytes, SecretStr  # noqa: E402

from infra.mlflow_relocation import ARTIFACTS_DIR, settle_local_store, sqlite_path  # noqa: E402

__all__ = [
    "DatasetRecord",
    "RunLogger",
    "Tracker",
    "flatten_params",
    "redact",
    "system_metrics",
]

logger = logging.getLogger(__name__)

_SECRET_WORDS = {
    "secret",
    "secrets",
    "password",
    "passwd",
    "token",
    "credential",
    "credentials",
    "auth",
    "authorization",
}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key")}
_SECRET_COMPOUNDS = {"".join(pair) for pair in _SECRET_PAIRS}  # "apikey", "privatekey"
# Tokenizer settings such as "pad_token" / "eos_token_id" name vocabulary entries, not credentials.
_SPECIAL_TOKEN_WORDS = {"pad", "bos", "eos", "unk", "sep", "cls", "mask"}
# "aws_credentials_block" names where a secret is kept (a Prefect block), not the secret itself.
_REFERENCE_WORDS = {"block"}


# MLflow 3's UI opens an experiment without this tag on its GenAI view (traces, judges); ours are training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"


def _key_words(key: str) -> list[str]:
    # Split snake_case, kebab-case and camelCase so "max_new_tokens" or "author" are not secrets
    # while "apiKey", "hf_token" and "secret_access_key" are.
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def _is_secret_key(key: Any) -> bool:
    words = _key_words(str(key).rsplit(".", 1)[-1])
    if "token" in words and _SPECIAL_TOKEN_WORDS.intersection(words):
        return False
    if words and words[-1] in _REFERENCE_WORDS:
        return False
    if _SECRET_WORDS.intersection(words) or _SECRET_COMPOUNDS.intersection(words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


_DROP = object()


def _redact(value: Any) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return _DROP
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if _is_secret_key(k):
                continue
            v = _redact(v)
            if v is not _DROP:
                out[k] = v
        return out
    if isinstance(value, list | tuple):
        cleaned = [v for v in map(_redact, value) if v is not _DROP]
        return tuple(cleaned) if isinstance(value, tuple) else cleaned
    return value


def redact(data: Mapping[str, Any]) -> dict[str, Any]:
    """Deep copy of ``data`` without secret-looking keys and pydantic secret values."""
    return _redact(data)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into dotted MLflow params, dropping secrets.

    ``{"ppo": {"kl_coef": 0.05}}`` becomes ``{"ppo.kl_coef": "0.05"}``. Values are ``str()``'d
    and truncated to MLflow's param value limit.
    """
    flat: dict[str, str] = {}

    def visit(node: Mapping[str, Any], path: str) -> None:
        for key, value in node.items():
            name = f"{path}.{key}" if path else str(key)
            if isinstance(value, Mapping):
                visit(value, name)
            else:
                flat[name] = str(value)[:MAX_PARAM_VAL_LENGTH]

    visit(redact(config), prefix)
    return flat


class RunLogger:
    """Logs metrics, params, tags and artifacts to one existing MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, model_id: str | None = None) -> None:
        """Log ``metrics`` at ``step`` in one batch call (also against the LoggedModel ``model_id``, whose page in
        MLflow then shows them); NaN/inf values are skipped with a warning."""
        timestamp, step = int(time.time() * 1000), 0 if step is None else int(step)
        batch = []
        for key, value in metrics.items():
            value = float(value)
            if not math.isfinite(value):
                logger.warning("Skipping non-finite metric %s=%s (step %s) for run %s", key, value, step, self.run_id)
                continue
            batch.append(Metric(key, value, timestamp, step, model_id=model_id, run_id=self.run_id))
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def copy_history(self, source_run_id: str, up_to_step: int) -> int:
        """Copy ``source_run_id``'s step metrics up to ``up_to_step`` into this run, and mark the source
        KILLED if it never ended (its process died). Returns how many points were copied."""
        source = self.client.get_run(source_run_id)
        points = [
            point
            for key in source.data.metrics
            for point in self.client.get_metric_history(source_run_id, key)
            if point.step <= up_to_step
        ]
        for i in range(0, len(points), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=points[i : i + 1000])
        if source.info.status == RunStatus.to_string(RunStatus.RUNNING):
            self.client.set_terminated(source_run_id, RunStatus.to_string(RunStatus.KILLED))
        return len(points)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) params dict, flattened and secret-filtered."""
        flat = flatten_params(params)
        if flat:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags; secret-looking keys and values are dropped."""
        clean = redact(tags)
        if clean:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in clean.items()])

    def log_table(self, rows: list[Mapping[str, Any]], artifact_file: str) -> None:
        """Log rows as an MLflow table artifact (``.json``), viewable in the UI's evaluation tab.

        Appends to the table if ``artifact_file`` already exists in the run (MLflow behaviour).
        """
        clean = [redact(row) for row in rows]
        columns = list(dict.fromkeys(k for row in clean for k in row))
        self.client.log_table(self.run_id, {c: [row.get(c) for row in clean] for c in columns}, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Log a dict as a JSON/YAML artifact (format from the extension), secret-filtered."""
        self.client.log_dict(self.run_id, redact(data), artifact_file)

    def log_png(self, png: bytes, artifact_file: str) -> None:
        """Log a PNG image (a figure rendered once by :func:`infra.report.figure_png`) as an artifact."""
        if not artifact_file.endswith(".png"):
            raise ValueError(f"log_png writes PNG; artifact_file must end in .png, got {artifact_file!r}")
        folder, name = posixpath.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(png)
            self.client.log_artifact(self.run_id, str(Path(tmp) / name), folder or None)

    def log_artifact_dir(self, local_dir: Path, artifact_path: str | None = None) -> None:
        """Upload the contents of ``local_dir`` under ``artifact_path`` (run root if None)."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset a run read: its name, content digest, where it lives and what it was for (``training``,
    ``evaluation``)."""

    name: str
    digest: str
    source: str
    context: str = "training"
    rows: int | None = None

    def as_input(self) -> DatasetInput:
        profile = json.dumps({"num_rows": self.rows}) if self.rows is not None else None
        dataset = Dataset(self.name, self.digest, "rlhf-object-store", json.dumps({"uri": self.source}), None, profile)
        return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, self.context)])


@contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval: float) -> Iterator[None]:
    """CPU, memory, disk, network (and GPU where present) to the run as ``system/...`` every ``interval`` seconds,
    and once at the end, so a phase shorter than the interval still has a sample; ``interval`` 0: off."""
    if interval <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # it says "started", "stopped" each phase
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracking_uri)
    monitor.collect_metrics()
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


class Tracker:
    """One MLflow experiment on one tracking server; hands out runs as :class:`RunLogger`."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None) -> None:
        db_path = sqlite_path(tracking_uri)
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            settle_local_store(tracking_uri)
            if artifact_location is None:
                # Without an explicit location MLflow falls back to ./mlruns of the current directory.
                folder = re.sub(r"[^\w.-]+", "_", experiment)
                artifact_location = (db_path.parent.resolve() / ARTIFACTS_DIR / folder).as_uri()
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self._get_or_create_experiment(experiment, artifact_location)
        self.artifact_location = self.client.get_experiment(self.experiment_id).artifact_location

    def _get_or_create_experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(
                    name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}
                )
            except MlflowException as e:
                # Another process created it between our lookup and create.
                if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == LifecycleStage.DELETED:
            self.client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before we set the kind, or by someone else
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
        return exp.experiment_id

    @contextmanager
    def run(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> Iterator[RunLogger]:
        """Start a run (nested under ``parent_run_id`` if given) and end it FINISHED or FAILED."""
        run_tags = resolve_tags(redact(tags or {}))
        if parent_run_id is not None:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=run_tags, run_name=name)
        run_logger = RunLogger(self.client, run.info.run_id)
        status = RunStatus.FINISHED
        try:
            if params:
                run_logger.log_params(params)
            yield run_logger
        except KeyboardInterrupt:
            status = RunStatus.KILLED
            raise
        except BaseException:
            status = RunStatus.FAILED
            raise
        finally:
            self.client.set_terminated(run_logger.run_id, RunStatus.to_string(status))

    def log_datasets(self, run_id: str, datasets: list[DatasetRecord]) -> None:
        """Record ``datasets`` as the run's inputs (MLflow's Datasets column and lineage), by content digest."""
        self.client.log_inputs(run_id, datasets=[d.as_input() for d in datasets])

    def resume(self, run_id: str) -> RunLogger:
        """A logger for an existing run; does not change its status."""
        self.client.get_run(run_id)  # fail fast on an unknown id
        return RunLogger(self.client, run_id)
