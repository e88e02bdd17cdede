"""``rlhf stack``: the local service stack (``infra/stack.py``) from the command line."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.console import console, fail
from infra.stack import DEFAULT_STATE, ORDER, Service, StackError, stack_down, stack_env, stack_status, stack_up

stack_app = typer.Typer(
    help="A local Prefect server, MLflow server and S3 endpoint for development.", no_args_is_help=True
)
StateOpt = Annotated[Path, typer.Option("--state-dir", help="Folder for pid files, logs and server state.")]


def _ui_table(services: dict[str, Service]) -> Table:
    table = Table(title="RLHF dev stack")
    for column in ("service", "address", "pid", "state"):
        table.add_column(column)
    labels = {"prefect": "Prefect UI", "mlflow": "MLflow UI", "s3": "S3 endpoint", "label-studio": "Label Studio"}
    for name in ORDER:
        if service := services.get(name):
            table.add_row(labels[name], service.url, str(service.pid or "-"), service.status)
    return table


@stack_app.command()
def up(
    state_dir: StateOpt = DEFAULT_STATE,
    *,
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    s3_port: Annotated[int, typer.Option(help="Port of the moto S3 server.")] = 9000,
    s3_endpoint: Annotated[
        str | None, typer.Option(help="Use this S3 endpoint (MinIO, AWS) instead of starting moto.")
    ] = None,
    bucket: Annotated[str, typer.Option(help="Bucket for MLflow artifacts and pipeline storage.")] = "rlhf-artifacts",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each service to become healthy.")] = 120,
    labeling: Annotated[
        bool, typer.Option(help="Also start Label Studio (its own virtualenv, made on first use: ~2 min, 1 GB).")
    ] = False,
    label_studio_port: Annotated[int, typer.Option(help="Label Studio port.")] = 8080,
) -> None:
    """Start the stack (services already running are left alone) and print the environment to export."""
    try:
        with console.status("starting services..."):
            services = stack_up(
                state_dir,
                prefect_port=prefect_port,
                mlflow_port=mlflow_port,
                s3_port=s3_port,
                s3_endpoint=s3_endpoint,
                bucket=bucket,
                timeout=timeout,
                labeling=labeling,
                label_studio_port=label_studio_port,
            )
    except StackError as e:
        fail(e, 1)
    console.print(_ui_table(services))
    for service in services.values():
        if service.note:
            console.print(f"{service.name}: {service.note}", markup=False, highlight=False)
    for key, value in stack_env(state_dir).items():
        print(f"export {key}={shlex.quote(value)}")


@stack_app.command()
def down(
    state_dir: StateOpt = DEFAULT_STATE,
    timeout: Annotated[float, typer.Option(help="Seconds to wait after SIGTERM before SIGKILL.")] = 20,
) -> None:
    """Stop the processes that `up` started."""
    stopped = stack_down(state_dir, timeout)
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack_app.command()
def status(state_dir: StateOpt = DEFAULT_STATE) -> None:
    """Show each recorded service; exit code 0 only when all are alive and healthy."""
    report = stack_status(state_dir)
    table = Table(title="RLHF dev stack")
    for column in ("service", "pid", "alive", "healthy", "address"):
        table.add_column(column)
    for name, row in report.items():
        table.add_row(name, str(row["pid"]), _mark(row["alive"]), _mark(row["healthy"]), row["url"])
    console.print(table if report else f"no services recorded in {state_dir}")
    raise typer.Exit(0 if report and all(row["healthy"] for row in report.values()) else 1)


def _mark(ok: bool) -> str:
    return "[green]yes[/green]" if ok else "[red]no[/red]"
