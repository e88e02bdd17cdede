"""The command line's own surface: --version and the config reference."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_each_phase_bar_keeps_its_own_duration() -> None:
    """Phases report one after another; each bar's clock stops when the next phase starts (or its steps are done),
    and stays where it stopped however many phases follow."""
    from rich.console import Console
    from rich.progress import Progress

    from flows.cli import PhaseBars

    now = [0.0]
    progress = Progress(console=Console(file=open(os.devnull, "w")), get_time=lambda: now[0])  # noqa: SIM115
    bars = PhaseBars(progress)
    schedule = [
        ("sft", 1, 10, 0.0),
        ("sft", 10, 10, 56.0),
        ("iteration-1/preferences", 1, 0, 60.0),
        ("iteration-1/reward", 1, 0, 68.0),
        ("iteration-1/ppo", 40, 40, 86.0),
        ("iteration-1/evaluation", 1, 0, 151.0),
    ]
    for phase, step, total, at in schedule:
        now[0] = at
        bars(phase, step, total)
    now[0] = 400.0  # long after: the clocks must not have moved
    bars.finish()
    elapsed = {task.description: task.finished_time for task in progress.tasks}
    assert elapsed == {
        "sft": 56.0,
        "iteration-1/preferences": 8.0,
        "iteration-1/reward": 18.0,
        "iteration-1/ppo": 0.0,  # its first report was its last step
        "iteration-1/evaluation": 249.0,  # the last phase runs until the pipeline ends
    }


def test_a_phase_bar_starts_when_its_phase_starts() -> None:
    """A phase that reports once, at its end (evaluation), still shows how long it ran: its log announces it."""
    from rich.console import Console
    from rich.progress import Progress

    from flows.cli import PhaseBars
    from infra.catalog import EVALUATION
    from tasks.common import PROGRESS_HOOKS, PhaseLog

    now = [10.0]
    progress = Progress(console=Console(file=open(os.devnull, "w")), get_time=lambda: now[0])  # noqa: SIM115
    bars = PhaseBars(progress)
    PROGRESS_HOOKS.append(bars)
    try:
        log = PhaseLog(EVALUATION, 2, total_steps=0)
        now[0] = 10.5
        log({"win_rate_vs_sft": 0.7}, 2)
        now[0] = 10.75
        PhaseLog(EVALUATION, 3, total_steps=0)
    finally:
        PROGRESS_HOOKS.remove(bars)
    bars.finish()
    elapsed = {task.description: task.finished_time for task in progress.tasks}
    assert elapsed["iteration-2/evaluation"] == 0.75  # from its start at 10.0, not from its report at 10.5


def test_the_phases_late_imports_are_made_early_and_quietly() -> None:
    """What ``rlhf run`` imports while Prefect's server starts: the modules the phases would import as they run,
    without DeepSpeed's import-time warning reaching the terminal (checked in a fresh interpreter)."""
    script = (
        "import sys; from flows.cli import import_phase_dependencies; import_phase_dependencies(); "
        "missing = {'matplotlib.figure', 'deepspeed'} - set(sys.modules); assert not missing, missing"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stdout + done.stderr, done.stdout + done.stderr
