"""What every phase task shares: its run context, cache key, retry rule, artifact staging and tracking."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import requests
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import Module
from transformers import PreTrainedModel

from infra.artifacts import PhaseInputs
from infra.catalog import TAG_ALARM, TAG_CODE_VERSION, TAG_RESUMED_FROM, Phase
from infra.checkpoints import CheckpointSpec, ResumeHook, StoreCheckpointer
from infra.codebase import code_version
from infra.credentials import open_configured_store
from infra.deepspeed_config import DeepSpeedConfig
from infra.storage import (
    ArtifactRef,
    ObjectStore,
    TransientStorageError,
    download_dir,
    is_complete,
    read_manifest,
    upload_dir,
)
from rlhf_core.alarms import Alarm
from rlhf_core.checkpoint import DivergenceError
from rlhf_core.config import DEFAULT_COMPUTE, ComputeConfig
from rlhf_core.engine import Engine, Optimization, TorchEngine, autocast_model
from rlhf_core.modeling import default_device, enable_gradient_checkpointing, load_policy
from rlhf_core.threads import torch_threads

if TYPE_CHECKING:
    from infra.tracking import RunLogger

NOT_IN_CACHE_KEY = frozenset({"context"})
# Failures that may pass if the phase runs again: a storage hiccup our store could not ride out with its own
# retries, a dropped or refused connection or a timeout (the OS's, requests' under MLflow's client, httpx's under
# Prefect's). Anything else (a bad config or input, a failed training rank, out of memory, a divergence, a bug)
# fails the same way again, so it is never retried: a retry re-runs a phase that may take hours.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientStorageError,
    ConnectionError,
    TimeoutError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    httpx.TransportError,
)


class TrackingContext(BaseModel):
    """Where a phase logs: the MLflow server or file, experiment and the pipeline's parent run."""

    model_config = ConfigDict(extra="forbid")
    tracking_uri: str
    experiment: str
    parent_run_id: str | None = None
    system_metrics_interval: float = 0.0  # seconds; 0: no system metrics


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
    store_id: str = Field("", description="The store's identity (infra.storage.store_identity), in cache keys.")

    @property
    def store(self) -> ObjectStore:
        return open_configured_store(self.store_uri, self.aws_credentials_block)


class PhaseOutput(BaseModel):
    """The small reference a phase task returns: where its artifact lives, its digest and its metrics."""

    artifact: dict[str, str]
    metrics: dict[str, float] = {}
    mlflow_run_id: str | None = None  # the MLflow run that made it (None without tracking)

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef.from_dict(self.artifact)

    @property
    def digest(self) -> str:
        return self.artifact["digest"]


def _identity(value: Any) -> Any:
    """What of a task argument belongs in its cache key: configs by content, artifacts by digest."""
    if isinstance(value, PhaseOutput):
        return value.digest
    if hasattr(value, "cache_identity"):  # a config that knows which of its fields decide the output
        return value.cache_identity()
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
    """Prefect ``cache_key_fn``: the phase key of the task's arguments, less the run context except the key prefix
    its artifacts go under and the store's identity. Where the store lives is left out (a moved or copied store
    keeps its identity, and stays cached); which store it is is not: a store that never held the phase's artifact
    misses Prefect's cache and runs the phase once, rather than showing a cached stub and then the phase run again.
    The artifact key itself is the same in any store."""
    inputs = {k: v for k, v in parameters.items() if k not in NOT_IN_CACHE_KEY}
    run = parameters.get("context")
    if run is not None:
        inputs["_prefix"] = run.prefix
        if run.store_id:
            inputs["_store"] = run.store_id
    return f"{context.task.name}-{phase_key(context.task.name, inputs)}"


