"""Label Studio in the loop, for real: ``rlhf stack up --labeling`` starts Label Studio beside Prefect, MLflow and
S3; a run with ``preferences.label_studio`` imports its batch as tasks and waits; two people annotate every task
(through Label Studio's API, as its UI does); the run takes their annotations, with their emails as labelers, and
finishes; ``stack down`` stops Label Studio with the rest."""

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_flow import RLHF, TINY, summary
from test_stack import free_ports

from infra.pinned_env import LOCKS, cache_dir
from infra.stack import LABEL_STUDIO, LABEL_STUDIO_VENV_ENV, StackError, stack_down, stack_env, stack_up

pytestmark = pytest.mark.slow


class API:
    """Label Studio's REST API as the stack's admin (a legacy token), for what people do in its UI."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def __call__(self, method: str, path: str, body=None, **query):
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Authorization": f"Token {self.token}", "Content-Type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=120) as r:
            payload = r.read()
        return json.loads(payload) if payload else None


def annotation(choice: str, strength: int | None) -> list[dict]:
    result = [{"from_name": "choice", "to_name": "prompt", "type": "choices", "value": {"choices": [choice]}}]
    if strength:
        result.append({"from_name": "strength", "to_name": "prompt", "type": "rating", "value": {"rating": strength}})
    return result


@pytest.fixture
def label_studio_venv(monkeypatch) -> Path:
    """Label Studio's venv, kept across test runs (installing it takes minutes): rebuilt by the stack only when its
    lock changes."""
    venv = Path(os.environ.get(LABEL_STUDIO_VENV_ENV) or cache_dir() / "label-studio-1.23.2")
    monkeypatch.setenv(LABEL_STUDIO_VENV_ENV, str(venv))
    return venv


def test_label_studio_that_cannot_start_is_named_with_its_log_venv_and_pins(tmp_path, label_studio_venv):
    state = tmp_path / "stack"
    state.mkdir()
    (state / "label-studio").write_text("a file where Label Studio's data folder goes")
    prefect, mlflow, s3, studio = free_ports(4)
    with pytest.raises(StackError) as failed:
        stack_up(
            state, prefect_port=prefect, mlflow_port=mlflow, s3_port=s3, label_studio_port=studio, labeling=True,
            timeout=300,
        )  # fmt: skip
    message = str(failed.value)
    assert message.startswith(f"label-studio exited before http://127.0.0.1:{studio}/health answered"), message
    assert f"{LABEL_STUDIO} ran from the venv {label_studio_venv}, pinned by {LOCKS / 'label-studio.txt'}" in message
    assert f"last lines of {state / 'label-studio.log'}" in message and "FileExistsError" in message
    assert not list(state.glob("*.pid"))  # what the failed call started is stopped again


def test_a_run_waits_for_label_studio_and_takes_its_annotations(pipeline_env, tmp_path, label_studio_venv):
    prefect, mlflow, s3, studio = free_ports(4)
    state = tmp_path / "stack"
    try:
        services = stack_up(
            state, prefect_port=prefect, mlflow_port=mlflow, s3_port=s3, label_studio_port=studio, labeling=True,
            timeout=300,
        )  # fmt: skip
        assert services["label-studio"].status == "started"
        stack = stack_env(state)
        api = API(stack["LABEL_STUDIO_URL"], stack["LABEL_STUDIO_API_KEY"])
        env = pipeline_env | stack
        args = [RLHF, "run", "--json", str(tmp_path / "summary.json")]
        settings = {"url": stack["LABEL_STUDIO_URL"], "project_title": "rlhf-test", "poll_interval_s": 2}
        overrides = [*TINY, "iterations=1", "preferences.source=human", "preferences.n_pairs=8"]
        overrides += ["preferences.labels_per_pair=2", f"preferences.label_studio={json.dumps(settings)}"]
        for item in overrides:
            args += ["--set", item]
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        deadline, tasks = time.monotonic() + 600, []
        while not tasks:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(2)
            projects = [p for p in api("GET", "/api/projects/")["results"] if p["title"] == "rlhf-test"]
            if projects:
                tasks = api("GET", "/api/tasks/", project=projects[0]["id"], fields="all", page_size=100)["tasks"]
        assert projects[0]["maximum_annotations"] == 2
        assert set(tasks[0]["data"]) == {"pair_id", "prompt", "response_a", "response_b"}  # nothing hidden leaks
        second = api("POST", "/api/users/", {"email": "cy@example.org", "username": "cy"})
        for task in tasks:  # the admin always prefers A, strongly; cy calls every pair a tie
            api("POST", f"/api/tasks/{task['id']}/annotations/", {"result": annotation("A", 4)})
            api(
                "POST",
                f"/api/tasks/{task['id']}/annotations/",
                {"result": annotation("Tie", None), "completed_by": second["id"]},
            )
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]

        client = MlflowClient(stack["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("rlhf").experiment_id
        run = client.search_runs([experiment], "attributes.run_name = 'iteration-1/preferences'")[0]
        metrics = run.data.metrics
        assert metrics["preferences/n_labels"] == 2 * len(tasks) and metrics["preferences/tie_rate"] == 0.5
        assert metrics["preferences/labeler/cy_example.org/labels"] == len(tasks)
        assert metrics["preferences/labeler/admin_rlhf.local/labels"] == len(tasks)
        assert metrics["preferences/n_pairs"] == len(tasks)  # the admin's; the ties carry no preference
        assert summary(tmp_path)["phases"]["iteration-1/preferences"] == "Completed"
    finally:
        stopped = stack_down(state, timeout=30)
    assert "label-studio" in stopped
