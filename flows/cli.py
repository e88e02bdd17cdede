"""The ``rlhf`` command line."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import logging
import os
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer
import yaml
from pydantic import BaseModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.console import ConfigOpt, OverridesOpt, console, fail, load_or_exit
from flows.label_cli import label_app
from flows.results_cli import export, report
from flows.stack_cli import stack_app

if TYPE_CHECKING:
    from flows.config import PipelineConfig
    from infra.lineage import Lineage


class PrefectReady(Protocol):
    def __call__(self, timeout: float | None = None) -> bool:
        """Whether Prefect answers, waiting at most ``timeout`` seconds for it (None: until it does)."""
        ...


app = typer.Typer(help="The InstructGPT RLHF recipe as a Prefect workflow tracked in MLflow.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
lineage_app = typer.Typer(help="Inspect a lineage or break its stale lock.", no_args_is_help=True)
app.add_typer(lineage_app, name="lineage")
app.add_typer(label_app, name="label")
app.command()(export)
app.command()(report)


def print_version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        print(f"rlhf {version('rlhf-pipeline')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=print_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """RLHF pipeline commands."""


SUMMARY_HEADERS = {
    "iteration": "iter",
    "win_rate_vs_sft": "win vs SFT",
    "win_rate_stderr": "± s.e.",
    "gold_reward": "gold",
    "reward": "RM score",
    "kl": "KL",
    "entropy": "entropy",
    "response_length": "length",
    "rm_val_accuracy": "RM val acc",
    "labeler_agreement": "agreement",
    "human_win_rate_vs_sft": "human win",
}
NO_AGREEMENT = "agreement n/a: no pair was labeled by two labelers (one labeler)"


def _cell(column: str, value: float) -> str:
    return "n/a" if column == "labeler_agreement" and value != value else f"{value:.3f}"  # NaN: nothing overlapped


def summary_table(summary: dict[str, Any], width: int = 80) -> list[Table]:
    """The run's table: a row for SFT and one per iteration, every number whole. Columns that do not fit ``width``
    go into a further table (each with the iteration column), so a number is never cut short."""
    columns = [c for c in SUMMARY_HEADERS if any(c in row for row in summary["iterations"]) or c == "iteration"]
    at_sft = {"win_rate_vs_sft": "0.500", "gold_reward": f"{summary['sft']['gold_reward']:.3f}"}
    rows = [["SFT", *(at_sft.get(c, "-") for c in columns[1:])]]
    rows += [[str(row["iteration"]), *(_cell(c, row[c]) for c in columns[1:])] for row in summary["iterations"]]
    widths = [max(len(SUMMARY_HEADERS[c]), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    groups: list[list[int]] = [[0]]
    used = 4 + widths[0] + 3  # the table's borders and the iteration column with its padding
    for index in range(1, len(columns)):
        if used + widths[index] + 3 > width and len(groups[-1]) > 1:
            groups.append([0])
            used = 4 + widths[0] + 3
        groups[-1].append(index)
        used += widths[index] + 3
    tables = []
    for number, group in enumerate(groups):
        title = "RLHF iterations (evaluation on held-out prompts)" if number == 0 else None
        table = Table(title=title)
        for index in group:
            table.add_column(SUMMARY_HEADERS[columns[index]], justify="right", no_wrap=True, min_width=widths[index])
        for row in rows:
            table.add_row(*(row[index] for index in group))
        tables.append(table)
    if any("n/a" in row for row in rows):
        tables[-1].caption = NO_AGREEMENT
    return tables


class PhaseBars:
    """A progress bar per phase, its clock the phase's own: phases run one after another, so a phase's first report
    stops the clock of the one before (once: stopping a stopped bar again would move its end)."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.bars, self.stopped = progress, {}, set()

    def stop(self, bar: Any) -> None:
        if bar not in self.stopped:
            self.progress.stop_task(bar)
            self.stopped.add(bar)

    def __call__(self, phase: str, step: int, total: int) -> None:
        if phase not in self.bars:
            for bar in self.bars.values():
                self.stop(bar)
            self.bars[phase] = self.progress.add_task(phase, total=total or None)
        self.progress.update(self.bars[phase], completed=step)
        if total and step >= total:
            self.stop(self.bars[phase])

    def finish(self) -> None:
        """Stop every clock and fill every bar (a phase without a step count shows its steps as done)."""
        for bar in self.bars.values():
            self.stop(bar)
            task = next(t for t in self.progress.tasks if t.id == bar)
            self.progress.update(bar, total=task.completed or 1)


