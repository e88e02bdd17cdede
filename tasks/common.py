"""What every phase task shares: its run context, cache key, retry rule, artifact staging and tracking."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from infra.checkpoints import StoreCheckpointer
from infra.credentials import open_configured_store
from infra.deepspeed_engine import DeepSpeedConfig
from infra.storage import (
    ArtifactRef,
    ObjectStore,
    StorageError,
    TransientStorageError,
    download_dir,
    is_complete,
    read_manifest,
    upload_dir,
)
from rlhf_core.checkpoint import DivergenceError
from rlhf_core.engine import Engine, TorchEngine

if TYPE_CHECKING:
    from infra.tracking import RunLogger

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
NOT_IN_CACHE_KEY = frozenset({"context"})


class TrackingContext(BaseModel):
    """Where a phase logs: the MLflow server or file, experiment and the pipeline's parent run."""

    model_config = ConfigDict(extra="forbid")
    tracking_uri: str
    experiment: str
    parent_run_id: str | None = None


class RunContext(BaseModel):
    """Where a phase reads and writes. Deliberately outside the cache key: the same inputs give the
    same artifact whichever run asks."""

    model_config = ConfigDict(extra="forbid")
    store_uri: str = Field(description="Object store root: a folder or s3://bucket/prefix.")
    prefix: str = Field(description="Key prefix of this pipeline's artifacts in the store.")
    aws_credentials_block: str | None = Field(
        None, description="Prefect AwsCredentials block the S3 client is built from (its name only); None: AWS env."
    )
    tracking: TrackingContext | None = None
    trust_remote_code: bool = False

    @property
    def store(self) -> ObjectStore:
        return open_configured_store(self.store_uri, self.aws_credentials_block)


class PhaseOutput(BaseModel):
    """The small reference a phase task returns: where its artifact lives, its digest and its metrics."""

    artifact: dict[str, str]
    metrics: dict[str, float] = {}

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef.from_dict(self.artifact)

    @property
    def digest(self) -> str:
        return self.artifact["digest"]


@cache
def code_version() -> str:
    """Digest of the source of the algorithms, tasks and storage, so a code change invalidates caches."""
    sha = hashlib.sha256()
    for folder in ("rlhf_core", "tasks", "infra"):
        for path in sorted((PACKAGE_ROOT / folder).glob("*.py")):
            sha.update(path.name.encode())
            sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def _identity(value: Any) -> Any:
    """What of a task argument belongs in its cache key: configs by content, artifacts by digest."""
    if isinstance(value, PhaseOutput):
        return value.digest
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_identity(v) for v in value]
    if isinstance(value, dict):
        return {k: _identity(v) for k, v in value.items()}
    return value


def phase_key(name: str, inputs: dict[str, Any]) -> str:
    """sha256 of the phase name, code version and inputs' identities."""
    payload = {"phase": name, "code": code_version(), "inputs": _identity(inputs)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def phase_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: the phase key of the task's arguments, less the run context except
    where its artifacts live."""
    inputs = {k: v for k, v in parameters.items() if k not in NOT_IN_CACHE_KEY}
    run = parameters.get("context")
    if run is not None:
        inputs["_store"] = [run.store_uri, run.prefix]
        if run.aws_credentials_block:  # its endpoint may make the same uri another store; the name only
            inputs["_store"].append(run.aws_credentials_block)
    return f"{context.task.name}-{phase_key(context.task.name, inputs)}"


def should_retry(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures (storage hiccups, lost connections); never a bad config or input,
    which would fail the same way again."""
    error = state.data if isinstance(state.data, BaseException) else None
    if isinstance(error, TransientStorageError | ConnectionError | TimeoutError):
        return True
    return not isinstance(error, ValueError | TypeError | KeyError | StorageError | DivergenceError)


def artifact_key(context: RunContext, folder: str, name: str, inputs: dict[str, Any]) -> str:
    """``<prefix>/<folder>/<name>-<key[:12]>``: browsable by iteration, never overwritten by other inputs."""
    return f"{context.prefix}/{folder}/{name}-{phase_key(name, inputs)[:12]}"


def local_cache_root() -> Path:
    return Path(os.environ.get("RLHF_CACHE_DIR", Path(tempfile.gettempdir()) / "rlhf-cache"))


def fetch(context: RunContext, output: PhaseOutput) -> Path:
    """A local copy of an artifact, downloaded once per digest and verified against its manifest."""
    local = local_cache_root() / output.digest
    if (local / ".complete").exists():
        return local
    local_cache_root().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=local_cache_root()))
    download_dir(context.store, output.ref.key, staging)
    (staging / ".complete").touch()
    shutil.rmtree(local, ignore_errors=True)
    staging.rename(local)
    return local


def publish(
    context: RunContext, key: str, local_dir: Path, metadata: dict[str, Any], metrics: dict[str, float]
) -> PhaseOutput:
    """Upload a finished artifact folder (manifest last) and return its reference."""
    ref = upload_dir(context.store, local_dir, key, metadata={**metadata, "metrics": metrics})
    return PhaseOutput(artifact=ref.to_dict(), metrics=metrics)


