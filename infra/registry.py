"""The model registry: each iteration's policy as an MLflow ``LoggedModel`` linked to its PPO run, and a version of
its line's registered model with the aliases ``newest`` (always) and ``champion`` (only when the iteration beats the
current champion on the configured metric).

A line (:class:`ModelLine`) is a set of runs whose numbers can be compared: the same base model, data and judge,
evaluated the same way. Each line has its own registered model and champion, so a run on one dataset never takes
the champion of another, and ``rlhf export`` never hands back a model of an unrelated run.

Weights: a policy up to ``copy_weights_max_mb`` is copied into MLflow whole, so MLflow alone can serve it; a larger
one is logged without its weight files and found by its object-store location, recorded on the model and version as
``rlhf.policy_uri`` (``rlhf export`` fetches it from there through the project's store and its credentials, the one
way every phase reads artifacts). MLflow could resolve an ``s3://`` source itself, but only with credentials of its
own, and an MLflow server refuses a local-folder source outside the run's artifacts.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

# MLflow reserves the alias "latest" (``models:/<name>/latest`` already means the newest version): ours is "newest".
NEWEST, CHAMPION = "newest", "champion"
TAG_ITERATION = "rlhf.iteration"
TAG_POLICY_URI = "rlhf.policy_uri"
TAG_POLICY_KEY = "rlhf.policy_key"
TAG_POLICY_DIGEST = "rlhf.policy_digest"
TAG_WEIGHTS = "rlhf.weights"  # "in MLflow" or "in the object store only"
TAG_PIPELINE_RUN = "rlhf.pipeline_run_id"
METRIC_TAG = "rlhf.metric.{name}"  # a version's evaluation metrics, what the champion is compared on
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NOT_IN_AN_EXPORT = ("MANIFEST.json", ".complete")  # the store's bookkeeping, not the model's


TAG_LINE = "rlhf.line"  # on a registered model: its line's digest; rlhf.line.<what> say what the line holds


@dataclass(frozen=True)
class ModelLine:
    """A line of comparable runs: one registered model (``name``) and one champion. ``digest`` identifies it;
    ``about`` says what it holds (base model, data, judge, lineage), for people choosing between lines."""

    name: str
    digest: str
    about: dict[str, str]

    def tags(self) -> dict[str, str]:
        return {TAG_LINE: self.digest, **{f"{TAG_LINE}.{k}": v for k, v in self.about.items()}}

    def description(self) -> str:
        held = "; ".join(f"{k}: {v}" for k, v in self.about.items())
        return f"RLHF policies, a version per pipeline iteration, of one line of comparable runs ({held})."


def lines(client: MlflowClient) -> list:
    """The registered models that are lines of runs (made by this pipeline), by name."""
    found = [m for m in client.search_registered_models(max_results=1000) if TAG_LINE in m.tags]
    return sorted(found, key=lambda m: m.name)


@dataclass(frozen=True)
class PolicyLocation:
    """Where a policy artifact lives in the object store."""

    uri: str
    key: str
    digest: str


@dataclass(frozen=True)
class Registration:
    """One iteration's registered version and the champion after it (what the pipeline's summary reports)."""

    name: str
    version: str
    model_id: str
    iteration: int
    alias: str  # "champion" when this version took it, else "newest"
    champion_version: str
    champion_iteration: int
    metric: str
    value: float

    def summary(self) -> dict[str, dict]:
        """The summary JSON's ``registered_model`` and ``champion`` entries."""
        return {
            "registered_model": {"name": self.name, "version": self.version, "alias": self.alias},
            "champion": {
                "name": self.name,
                "version": self.champion_version,
                "iteration": self.champion_iteration,
                "metric": self.metric,
                "value": self.value,
            },
        }


def _model_files(policy_dir: Path, *, copy_weights: bool) -> Path:
    """A temporary copy of the policy folder without the store's bookkeeping (and without weights unless asked)."""
    staged = Path(tempfile.mkdtemp(prefix="rlhf-model-"))
    for path in policy_dir.rglob("*"):
        rel = path.relative_to(policy_dir)
        if path.is_dir() or rel.name in _NOT_IN_AN_EXPORT or (not copy_weights and path.suffix in WEIGHT_SUFFIXES):
            continue
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, staged / rel)
    return staged


def weights_mb(policy_dir: Path) -> float:
    return sum(p.stat().st_size for p in policy_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES) / 2**20