def quiet_prefect() -> None:
    """Only warnings from Prefect: the terminal is the progress bars'."""
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _NoTraceback(logging.Filter):
    """Drops the traceback from a console line whose exception is one of ``kinds``: failures the CLI says in full
    itself, so Prefect's line about the failed flow run stays one line (Prefect's UI keeps the traceback)."""

    def __init__(self, kinds: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.kinds):
            record.exc_info, record.exc_text = None, None
        return True


def no_traceback_for(kinds: tuple[type[BaseException], ...]) -> None:
    """Install :class:`_NoTraceback` on Prefect's console handlers (those of the root logger)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(_NoTraceback(kinds))


def quiet_libraries() -> None:
    """Leave the terminal to the progress bars: only warnings from transformers and MLflow (and Prefect)."""
    import mlflow  # noqa: F401  (its import sets its loggers' level: set ours after it)
    import transformers

    quiet_prefect()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def import_phase_dependencies() -> None:
    """Import what the phases import on first use: matplotlib (the report's plot) and DeepSpeed, which accelerate
    imports in a model's first ``save_pretrained`` to tell whether the model is wrapped in one of its engines: together
    about a second of the first run's phases otherwise. Quietly: DeepSpeed warns on import that it found no GPU, which
    concerns its engines, not this import."""
    logging.disable(logging.WARNING)
    try:
        for name in ("matplotlib.figure", "deepspeed"):
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def temporary_prefect_server() -> Iterator[PrefectReady]:
    """Without ``PREFECT_API_URL`` a run talks to a temporary Prefect server of its own, which takes seconds to start
    (tens of seconds on a fresh database): start it now, in a process of its own, while this one loads the pipeline
    and checks its inputs. Yields what tells whether it answers (:class:`PrefectReady`). On exit, Prefect's log and
    event workers are drained into it and it is stopped, as Prefect's own test harness does: left to the
    interpreter's exit, stopping it waits seconds on open connections. Its flow runs send no heartbeats: they tell a
    server that outlives a run which runs crashed, and a flow run's heartbeat thread, which sleeps a second at a
    time, held each of a pipeline run's four flow runs up to a second at its end."""
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        yield lambda timeout=None: True  # a configured server answers
        return
    from prefect.server.api.server import SubprocessASGIServer  # imported here: the thread below imports nothing

    server = SubprocessASGIServer()
    starting = threading.Thread(target=server.start, name="prefect-server-start", daemon=True)
    starting.start()

    def ready(timeout: float | None = None) -> bool:
        starting.join(timeout)
        return not starting.is_alive()

    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield ready
    except BaseException:
        if starting.is_alive():  # refused while the server was still starting (bad input): nothing ran on it
            _abandon(server)
            raise
        _stop(server, starting)
        raise
    _stop(server, starting)


def _stop(server: Any, starting: Any) -> None:
    """Drain Prefect's log and event workers into the temporary server once it has started, then stop it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    starting.join()
    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all(timeout=5)
    server.stop()


def _abandon(server: Any, wait_s: float = 5.0) -> None:
    """Kill a temporary server that is still starting, without waiting for it to answer first (tens of seconds on a
    fresh database): a run refused for its input then fails in seconds. Its starting thread, a daemon, is left
    polling the dead process until the interpreter exits; Prefect's own exit handler for it is dropped, as that
    would pull the process out from under the thread."""
    import time

    deadline = time.monotonic() + wait_s
    while server.server_process is None and time.monotonic() < deadline:  # the thread launches it first thing
        time.sleep(0.05)
    if server.server_process is not None:
        server.server_process.kill()
        server.server_process.wait()
    atexit.unregister(server.stop)


@app.command()
def run(
    *,
    config: ConfigOpt = None,
    overrides: OverridesOpt = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the run summary as JSON here.")] = None,
    verbose: Annotated[bool, typer.Option(help="Show Prefect's logs.")] = False,
    rerun: Annotated[
        bool,
        typer.Option(
            help="Run the flow even when an identical run completed already (its phases then come from Prefect's "
            "cache, and it makes a flow run and an MLflow run of its own)."
        ),
    ] = False,
) -> None:
    """Run the whole pipeline: data, SFT, then N iterations of preferences, reward model, PPO, evaluation. An
    identical run that completed already (same config, code, inputs and MLflow store, its artifacts and MLflow run
    still there) is reported, not run again."""
    pipeline_config = load_or_exit(config, overrides or [])
    if not rerun and report_finished_run(pipeline_config, json_path):
        return
    if not verbose:
        quiet_prefect()
    gc.disable()  # until run_pipeline has imported the pipeline
    try:
        with temporary_prefect_server() as prefect_ready:
            summary = run_pipeline(pipeline_config, prefect_ready, verbose=verbose)
    finally:
        gc.enable()
    show_summary(summary, json_path)


def run_pipeline(config: PipelineConfig, prefect_ready: PrefectReady, *, verbose: bool) -> dict[str, Any]:
    """Check the inputs, then run the flow under progress bars; a failure the message says in full exits without a
    traceback (status 2: bad input; 1: storage, divergence, labels that did not come)."""
    if not verbose:
        quiet_libraries()
    from flows.pipeline import check_inputs, rlhf_pipeline
    from infra.labeling import LabelTimeout
    from infra.storage import StorageError
    from rlhf_core.checkpoint import DivergenceError
    from rlhf_core.judge import JudgeError
    from tasks.common import PROGRESS_HOOKS

    said_in_full = (StorageError, DivergenceError, LabelTimeout, JudgeError)
    if not verbose:
        no_traceback_for(said_in_full)
    if config.storage.aws_credentials_block:  # the checks read the block from Prefect
        prefect_ready()
    try:
        check_inputs(config)
    except (ValueError, StorageError) as e:  # DatasetError included: the file, row and column at fault
        fail(e, 2)
    if not prefect_ready(0):  # still starting: meanwhile, what the phases would otherwise import as they run
        import_phase_dependencies()
    # The imports (from run's start, the collector off) made millions of objects that live as long as the process:
    # the collections they set off freed nothing and took 2.1 s of a run's start-up, and out of the collector's
    # sight they make each full collection during the run milliseconds long.
    gc.freeze()
    gc.enable()
    prefect_ready()
    with Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bars = PhaseBars(progress)
        PROGRESS_HOOKS.append(bars)
        try:
            return rlhf_pipeline(config)
        except said_in_full as e:  # said in full already: no traceback
            fail(e, 1)
        finally:
            PROGRESS_HOOKS.remove(bars)
            bars.finish()


def mlflow_pointers(summary: dict[str, Any]) -> list[str]:
    """Where to look in the MLflow UI: the runs table and the champion, as links that open on the training view (a
    local store: the command that serves it, then the same pages there)."""
    from infra.mlflow_links import LOCAL_UI, mlflow_experiment_url, mlflow_model_version_url

    uri, experiment = summary["mlflow_tracking_uri"], summary.get("mlflow_experiment_id")
    champion = summary.get("champion") or {}
    ui, lines = uri, ["MLflow UI, on its training view:"]
    if not uri.startswith(("http://", "https://")):
        ui = LOCAL_UI
        lines = [f"MLflow UI: run .venv/bin/mlflow ui --backend-store-uri {uri}, then open:"]
    if experiment is not None:
        lines.append(f"  runs: {mlflow_experiment_url(ui, str(experiment))}")
    if champion.get("name"):
        lines.append(f"  champion: {mlflow_model_version_url(ui, champion['name'], str(champion['version']))}")
    return lines


def show_summary(summary: dict[str, Any], json_path: Path | None) -> None:
    """A run's table, where its results are, and its summary as JSON at ``json_path``."""
    for table in summary_table(summary, console.width):
        console.print(table)
    console.print(
        f"artifacts: {summary['artifacts_uri']}\nMLflow: {summary['mlflow_tracking_uri']} "
        f"(run {summary['mlflow_run_id']})\nPrefect flow run: {summary['prefect_flow_run_id']}",
        markup=False,
        highlight=False,
    )
    for line in mlflow_pointers(summary):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2))


