"""The command line's own surface: --version and the config reference."""

from __future__ import annotations

from importlib.metadata import version

import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.config import PipelineConfig


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"rlhf {version('rlhf-pipeline')}"


def test_config_reference_is_the_default_config_and_shows_optional_sections() -> None:
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert PipelineConfig.model_validate(yaml.safe_load(result.output)) == PipelineConfig()
    lines = result.output.splitlines()
    # Sections that are off by default (null) still show the fields a user can set, commented out.
    assert lines[lines.index("# deepspeed:") + 1].startswith("#   zero_stage:")
    assert any(line.startswith("  #   r: 8 ") for line in lines)
