"""Where the command line writes: results and progress to stdout, errors to stderr as plain text."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console

console = Console()


def fail(error: BaseException | str, code: int) -> NoReturn:
    """Print ``error: <message>`` to stderr, as written (no markup), and exit with ``code``."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise typer.Exit(code)
