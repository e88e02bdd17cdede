"""``rlhf export`` and ``rlhf report``: a run's model and its report, read back from MLflow (and the object store)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.console import ConfigOpt, OverridesOpt, console, fail, load_or_exit

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from flows.config import PipelineConfig

LineageOpt = Annotated[str | None, typer.Option("--lineage", help="A lineage: its registered model and runs.")]
RunOpt = Annotated[str | None, typer.Option("--run", help="An MLflow pipeline run id (see the run's summary).")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="A registered model: one line of comparable runs (rlhf-...).")
]


def open_tracking(
    config: Path | None, overrides: list[str] | None, lineage: str | None
) -> tuple[PipelineConfig, MlflowClient, str]:
    """The config (with the lineage set) and an MLflow client on its tracking server and registry."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file read clutters the output
    from mlflow.tracking import MlflowClient

    from infra.mlflow_relocation import settle_local_store

    extra = [f"lineage={json.dumps(lineage)}"] if lineage is not None else []
    pipeline_config = load_or_exit(config, [*(overrides or []), *extra])
    tracking_uri = pipeline_config.tracking.resolved_uri()
    settle_local_store(tracking_uri)
    return pipeline_config, MlflowClient(tracking_uri, registry_uri=tracking_uri), tracking_uri


def chosen_runs(client: MlflowClient, config: PipelineConfig, tracking_uri: str, run_id: str | None) -> list[Any]:
    """``--run``'s run; else the lineage's pipeline runs, oldest first; else the experiment's latest pipeline run."""
    from mlflow.exceptions import MlflowException

    from infra.report import pipeline_runs

    if run_id is not None:
        try:
            return [client.get_run(run_id)]
        except MlflowException as e:
            fail(f"--run {run_id}: no such run in {tracking_uri} ({e.message})", 2)
    experiment = client.get_experiment_by_name(config.experiment)
    runs = pipeline_runs(client, experiment.experiment_id, config.lineage) if experiment else []
    if not runs:
        fail(f"no pipeline run in MLflow experiment {config.experiment!r} at {tracking_uri}: run `rlhf run` first", 2)
    return runs if config.lineage else runs[-1:]


WHERE_TO_LOOK = ("tracking.", "storage.")  # --set keys that say where runs are, not which runs


def chosen_line(
    client: MlflowClient, config: PipelineConfig, tracking_uri: str, *, runs: list[Any], asked: bool
) -> str:
    """The registered model (one line of comparable runs) to export from: the run's; else the config's where one
    was asked for (``asked``: --config, --lineage, or --set of anything but where to look); else the only line
    registered. With several lines and nothing to choose by, or a config whose line has no model, it exits 2
    listing the lines: it never picks one across lines."""
    from infra import catalog
    from infra.registry import TAG_LINE, lines

    if runs:
        tag = runs[0].data.tags.get(catalog.TAG_REGISTERED_MODEL)
        if tag:
            return json.loads(tag)["name"]
        lineage = runs[0].data.tags.get(catalog.TAG_LINEAGE)
        return f"rlhf-{lineage}" if lineage else "rlhf"  # registered before lines existed
    found = {model.name: model for model in lines(client)}
    if asked:
        from flows.done import source_store_opener
        from flows.publishing import model_line
        from infra.sources import inputs_digest

        name = model_line(config, inputs_digest(config.data, source_store_opener(config))).name
        if name in found or config.lineage:
            return name
        problem = f"no run of this config's line ({name}) is registered in {tracking_uri}"
    elif len(found) == 1:
        return next(iter(found))
    elif not found:
        fail(f"no registered model of this pipeline in {tracking_uri}: run `rlhf run` first", 2)
    else:
        problem = (
            f"{len(found)} lines of runs are registered in {tracking_uri}, each with its own champion, and their "
            "numbers do not compare across lines"
        )
    listing = [
        f"  {model.name}: "
        + "; ".join(f"{k.removeprefix(TAG_LINE + '.')}: {v}" for k, v in model.tags.items() if k != TAG_LINE)
        for model in found.values()
    ]
    fail(
        f"{problem}; say which: --model NAME, --lineage NAME, --run RUN_ID, or the run's --config/--set. "
        "Registered:\n" + "\n".join(listing),
        2,
    )