def report_finished_run(config: PipelineConfig, json_path: Path | None) -> bool:
    """Show an identical run that completed already (:func:`flows.done.finished_run`) and say so; False where there
    is none, or where the inputs or a passing storage fault stand in the way (the run itself then says what is
    wrong). A store that cannot work at all (no such bucket, access denied) exits here, with status 2."""
    from flows.done import finished_run
    from infra.storage import ObjectNotFoundError, StorageError, TransientStorageError

    try:
        record, why = finished_run(config)
    except (ObjectNotFoundError, TransientStorageError, ValueError, OSError):
        return False
    except StorageError as e:  # a missing bucket, denied access: the run would stop on it too, after a second request
        fail(e, 2)
    if record is None:
        console.print(f"running: {why}")
        return False
    summary = record.summary | {"up_to_date": True, "phases": dict.fromkeys(record.summary["phases"], "Up to date")}
    console.print(
        f"up to date: this config, code and data completed at {record.finished_at} (Prefect flow run "
        f"{summary['prefect_flow_run_id']}), and its artifacts and MLflow run are all still there: nothing to run "
        "(--rerun runs the flow anyway, every phase from Prefect's cache)"
    )
    show_summary(summary, json_path)
    return True


@app.command()
def serve(
    *,
    config: ConfigOpt = None,
    overrides: OverridesOpt = None,
    name: Annotated[str | None, typer.Option(help="Deployment name (default: the lineage, else 'rlhf').")] = None,
    cron: Annotated[str | None, typer.Option(help="Cron schedule, e.g. '0 3 * * *' (daily at 03:00 UTC).")] = None,
    interval: Annotated[float | None, typer.Option(help="Schedule a run every this many seconds.")] = None,
    lineage: Annotated[
        str | None, typer.Option(help="Continue this lineage on every run (same as --set lineage=NAME).")
    ] = None,
) -> None:
    """Register the pipeline as a Prefect deployment (this config as its default parameters) and serve it:
    scheduled runs and runs started from the UI or `prefect deployment run` execute here until Ctrl-C."""
    from infra.deployments import DeploymentError, build_deployment
    from infra.deployments import serve as serve_deployments

    extra = [f"lineage={json.dumps(lineage)}"] if lineage is not None else []  # quoted: a YAML string even if "2024"
    pipeline_config = load_or_exit(config, [*(overrides or []), *extra])
    from flows.pipeline import rlhf_pipeline

    lineage_name = pipeline_config.lineage
    try:
        deployment = build_deployment(
            rlhf_pipeline,
            pipeline_config,
            name=name or lineage_name or "rlhf",
            cron=cron,
            interval=interval,
            tags=["rlhf", *([f"lineage:{lineage_name}"] if lineage_name else [])],
            concurrency_limit=1 if lineage_name else None,  # runs of one lineage queue rather than meet its lock
        )
        serve_deployments(deployment)
    except DeploymentError as e:
        fail(e, 2)


