"""The command line's own surface: --version and the config reference."""

from __future__ import annotations

import json
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


def test_the_results_table_never_cuts_a_number_and_says_why_agreement_is_missing() -> None:
    from rich.console import Console

    from flows.cli import summary_table

    row = {"iteration": 1, "win_rate_vs_sft": 0.806, "win_rate_stderr": 0.025, "gold_reward": -1.234, "kl": 12.346}
    row |= {"reward": 10.125, "entropy": 1.234, "response_length": 10.125, "rm_val_accuracy": 0.7}
    row |= {"labeler_agreement": float("nan"), "human_win_rate_vs_sft": 0.5}
    summary = {"sft": {"gold_reward": -12.345}, "iterations": [row, row | {"iteration": 12, "reward": -100.125}]}
    for width in (60, 80, 200):
        console = Console(width=width, record=True, color_system=None)
        for table in summary_table(summary, width):
            console.print(table)
        text = console.export_text()
        assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
        for number in ("0.806", "0.025", "-1.234", "-12.345", "10.125", "-100.125", "12.346", "0.700", "0.500"):
            assert number in text, (width, number)
        assert " nan " not in text and "n/a" in text and "(one labeler)" in " ".join(text.split())


def test_input_refused_while_the_temporary_server_starts_does_not_wait_for_it(tmp_path) -> None:
    """A run refused for its input leaves at once: the temporary Prefect server, still starting on a fresh database,
    is killed rather than waited for (tens of seconds) and then stopped."""
    script = """
import json, psutil
from flows.cli import temporary_prefect_server
try:
    with temporary_prefect_server() as ready:
        starting = not ready(0)
        raise ValueError("bad input")
except ValueError:
    pass
alive = [p.pid for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"]
print(json.dumps({"starting_when_refused": starting, "answered": ready(0), "children": alive}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"starting_when_refused": True, "answered": False, "children": []}, done.stderr[-500:]