def existing_output(context: RunContext, key: str) -> PhaseOutput | None:
    """The artifact already at ``key``, complete, with its recorded metrics (a re-run that finds its
    work done, e.g. after a crash between upload and the task reporting success)."""
    if not is_complete(context.store, key):
        return None
    manifest = read_manifest(context.store, key) or {}
    ref = ArtifactRef(context.store.full_uri(key), key, manifest["digest"])
    return PhaseOutput(artifact=ref.to_dict(), metrics=manifest.get("metadata", {}).get("metrics", {}))


MetricsCallback = Callable[[dict[str, float], int], None]

ProgressHook = Callable[[str, int, int], None]
PROGRESS_HOOKS: list[ProgressHook] = []


def phase_task(name: str) -> Callable:
    """The Prefect task settings every phase shares: retried with backoff when the failure may pass,
    cached across flow runs on its inputs' identities, result persisted."""
    from prefect import task

    return task(
        name=name,
        retries=2,
        retry_delay_seconds=[2, 10],
        retry_condition_fn=should_retry,
        cache_key_fn=phase_cache_key,
        persist_result=True,
    )


def make_engine(
    module: Any,
    deepspeed: DeepSpeedConfig | None,
    micro_batch_size: int,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    min_lr_ratio: float = 0.1,
) -> Engine:
    """Plain torch, or DeepSpeed ZeRO when the pipeline config names a stage: the loops do not know which."""
    schedule = {"warmup_steps": warmup_steps, "weight_decay": weight_decay, "min_lr_ratio": min_lr_ratio}
    if deepspeed is None:
        return TorchEngine(module, lr, total_steps, max_grad_norm=max_grad_norm, **schedule)
    from infra.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(
        module, deepspeed, lr, total_steps, max_grad_norm=max_grad_norm, micro_batch_size=micro_batch_size, **schedule
    )


def phase_engine(module: Any, config: Any, total_steps: int, deepspeed: DeepSpeedConfig | None) -> Engine:
    """:func:`make_engine` from a phase config with ``batch_size``, ``lr``, ``warmup_steps``, ``weight_decay``
    and ``max_grad_norm`` (SFT, reward model)."""
    return make_engine(
        module,
        deepspeed,
        config.batch_size,
        config.lr,
        total_steps,
        config.warmup_steps,
        config.weight_decay,
        config.max_grad_norm,
    )


def checkpoint_every(every: int, deepspeed: DeepSpeedConfig | None) -> int:
    """Resumable checkpoints are written under plain torch only (DeepSpeed's sharded optimizer state is not)."""
    return every if deepspeed is None else 0


class PhaseLog:
    """A phase's metrics callback: its MLflow child run (``run``, None without tracking) and progress hooks."""

    def __init__(self, label: str, total_steps: int, run: RunLogger | None = None) -> None:
        self.label, self.total_steps, self.run = label, total_steps, run

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log_metrics(metrics, step)
        for hook in PROGRESS_HOOKS:
            hook(self.label, step, self.total_steps)


@contextmanager
def tracked(context: RunContext, run_name: str, params: dict[str, Any], total_steps: int = 0) -> Iterator[PhaseLog]:
    """A metrics callback for one phase: an MLflow child run of the pipeline run (when tracking is on),
    plus progress for whoever listens (the CLI's progress bars)."""
    from infra.tracking import Tracker

    if context.tracking is None:
        yield PhaseLog(run_name, total_steps)
        return
    tracking = context.tracking
    tracker = Tracker(tracking.tracking_uri, tracking.experiment)
    with tracker.run(run_name, params=params, parent_run_id=tracking.parent_run_id) as run:
        yield PhaseLog(run_name, total_steps, run)


def phase_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task or flow run (shown in its UI), else the ``rlhf`` logger."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rlhf")


@contextmanager
def checkpointing(context: RunContext, key: str, log: PhaseLog, every: int) -> Iterator[StoreCheckpointer]:
    """Resumable checkpoints of the phase whose artifact goes to ``key``. A restore is logged, tagged on the
    MLflow run and carries over the step metrics the interrupted attempt logged up to that step, so the
    history has no gap and no duplicate. Cleared once the phase finished; kept, and named, on a divergence."""
    run = log.run

    def on_resume(step: int, metadata: dict[str, Any]) -> None:
        phase_logger().warning(f"{log.label}: resuming from checkpoint step {step} ({checkpointer.latest_uri})")
        if run is not None:
            run.set_tags({"rlhf.resumed_from_step": step})
            if (previous := metadata.get("mlflow_run_id")) and previous != run.run_id:
                run.copy_history(previous, step)

    metadata = {"mlflow_run_id": run.run_id if run else None}
    checkpointer = StoreCheckpointer(context.store, key, every, metadata, on_resume)
    try:
        yield checkpointer
    except DivergenceError as e:
        raise DivergenceError(f"{e}; the last good checkpoint is kept: {checkpointer.latest_uri or 'none yet'}") from e
    checkpointer.clear()