def _lineage(name: str, pipeline_config: PipelineConfig) -> Lineage:
    from infra.credentials import open_configured_store
    from infra.lineage import Lineage

    storage = pipeline_config.storage
    try:
        return Lineage(open_configured_store(storage.uri, storage.aws_credentials_block), storage.prefix, name)
    except ValueError as e:
        fail(e, 2)


@lineage_app.command("show")
def lineage_show(
    name: Annotated[str, typer.Argument(help="Lineage name.")],
    config: ConfigOpt = None,
    overrides: OverridesOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="The pointer and the lock, whole, as JSON.")] = False,
) -> None:
    """Where the lineage stands, in a few lines: its iterations, latest policy, champion, last run, lock, and the
    store it was looked up in. A lineage the store does not know is an error naming the store (exit 2)."""
    pipeline_config = load_or_exit(config, overrides or [])
    lineage = _lineage(name, pipeline_config)
    described = lineage.describe()
    latest, lock = described["latest"], described["lock"]
    where = lineage.store.full_uri(lineage.key.rsplit("/", 1)[0] + "/")
    if latest is None and lock is None:
        fail(
            f"lineage {name!r} not found in {where} (no latest.json, no lock): a lineage appears there once its first "
            "run completes. Runs on another store? Name it with --set storage.uri=... or RLHF_STORAGE_URI",
            2,
        )
    if as_json:
        print(json.dumps(described, indent=2))
        return
    console.print(f"lineage {name}  (looked up in {where})", markup=False, highlight=False)
    if latest is None:
        console.print("  iterations: none completed yet", markup=False, highlight=False)
    else:
        shown = {
            "iterations": f"{latest['iteration']} completed; a next run starts at iteration {latest['iteration'] + 1}",
            "latest policy": latest["policy"]["artifact"]["uri"],
            "last run": f"{latest.get('updated_at', '?')}: Prefect flow run {latest.get('flow_run_id') or '-'}, "
            f"MLflow run {latest.get('mlflow_run_id') or '-'}",
            "champion": _lineage_champion(name, pipeline_config.tracking.resolved_uri()),
        }
        for label, value in shown.items():
            console.print(f"  {label}: {value}", markup=False, highlight=False)
    held = "free"
    if lock:
        held = f"held by {lock['holder']} since {lock['created_at']} (flow run {lock['flow_run_id'] or '-'})"
    console.print(f"  lock: {held}", markup=False, highlight=False)


