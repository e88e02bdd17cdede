"""What the command line's commands share: where they write (results and progress to stdout, errors to stderr as
plain text) and the config options."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from flows.config import PipelineConfig

console = Console(soft_wrap=True)  # long messages and paths stay whole, for copying
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
OverridesOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config field, e.g. ppo.lr=1e-4 (repeatable)."),
]


def fail(error: BaseException | str, code: int) -> NoReturn:
    """Print ``error: <message>`` to stderr, as written (no markup), and exit with ``code``."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def load_or_exit(config: Path | None, overrides: list[str] | None) -> PipelineConfig:
    """The validated config, or exit code 2 with the message that names the bad key."""
    from flows.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        fail(e, 2)