def is_transient(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from or while handling, is one of :data:`TRANSIENT_ERRORS`
    (MLflow's client, for one, raises its own exception while handling requests' ConnectionError)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, TRANSIENT_ERRORS):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def should_retry(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry only a transient failure (:data:`TRANSIENT_ERRORS`)."""
    error = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(error, DivergenceError) and is_transient(error)


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


def fetch_inputs(
    context: RunContext,
    *,
    data: PhaseOutput,
    policy: PhaseOutput,
    sft: PhaseOutput | None = None,
    reward: PhaseOutput | None = None,
) -> PhaseInputs:
    """Local copies of the artifacts a policy-side phase reads."""
    return PhaseInputs(
        data=fetch(context, data),
        policy=fetch(context, policy),
        sft=fetch(context, sft) if sft is not None else None,
        reward=fetch(context, reward) if reward is not None else None,
    )


def publish(
    context: RunContext,
    key: str,
    local_dir: Path,
    *,
    phase: str,
    config: BaseModel,
    seed: int,
    metrics: dict[str, float],
    parents: dict[str, Any] | None = None,
    iteration: int | None = None,
    mlflow_run_id: str | None = None,
) -> PhaseOutput:
    """Upload a finished artifact folder (manifest last, recording the phase, its iteration, the artifacts it was
    made from, its config, seed and metrics; the MLflow run that made it beside them, outside the digest) and return
    its reference. ``parents`` are store-relative
    keys: the digest covers the metadata, and must not change with where the store lives."""
    metadata = {"phase": phase, "config": config.model_dump(), "seed": seed, "metrics": metrics}
    metadata |= {"parents": parents} if parents is not None else {}
    metadata |= {"iteration": iteration} if iteration is not None else {}
    provenance = {"mlflow_run_id": mlflow_run_id} if mlflow_run_id is not None else None
    ref = upload_dir(context.store, local_dir, key, metadata=metadata, provenance=provenance)
    return PhaseOutput(artifact=ref.to_dict(), metrics=metrics, mlflow_run_id=mlflow_run_id)


def existing_output(context: RunContext, key: str) -> PhaseOutput | None:
    """The artifact already at ``key``, complete, with its recorded metrics (a re-run that finds its
    work done, e.g. after a crash between upload and the task reporting success)."""
    if not is_complete(context.store, key):
        return None
    manifest = read_manifest(context.store, key) or {}
    ref, metadata = ArtifactRef(context.store.full_uri(key), key, manifest["digest"]), manifest.get("metadata", {})
    run_id = manifest.get("provenance", {}).get("mlflow_run_id")
    return PhaseOutput(artifact=ref.to_dict(), metrics=metadata.get("metrics", {}), mlflow_run_id=run_id)


ProgressHook = Callable[[str, int, int], None]
PROGRESS_HOOKS: list[ProgressHook] = []


def phase_task(name: str) -> Callable:
    """The Prefect task settings every phase shares: retried with backoff when the failure may pass,
    cached across flow runs on its inputs' identities, result persisted; run on ``compute.threads`` CPU threads where
    the phase takes a ``compute`` section."""
    from prefect import task
    from prefect.runtime import task_run

    def run_name() -> str:  # "ppo-iteration-2" in the UI; the task's name (part of its cache key) stays "ppo"
        iteration = task_run.parameters.get("iteration")
        return name if iteration is None else f"{name}-iteration-{iteration}"

    settings = task(
        name=name,
        task_run_name=run_name,
        retries=2,
        retry_delay_seconds=[2, 10],
        retry_condition_fn=should_retry,
        cache_key_fn=phase_cache_key,
        persist_result=True,
    )

    def decorate(fn: Callable) -> Any:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def on_configured_threads(*args: Any, **kwargs: Any) -> Any:
            compute = signature.bind(*args, **kwargs).arguments.get("compute")
            with torch_threads(compute.threads if isinstance(compute, ComputeConfig) else None):
                return fn(*args, **kwargs)

        return settings(on_configured_threads)

    return decorate


def make_engine(
    module: Any,
    optimization: Optimization,
    deepspeed: DeepSpeedConfig | None,
    micro_batch_size: int,
    *,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> Engine:
    """Plain torch, or DeepSpeed ZeRO when the pipeline config names a stage: the loops do not know which. With
    ``compute`` (the pipeline's ``compute`` section), the module recomputes its activations in the backward pass
    (``gradient_checkpointing``, under either engine) and, under plain torch, runs in mixed precision (``autocast``;
    under DeepSpeed, ``deepspeed.precision`` does, and the config refuses both)."""
    if compute.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    if deepspeed is None:
        return TorchEngine(module, optimization, autocast=compute.autocast)
    if compute.autocast != "off":
        raise ValueError(f"compute.autocast={compute.autocast} with deepspeed: set deepspeed.precision instead")
    from infra.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(module, deepspeed, optimization, micro_batch_size)


def phase_engine(
    module: Any,
    config: Any,
    total_steps: int,
    deepspeed: DeepSpeedConfig | None,
    *,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> Engine:
    """:func:`make_engine` from a phase config with ``batch_size``, ``lr``, ``warmup_steps``, ``weight_decay``
    and ``max_grad_norm`` (SFT, reward model)."""
    optimization = Optimization(
        lr=config.lr,
        total_steps=total_steps,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
    )
    return make_engine(module, optimization, deepspeed, config.batch_size, compute=compute)


ModuleT = TypeVar("ModuleT", bound=Module)


def at_precision(model: ModuleT, compute: ComputeConfig) -> ModuleT:
    """A model that only runs forward (PPO's and DPO's frozen reference, the reward models, a policy that samples or
    is evaluated) at ``compute.autocast``'s precision, as :class:`TorchEngine` runs the trained ones: both sides of a
    KL, and the sampler and the learner of PPO, at the same precision. Returns ``model``."""
    return autocast_model(model, compute.autocast, default_device())


def frozen_policy(directory: Path, trust_remote_code: bool, compute: ComputeConfig) -> PreTrainedModel:
    """A policy that only samples and is scored (preferences, evaluation), in eval mode, loaded and run as
    ``compute`` says: its attention kernel and :func:`at_precision`."""
    attn = compute.attn_implementation
    return at_precision(load_policy(directory, trust_remote_code, attn_implementation=attn).eval(), compute)


def world_size(deepspeed: DeepSpeedConfig | None) -> int:
    """How many data-parallel processes SFT, the reward model and PPO train in."""
    return deepspeed.num_processes if deepspeed is not None else 1


class PhaseLog:
    """A phase's metrics callback: its step metrics, under their bare names, go to its MLflow child run (``run``,
    None without tracking) in the phase's namespace, and its progress to the progress hooks."""

    def __init__(self, phase: Phase, iteration: int | None, total_steps: int, run: RunLogger | None = None) -> None:
        self.phase, self.total_steps, self.run = phase, total_steps, run
        self.label = phase.run(iteration)
        self.report_progress(0)  # the phase's clock starts now, not at its first report (which may be its last)

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log_metrics(self.phase.namespaced(metrics), step)
        self.report_progress(step)

    def report_progress(self, step: int) -> None:
        for hook in PROGRESS_HOOKS:
            hook(self.label, step, self.total_steps)


@contextmanager
def tracked(
    context: RunContext, phase: Phase, *, iteration: int | None, params: dict[str, Any], total_steps: int = 0
) -> Iterator[PhaseLog]:
    """A metrics callback for one phase: an MLflow child run of the pipeline run (when tracking is on),
    plus progress for whoever listens (the CLI's progress bars)."""
    from infra.tracking import Tracker, system_metrics

    if context.tracking is None:
        yield PhaseLog(phase, iteration, total_steps)
        return
    tracking = context.tracking
    tracker = Tracker(tracking.tracking_uri, tracking.experiment)
    tags = {TAG_CODE_VERSION: code_version()}
    with (
        tracker.run(phase.run(iteration), params=params, parent_run_id=tracking.parent_run_id, tags=tags) as run,
        system_metrics(tracking.tracking_uri, run.run_id, tracking.system_metrics_interval),
    ):
        yield PhaseLog(phase, iteration, total_steps, run)


def phase_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task or flow run (shown in its UI), else the ``rlhf`` logger."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rlhf")


