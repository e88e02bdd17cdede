"""The MLflow links we print open on the training view, for real: a real MLflow server, the links our helpers make,
and headless Chromium rendering them. MLflow 3's UI otherwise opens an experiment on its GenAI view ("Traces", "No
data available"), where a pipeline's runs do not show."""

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_stack import free_ports

from flows.cli import mlflow_pointers
from infra.mlflow_links import mlflow_experiment_url, mlflow_model_version_url, mlflow_run_url
from infra.registry import ModelLine, PolicyLocation, log_policy_model, register_iteration
from infra.tracking import Tracker

pytestmark = pytest.mark.slow


def visible_text(url: str) -> str:
    """The page's text once its single-page app has rendered, as headless Chromium sees it."""
    chromium = shutil.which("chromium")
    assert chromium, "needs Debian's chromium: `make test` installs it (apt-get install chromium)"
    browse = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1000"]
    dom = subprocess.run(
        [*browse, "--virtual-time-budget=15000", "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


@pytest.fixture
def mlflow_server(tmp_path):
    (port,) = free_ports(1)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(db, "rlhf")  # the experiment as the pipeline makes it, before the server serves it
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", db]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_links_we_print_open_on_the_runs_and_the_champion(mlflow_server, tmp_path):
    tracker = Tracker(mlflow_server, "rlhf")
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text("{}")
    with tracker.run("pipeline-rlhf-2026-12-07T00-00") as parent:
        model = log_policy_model(
            tracker.client,
            tracker.experiment_id,
            policy_dir=policy,
            location=PolicyLocation("file:///store/policy", "policy", "d1g3st"),
            iteration=1,
            source_run_id=None,
            pipeline_run_id=parent.run_id,
            copy_weights_max_mb=0,
        )
        line = ModelLine("rlhf-toy-world-0a1b2c3d", "0" * 64, {"data": "the toy world (seed 0)"})
        registration = register_iteration(
            tracker.client,
            line=line,
            model=model,
            run_id=parent.run_id,
            iteration=1,
            metrics={"win_rate_vs_sft": 0.8},
            champion_metric="win_rate_vs_sft",
        )

    # what `rlhf run` prints under its table, the links taken from its lines
    summary = {"mlflow_tracking_uri": mlflow_server, "mlflow_experiment_id": tracker.experiment_id}
    summary |= registration.summary()
    printed = dict(line.strip().split(": ", 1) for line in mlflow_pointers(summary)[1:])
    assert printed == {
        "runs": mlflow_experiment_url(mlflow_server, tracker.experiment_id),
        "champion": mlflow_model_version_url(mlflow_server, line.name, registration.champion_version),
    }
    experiment = visible_text(printed["runs"])
    assert "Run Name" in experiment and "pipeline-rlhf-2026-12-07T00-00" in experiment, experiment[:2000]
    assert "No data available" not in experiment  # not the GenAI overview
    bare = visible_text(f"{mlflow_server}/#/experiments/{tracker.experiment_id}")
    assert "Run Name" not in bare and "No data available" in bare  # what a link without the view opens on

    run = visible_text(mlflow_run_url(mlflow_server, tracker.experiment_id, parent.run_id))
    assert "pipeline-rlhf-2026-12-07T00-00" in run and "Model registry" in run
    champion = visible_text(printed["champion"])
    assert f"Version {registration.champion_version}" in champion and "champion" in champion, champion[:2000]
