"""What a pipeline run leaves for people, in MLflow and in Prefect: its datasets as run inputs, each iteration's
policy as a logged and registered model (with the champion), Prefect artifacts per iteration under stable keys, and
the report (infra/report.py) in the run's description, its artifacts and a Prefect markdown artifact.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.config import PipelineConfig
from infra import catalog
from infra.artifacts import DEMONSTRATIONS_FILE, PAIRS_FILE, PROMPTS_FILE
from infra.registry import ModelLine, PolicyLocation, Registration, log_policy_model, register_iteration
from infra.report import build_report, figure_png, note_markdown, plot_report, render_html
from infra.storage import ObjectStore, read_manifest
from infra.tracking import DatasetRecord, RunLogger, Tracker
from rlhf_core.alarms import ALARMS
from tasks.common import PhaseOutput, RunContext, fetch

NOTE_TAG = "mlflow.note.content"  # what MLflow's UI shows as the run's description
NOTE_LIMIT = 8000  # MLflow's tag value limit
PLOT_ARTIFACT = "plots/iterations.png"


def prefect_key(line: str, what: str) -> str:
    """A Prefect artifact key that stays the same across a line's runs (``line``: its registered model's name), so
    the UI shows its history."""
    return re.sub(r"[^a-z0-9-]", "-", f"{line}-{what}")


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")[:40] or "model"


def model_line(config: PipelineConfig, inputs: str | None) -> ModelLine:
    """The line of comparable runs ``config`` belongs to (``inputs``: :func:`infra.sources.inputs_digest` of its
    data). A lineage is one line, ``rlhf-<lineage>``. Otherwise runs are comparable when they share the base model,
    the data (the user's files by content, or the toy world with its settings and seed), the judge and the
    evaluation settings: ``rlhf-<base model>-<digest>``. Where files live, and everything about training, is left
    out: those are what a user varies and compares within a line."""
    data = config.data
    about = {
        "base_model": data.base_model or "the toy world's tiny Llama",
        "data": ", ".join(f"{k} {v}" for k, v in data.user_sources.items()) or f"the toy world (seed {config.seed})",
        "judge": data.gold_reward or "the toy world's gold judge",
    }
    if config.lineage:
        about["lineage"] = config.lineage
        name = f"rlhf-{config.lineage}"
        digest = hashlib.sha256(f"lineage={config.lineage}".encode()).hexdigest()
        return ModelLine(name, digest, about)
    identity = data.model_dump(mode="json")
    for field in [*data.user_sources, "base_model", "reward_model"]:  # local content is in ``inputs``, by digest
        if field in data.user_sources or (identity[field] and Path(identity[field]).is_dir()):
            identity[field] = "(by content)"
    identity |= {"seed": config.seed, "inputs": inputs, "evaluation": config.evaluation.model_dump(mode="json")}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    base = "toy-world" if data.base_model is None else _slug(Path(data.base_model.rstrip("/")).name)
    return ModelLine(f"rlhf-{base}-{digest[:8]}", digest, about)


def champion_metric(config: PipelineConfig) -> str:
    """``tracking.champion_metric``, with ``auto`` resolved: people's win rate where they judge, else the gold one."""
    if config.tracking.champion_metric != "auto":
        return config.tracking.champion_metric
    return "human_win_rate_vs_sft" if config.evaluation.human_pairs else "win_rate_vs_sft"


def datasets_of(
    store: ObjectStore,
    output: PhaseOutput,
    files: dict[str, str],
    *,
    context: str,
    origins: dict[str, str] | None = None,
) -> list[DatasetRecord]:
    """A record per file of an artifact that holds one (``file -> dataset name``), digested by its content; its
    source is where the data came from (``origins``, by dataset name: a user's file, hub dataset or bucket), else the
    file in the artifact."""
    table = (read_manifest(store, output.ref.key) or {}).get("files", {})
    origins = origins or {}
    return [
        DatasetRecord(name, table[file]["sha256"][:16], origins.get(name, f"{output.ref.uri}/{file}"), context)
        for file, name in files.items()
        if file in table
    ]


def data_datasets(store: ObjectStore, data: PhaseOutput) -> list[DatasetRecord]:
    """The data artifact's prompts, demonstrations and human preferences, with the sources the user named."""
    names = {"prompts": "prompts", "demonstrations": "demonstrations", "human_preferences": "human-preferences"}
    parents = ((read_manifest(store, data.ref.key) or {}).get("metadata") or {}).get("parents") or {}
    origins = {names[field]: source for field, source in parents.items() if field in names}
    files = {PROMPTS_FILE: "prompts", DEMONSTRATIONS_FILE: "demonstrations", PAIRS_FILE: "human-preferences"}
    return datasets_of(store, data, files, context="training", origins=origins)


def iteration_metrics(result: Any) -> tuple[dict[str, float], dict[str, float]]:
    """The iteration's headline row (the summary table's) and the gold reward's attributes, bare names."""
    evaluation = result.evaluation.metrics
    keys = {name: catalog.EVALUATION.key(name) for name in catalog.EVALUATION_SUMMARY}
    row = {name: evaluation[key] for name, key in keys.items() if key in evaluation}  # no reward without a RM
    if result.state.reward is not None:
        row["rm_val_accuracy"] = result.state.reward.metrics[catalog.REWARD.key("val_accuracy")]
    row["labeler_agreement"] = result.new_preferences.metrics[catalog.PREFERENCES.key("labeler_agreement")]
    if result.human_evaluation is not None:
        row["human_win_rate_vs_sft"] = result.human_evaluation.metrics[catalog.HUMAN_EVALUATION.key("win_rate_vs_sft")]
    prefix = f"{catalog.EVALUATION.namespace}/"
    parts = {
        k.removeprefix(prefix): v
        for k, v in evaluation.items()
        if k.startswith((f"{prefix}gold/", f"{prefix}sft_gold/"))
    }
    return row, parts


def alarms_of(iteration: int, policy: PhaseOutput) -> list[dict[str, Any]]:
    """The training-health alarms a PPO phase raised (``ppo/alarm/<name>``: the step), as summary lines."""
    prefix = catalog.PPO.key("alarm/any").removesuffix("any")
    return [
        {"iteration": iteration, "phase": "ppo", "alarm": key.removeprefix(prefix), "step": int(step)}
        | {"what": ALARMS[key.removeprefix(prefix)]}
        for key, step in policy.metrics.items()
        if key.startswith(prefix)
    ]


def register_policy(
    tracker: Tracker,
    parent: RunLogger,
    *,
    context: RunContext,
    result: Any,
    config: PipelineConfig,
    line: ModelLine,
) -> Registration:
    """Log the iteration's policy as an MLflow model linked to its PPO run, its metrics to the pipeline run and
    against the model, and register it as a version of its line's model (``champion`` if it beats the champion)."""
    iteration, policy = result.state.iteration, result.state.policy
    row, parts = iteration_metrics(result)
    model = log_policy_model(
        tracker.client,
        tracker.experiment_id,
        policy_dir=fetch(context, policy),
        location=PolicyLocation(policy.ref.uri, policy.ref.key, policy.digest),
        iteration=iteration,
        source_run_id=policy.mlflow_run_id,
        pipeline_run_id=parent.run_id,
        copy_weights_max_mb=config.tracking.copy_weights_max_mb,
    )
    parent.log_metrics(catalog.ITERATION.namespaced(row | parts), step=iteration, model_id=model.model_id)
    return register_iteration(
        tracker.client,
        line=line,
        model=model,
        run_id=parent.run_id,
        iteration=iteration,
        metrics=row,
        champion_metric=champion_metric(config),
    )


def iteration_artifacts(
    *,
    line: str,
    history: list[dict[str, float]],
    samples: list[dict[str, Any]],
    mlflow_url: str,
    policy_uri: str,
    registration: Registration,
) -> None:
    """The iteration's Prefect artifacts: the table of all iterations so far, a few samples beside SFT, links to
    the MLflow run and to the policy."""
    iteration = registration.iteration
    create_table_artifact(
        [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in history],
        key=prefect_key(line, "iterations"),
        description=f"Evaluation after each iteration up to {iteration}: win rate and gold reward against the SFT "
        "model, reward-model score (renormalized each iteration), KL, entropy, length, RM accuracy, agreement.",
    )
    lines = [f"# Iteration {iteration}: samples, policy beside SFT", ""]
    for sample in samples[:4]:
        lines += [
            f"**Prompt**: {sample['prompt']}",
            "",
            f"- policy (gold {sample.get('policy_gold', float('nan')):.2f}): {sample['policy']}",
            f"- SFT (gold {sample.get('sft_gold', float('nan')):.2f}): {sample['sft']}",
            "",
        ]
    create_markdown_artifact("\n".join(lines), key=prefect_key(line, "samples"))
    create_link_artifact(mlflow_url, link_text="MLflow pipeline run", key=prefect_key(line, "mlflow-run"))
    create_link_artifact(
        policy_uri,
        link_text=f"policy of iteration {iteration} ({registration.name} version {registration.version})",
        key=prefect_key(line, "policy"),
    )


def publish_report(tracker: Tracker, parent: RunLogger, line: str) -> str:
    """The run's report: its plots and HTML page as artifacts, its Markdown as the run's description and as a
    Prefect artifact. Returns the Markdown."""
    run = tracker.client.get_run(parent.run_id)
    report = build_report(tracker.client, [run], tracker.tracking_uri)
    plot = figure_png(plot_report(report))
    parent.log_png(plot, PLOT_ARTIFACT)
    tracker.client.log_text(parent.run_id, render_html(report, plot), catalog.REPORT_ARTIFACT)
    note = note_markdown(report, NOTE_LIMIT)
    parent.set_tags({NOTE_TAG: note})
    create_markdown_artifact(note, key=prefect_key(line, "report"), description=report.title)
    return note


def run_tags(flow_run_id: str, flow_run_url: str | None, lineage: str | None) -> dict[str, str]:
    """The pipeline run's provenance tags."""
    from infra.codebase import code_version, git_commit

    tags = {
        catalog.TAG_FLOW_RUN: flow_run_id,
        catalog.TAG_LINEAGE: lineage or "",
        catalog.TAG_CODE_VERSION: code_version(),
    }
    if flow_run_url and flow_run_url.startswith(("http://", "https://")):  # Prefect gives "None/..." without a UI URL
        tags[catalog.TAG_FLOW_RUN_URL] = flow_run_url
    tags |= {catalog.TAG_GIT_COMMIT: commit} if (commit := git_commit()) else {}
    return tags


def final_tags(registration: Registration, *, artifacts_uri: str, policy_uri: str) -> dict[str, str]:
    summary = registration.summary()
    return {
        catalog.TAG_REGISTERED_MODEL: json.dumps(summary["registered_model"]),
        catalog.TAG_CHAMPION: json.dumps(summary["champion"]),
        catalog.TAG_ARTIFACTS_URI: artifacts_uri,
        catalog.TAG_POLICY_URI: policy_uri,
    }