def alarm_reporter(log: PhaseLog) -> Callable[[Alarm], None]:
    """A training-health alarm as a named warning in the phase's log and a tag on its MLflow run."""

    def report(alarm: Alarm) -> None:
        phase_logger().warning(f"{log.label}: alarm {alarm.name} at step {alarm.step}: {alarm.message}")
        if log.run is not None:
            log.run.set_tags({TAG_ALARM.format(name=alarm.name): f"step {alarm.step}: {alarm.message}"})

    return report


def resume_reporter(log: PhaseLog, where: Callable[[], str | None]) -> ResumeHook:
    """What a phase does when it resumes from a checkpoint (``where()``: its location): a warning, a tag on its
    MLflow run, and the step metrics the interrupted attempt logged up to that step carried over, so the history
    has no gap and no duplicate."""
    run = log.run

    def on_resume(step: int, metadata: dict[str, Any]) -> None:
        phase_logger().warning(f"{log.label}: resuming from checkpoint step {step} ({where()})")
        if run is not None:
            run.set_tags({TAG_RESUMED_FROM: step})
            if (previous := metadata.get("mlflow_run_id")) and previous != run.run_id:
                run.copy_history(previous, step)

    return on_resume


@contextmanager
def checkpointing(context: RunContext, key: str, log: PhaseLog, every: int) -> Iterator[StoreCheckpointer]:
    """Resumable checkpoints of the phase whose artifact goes to ``key`` (:func:`resume_reporter` on a restore).
    Cleared once the phase finished; kept, and named, on a divergence."""
    spec = CheckpointSpec(
        store_uri=context.store_uri,
        aws_credentials_block=context.aws_credentials_block,
        artifact_key=key,
        every=every,
        metadata={"mlflow_run_id": log.run.run_id if log.run else None},
    )
    checkpointer = spec.open(resume_reporter(log, lambda: checkpointer.latest_uri))
    try:
        yield checkpointer
    except DivergenceError as e:
        raise DivergenceError(f"{e}; the last good checkpoint is kept: {checkpointer.latest_uri or 'none yet'}") from e
    checkpointer.clear()


@dataclass
class Workspace:
    """What a phase task works with while it runs: its metrics callback, its checkpointer (None when the phase
    does not checkpoint) and a local folder for the artifact it is making."""

    log: PhaseLog
    checkpointer: StoreCheckpointer | None
    out_dir: Path

    @property
    def mlflow_run_id(self) -> str | None:
        return self.log.run.run_id if self.log.run is not None else None


@contextmanager
def phase_workspace(
    context: RunContext,
    phase: Phase,
    key: str,
    *,
    iteration: int | None = None,
    params: dict[str, Any],
    total_steps: int = 0,
    checkpoint_every: int = 0,
) -> Iterator[Workspace]:
    """:func:`tracked`, :func:`checkpointing` (when ``checkpoint_every``) and a temporary artifact folder."""
    with (
        tracked(context, phase, iteration=iteration, params=params, total_steps=total_steps) as log,
        checkpointing(context, key, log, checkpoint_every) if checkpoint_every else nullcontext() as checkpointer,
        tempfile.TemporaryDirectory(prefix=f"rlhf-{phase.namespace}-") as tmp,
    ):
        yield Workspace(log, checkpointer, Path(tmp))
