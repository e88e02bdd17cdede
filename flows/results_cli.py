"""``rlhf export`` and ``rlhf report``: a run's model and its report, read back from MLflow (and the object store)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.console import ConfigOpt, OverridesOpt, console, fail, load_or_exit

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from flows.config import PipelineConfig

LineageOpt = Annotated[str | None, typer.Option("--lineage", help="A lineage: its registered model and runs.")]
RunOpt = Annotated[str | None, typer.Option("--run", help="An MLflow pipeline run id (see the run's summary).")]


def open_tracking(
    config: Path | None, overrides: list[str] | None, lineage: str | None
) -> tuple[PipelineConfig, MlflowClient, str]:
    """The config (with the lineage set) and an MLflow client on its tracking server and registry."""
    from mlflow.tracking import MlflowClient

    extra = [f"lineage={json.dumps(lineage)}"] if lineage is not None else []
    pipeline_config = load_or_exit(config, [*(overrides or []), *extra])
    tracking_uri = pipeline_config.tracking.resolved_uri()
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
    --alias."""
    from mlflow.exceptions import MlflowException

    from infra.credentials import open_configured_store
    from infra.export import ExportError, export_policy
    from infra.export import push_to_hub as push
    from infra.registry import CHAMPION, find_version, registered_model_name
    from infra.report import build_report

    if iteration is not None and alias is not None:
        fail("give --iteration or --alias, not both", 2)
    pipeline_config, client, tracking_uri = open_tracking(config, overrides, lineage)
    runs = chosen_runs(client, pipeline_config, tracking_uri, run) if run else []
    name = registered_model_name(runs[0].data.tags.get("lineage") or None if runs else pipeline_config.lineage)
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
