"""The ``rlhf`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infra.stack import stack_app

app = typer.Typer(help="The InstructGPT RLHF recipe as a Prefect workflow tracked in MLflow.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
console = Console()


@app.callback()
def main() -> None:
    """RLHF pipeline commands."""


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="RLHF iterations (evaluation on held-out prompts)")
    headers = {
        "iteration": "iter",
        "win_rate_vs_sft": "win vs SFT",
        "gold_reward": "gold",
        "reward": "RM score",
        "kl": "KL",
        "entropy": "entropy",
        "response_length": "length",
        "rm_val_accuracy": "RM val acc",
        "labeler_agreement": "agreement",
    }
    columns = list(headers)
    for column in columns:
        table.add_column(headers[column], justify="right")
    table.add_row("SFT", "0.500", f"{summary['sft']['gold_reward']:.3f}", *["-"] * (len(columns) - 3))
    for row in summary["iterations"]:
        table.add_row(str(row["iteration"]), *(f"{row[c]:.3f}" for c in columns[1:]))
    return table


def quiet_libraries() -> None:
    """Leave the terminal to the progress bars: only warnings from Prefect, transformers and MLflow."""
    import logging

    import transformers

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override: section.key=value.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the run summary as JSON here.")] = None,
    verbose: Annotated[bool, typer.Option(help="Show Prefect's logs.")] = False,
) -> None:
    """Run the whole pipeline: data, SFT, then N iterations of preferences, reward model, PPO, evaluation."""
    from flows.config import ConfigError, load_config

    try:
        pipeline_config = load_config(config, overrides or [])
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if not verbose:
        quiet_libraries()
    from flows.pipeline import rlhf_pipeline
    from tasks.common import PROGRESS_HOOKS

    with Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bars: dict[str, Any] = {}

        def on_progress(phase: str, step: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = progress.add_task(phase, total=total or None)
            progress.update(bars[phase], completed=step)

        PROGRESS_HOOKS.append(on_progress)
        try:
            summary = rlhf_pipeline(pipeline_config)
        finally:
            PROGRESS_HOOKS.remove(on_progress)
            for bar in bars.values():
                progress.update(bar, total=progress.tasks[bar].completed or 1)
    console.print(summary_table(summary))
    console.print(
        f"artifacts: {summary['artifacts_uri']}\nMLflow: {summary['mlflow_tracking_uri']} "
        f"(run {summary['mlflow_run_id']})\nPrefect flow run: {summary['prefect_flow_run_id']}"
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2))


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


if __name__ == "__main__":
    app()