def _lineage_champion(name: str, tracking_uri: str) -> str:
    """The lineage's champion version in the MLflow registry at ``tracking_uri``, or why it cannot be told."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from infra.registry import CHAMPION, TAG_ITERATION, find_version

    try:
        version = find_version(MlflowClient(tracking_uri, registry_uri=tracking_uri), f"rlhf-{name}", alias=CHAMPION)
    except (LookupError, MlflowException, OSError) as e:
        return f"none found in {tracking_uri} ({str(e).splitlines()[0][:120]})"
    return f"rlhf-{name} version {version.version} (iteration {version.tags.get(TAG_ITERATION, '?')})"


@lineage_app.command("unlock")
def lineage_unlock(
    name: Annotated[str, typer.Argument(help="Lineage name.")], config: ConfigOpt = None, overrides: OverridesOpt = None
) -> None:
    """Break the lineage's lock, left behind by a run that crashed or was killed. Make sure it is not running."""
    former = _lineage(name, load_or_exit(config, overrides or [])).unlock()
    if former is None:
        console.print(f"lineage {name!r} was not locked")
    else:
        console.print(f"lineage {name!r} unlocked (was held by {former.holder}, flow run {former.flow_run_id or '-'})")


def optional_section(annotation: Any) -> type[BaseModel] | None:
    """``X`` for a field typed ``X | None`` where ``X`` is a config section, else None."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
        return members[0]
    return None


def config_reference(model: type[BaseModel] | None = None, indent: str = "") -> list[str]:
    """The default config as commented YAML: every field with its description."""
    from flows.config import PipelineConfig

    model = model or PipelineConfig
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += [f"{indent}# {field.description}", f"{indent}{name}:"]
            lines += config_reference(annotation, indent + "  ")
            continue
        section = optional_section(annotation)
        if section is not None and field.default is None:  # off by default: its fields, commented out
            lines.append(f"{indent}{name + ': null':<40} # {field.description}")
            lines += [f"{indent}# {line}" for line in [f"{name}:", *config_reference(section, "  ")]]
            continue
        if field.is_required():  # a field of an optional section that has no default: the user picks it
            value = f"{name}: <required>"
        else:
            default = field.get_default(call_default_factory=True)
            if isinstance(default, list):
                default = [v.model_dump() if isinstance(v, BaseModel) else v for v in default]
            value = yaml.safe_dump({name: default}, default_flow_style=True, width=1000).strip()[1:-1]
        lines.append(f"{indent}{value:<40} # {field.description}")
    return lines


@app.command()
def config() -> None:
    """Print the default config, every field with its description (a starting point for --config)."""
    print("\n".join(config_reference()))


def entry_point() -> None:
    """The ``rlhf`` command: :data:`app`, then an exit that skips what is left of Python's own once every exit handler
    has run and every non-daemon thread has been joined: its teardown, which garbage-collects the objects of every
    module torch, transformers, MLflow and Prefect loaded (3 s after a pipeline run, measured). Registered before any
    other handler, the exit runs after all of them; an uncaught exception, or an exit with a message, takes Python's
    usual way out."""
    status: list[int] = []

    def exit_now() -> None:
        if status:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status[0])

    atexit.register(exit_now)
    try:
        app()
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            status.append(exit_.code or 0)
        raise
    status.append(0)


if __name__ == "__main__":
    entry_point()