def report(
    *,
    config: ConfigOpt = None,
    overrides: OverridesOpt = None,
    lineage: LineageOpt = None,
    run: RunOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Where to write the HTML page.")] = Path("report.html"),
) -> None:
    """Write the report of a run (default: the latest) or of a whole lineage as one self-contained HTML page: the
    iterations' table and plots, gold reward by attribute, sample completions, links to MLflow and Prefect."""
    from infra.report import build_report, render_html

    pipeline_config, client, tracking_uri = open_tracking(config, overrides, lineage)
    page = render_html(build_report(client, chosen_runs(client, pipeline_config, tracking_uri, run), tracking_uri))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(page)
    partial.replace(out)  # whole or not at all
    console.print(f"report: {out}")


def export(
    *,
    out: Annotated[Path, typer.Option("--out", help="A new (or empty) folder for the Hugging Face model.")],
    config: ConfigOpt = None,
    overrides: OverridesOpt = None,
    lineage: LineageOpt = None,
    run: RunOpt = None,
    model: ModelOpt = None,
    iteration: Annotated[int | None, typer.Option(help="The policy of this iteration.")] = None,
    alias: Annotated[
        str | None, typer.Option(help="The version with this alias: champion (default) or newest.")
    ] = None,
    push_to_hub: Annotated[
        str | None, typer.Option("--push-to-hub", metavar="REPO", help="Also upload it to this Hub model repository.")
    ] = None,
) -> None:
    """Write a registered policy as a Hugging Face folder (safetensors, config, tokenizer, generation config) with a
    model card: the champion by default (with --run, that run's final policy), or the version of --iteration or
    --alias, of one line of comparable runs: --model's, --run's, --lineage's or the --config's; with several lines
    registered and none of these given, it asks rather than guesses."""
    from mlflow.exceptions import MlflowException

    from infra.credentials import open_configured_store
    from infra.export import ExportError, export_policy
    from infra.export import push_to_hub as push
    from infra.registry import CHAMPION, find_version
    from infra.report import build_report

    if iteration is not None and alias is not None:
        fail("give --iteration or --alias, not both", 2)
    pipeline_config, client, tracking_uri = open_tracking(config, overrides, lineage)
    runs = chosen_runs(client, pipeline_config, tracking_uri, run) if run else []
    settings = [item.split("=", 1)[0] for item in overrides or []]
    asked = config is not None or lineage is not None or any(not k.startswith(WHERE_TO_LOOK) for k in settings)
    name = model or chosen_line(client, pipeline_config, tracking_uri, runs=runs, asked=asked)
    try:
        if run is not None and alias is None:  # the run's own policy: its last iteration's, or --iteration's
            version = find_version(client, name, iteration=iteration, run_id=run)
        else:
            version = find_version(
                client, name, alias=alias or (CHAMPION if iteration is None else None), iteration=iteration
            )
        storage = pipeline_config.storage
        store = open_configured_store(storage.uri, storage.aws_credentials_block)
        card = build_report(client, [client.get_run(version.run_id)], tracking_uri)
        folder = export_policy(client, version, out, report=card, tracking_uri=tracking_uri, store=store)
    except (LookupError, ExportError, MlflowException) as e:
        fail(e, 2)
    console.print(
        f"exported {name} version {version.version} (iteration {version.tags.get('rlhf.iteration')}) to {folder}"
    )
    if push_to_hub:
        try:
            console.print(f"pushed: {push(folder, push_to_hub)}")
        except Exception as e:  # the Hub's errors (no network, no token, no rights) are the user's to read
            fail(f"--push-to-hub {push_to_hub}: {e}", 1)