def log_policy_model(
    client: MlflowClient,
    experiment_id: str,
    *,
    policy_dir: Path,
    location: PolicyLocation,
    iteration: int,
    source_run_id: str | None,
    pipeline_run_id: str,
    copy_weights_max_mb: float,
) -> LoggedModel:
    """The policy as a READY ``LoggedModel`` named ``policy-iteration-<k>``, linked to the run that trained it."""
    copy_weights = weights_mb(policy_dir) <= copy_weights_max_mb
    if source_run_id is not None:
        try:
            client.get_run(source_run_id)
        except MlflowException:  # trained under another tracking server, and found in the cache
            source_run_id = None
    tags = {
        TAG_ITERATION: str(iteration),
        TAG_POLICY_URI: location.uri,
        TAG_POLICY_KEY: location.key,
        TAG_POLICY_DIGEST: location.digest,
        TAG_WEIGHTS: "in MLflow" if copy_weights else "in the object store only",
        TAG_PIPELINE_RUN: pipeline_run_id,
    }
    model = client.create_logged_model(
        experiment_id, name=f"policy-iteration-{iteration}", source_run_id=source_run_id, tags=tags, model_type="policy"
    )
    staged = _model_files(policy_dir, copy_weights=copy_weights)
    try:
        client.log_model_artifacts(model.model_id, str(staged))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


STDERR_OF = {"win_rate_vs_sft": "win_rate_stderr"}  # a champion metric -> the metric that holds its standard error


def beats(metrics: dict[str, float], champion_tags: dict[str, str], metric: str) -> bool:
    """Whether an iteration's ``metric`` is higher than the champion's (read from its version's tags) by more than the
    standard error of their difference, where the metric has one: a policy must not take the champion by the luck
    of one evaluation's draw."""
    held = float(champion_tags[METRIC_TAG.format(name=metric)])
    stderr = STDERR_OF.get(metric)
    new_error = float(metrics.get(stderr, 0.0)) if stderr else 0.0
    held_error = float(champion_tags.get(METRIC_TAG.format(name=stderr), 0.0)) if stderr else 0.0
    return float(metrics[metric]) - held > math.hypot(new_error, held_error)


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code not in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), "INVALID_PARAMETER_VALUE"):
            raise
        return None


def register_iteration(
    client: MlflowClient,
    *,
    line: ModelLine,
    model: LoggedModel,
    run_id: str,
    iteration: int,
    metrics: dict[str, float],
    champion_metric: str,
) -> Registration:
    """A new version of the line's registered model for ``model``, aliased ``newest``, and ``champion`` when its
    ``champion_metric`` is higher than the current champion's by more than the standard error (:func:`beats`), or
    there is none, or the champion has no value for that metric."""
    if champion_metric not in metrics:
        raise ValueError(
            f"tracking.champion_metric={champion_metric!r}: the iteration has no such metric (it has {sorted(metrics)})"
        )
    name = line.name
    try:
        client.create_registered_model(name, tags=line.tags(), description=line.description())
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        if TAG_LINE not in client.get_registered_model(name).tags:  # a lineage's model made before lines existed
            for key, value in line.tags().items():
                client.set_registered_model_tag(name, key, value)
    tags = {TAG_ITERATION: str(iteration), **{METRIC_TAG.format(name=k): repr(float(v)) for k, v in metrics.items()}}
    tags |= {k: v for k, v in model.tags.items() if k.startswith("rlhf.policy")}
    # The model's artifact location, not "models:/<id>": MLflow's SQL registry resolves that through the global
    # tracking URI rather than this client's.
    version = client.create_model_version(
        name, source=model.artifact_location, run_id=run_id, tags=tags, model_id=model.model_id
    ).version
    client.set_registered_model_alias(name, NEWEST, version)
    value = float(metrics[champion_metric])
    current = _champion(client, name)
    held = current.tags.get(METRIC_TAG.format(name=champion_metric)) if current is not None else None
    if held is None or beats(metrics, current.tags, champion_metric):
        client.set_registered_model_alias(name, CHAMPION, version)
        return Registration(
            name, str(version), model.model_id, iteration, CHAMPION, str(version), iteration, champion_metric, value
        )
    return Registration(
        name,
        str(version),
        model.model_id,
        iteration,
        NEWEST,
        str(current.version),
        int(current.tags[TAG_ITERATION]),
        champion_metric,
        float(held),
    )


def find_version(
    client: MlflowClient,
    name: str,
    *,
    alias: str | None = None,
    iteration: int | None = None,
    run_id: str | None = None,
):
    """The version of ``name`` with ``alias``, or the newest one registered (by pipeline run ``run_id``, where given)
    for ``iteration``; LookupError says what exists."""
    if alias is not None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            raise LookupError(f"registered model {name!r} has no version with alias {alias!r}: {e.message}") from e
    versions = client.search_model_versions(f"name = '{name}'")
    if run_id is not None:
        versions = [v for v in versions if v.run_id == run_id]
    if not versions:
        what = f"run {run_id} registered no version of {name!r}" if run_id else f"no registered model {name!r}"
        raise LookupError(what)
    matching = [v for v in versions if iteration is None or v.tags.get(TAG_ITERATION) == str(iteration)]
    if not matching:
        have = sorted({int(v.tags[TAG_ITERATION]) for v in versions if TAG_ITERATION in v.tags})
        whose = f" from run {run_id}" if run_id else ""
        raise LookupError(f"{name!r} has no version{whose} for iteration {iteration} (it has {have})")
    return max(matching, key=lambda v: int(v.version))
