"""Tests for infra.tracking against a real sqlite-backed MLflow store."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from pydantic import SecretStr

from flows.config import TrackingConfig
from infra.report import Report, figure_png, plot_report
from infra.tracking import EXPERIMENT_KIND_TAG, Tracker, flatten_params

SECRET = "sk-test-SECRET-123"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Store:
    root: Path
    cwd: Path
    tracker: Tracker
    client: MlflowClient

    @property
    def db_file(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def artifact_root(self) -> Path:
        return _uri_to_path(self.tracker.artifact_location)

    def run_artifacts(self, run_id: str) -> Path:
        return _uri_to_path(self.client.get_run(run_id).info.artifact_uri)


def _uri_to_path(uri: str) -> Path:
    return Path(url2pathname(urlparse(uri).path))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    # Creating the sqlite schema runs every MLflow migration (seconds), so the module shares one store.
    root = tmp_path_factory.mktemp("tracking")
    cwd = root / "elsewhere"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(cwd)
        uri = TrackingConfig().resolved_uri(root)
        yield Store(root, cwd, Tracker(uri, "rlhf-test"), MlflowClient(tracking_uri=uri))


def test_default_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert TrackingConfig().resolved_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert TrackingConfig().resolved_uri(tmp_path) == "http://127.0.0.1:5000"
    assert TrackingConfig(uri="http://mlflow:5000").resolved_uri(tmp_path) == "http://mlflow:5000"


def test_flatten_params_nests_truncates_and_drops_secrets() -> None:
    config = {
        "ppo": {"kl_coef": 0.05, "max_new_tokens": 64, "schedule": {"warmup": 10}},
        "model": {"tokenizer": "gpt2", "pad_token_id": 0, "author": "me"},
        "s3": {"secret_access_key": SECRET, "endpoint": "http://s3"},
        "api_token": SECRET,
        "hfToken": SECRET,
        "db": {"Password": SECRET, "conn": {"apiKey": SECRET}},
        "hub": SecretStr(SECRET),
        "endpoints": [{"url": "http://a", "auth": SECRET}],
        "notes": "x" * 7000,
    }
    flat = flatten_params(config)
    assert flat == {
        "ppo.kl_coef": "0.05",
        "ppo.max_new_tokens": "64",
        "ppo.schedule.warmup": "10",
        "model.tokenizer": "gpt2",
        "model.pad_token_id": "0",
        "model.author": "me",
        "s3.endpoint": "http://s3",
        "endpoints": "[{'url': 'http://a'}]",
        "notes": "x" * 6000,
    }
    assert flatten_params({"lr": 1e-5}, prefix="sft") == {"sft.lr": "1e-05"}


def test_parent_with_two_children_logs_metrics_and_params(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    tracker, client = store.tracker, store.client
    with tracker.run("pipeline", params={"seed": 0, "ppo": {"kl_coef": 0.05}}, tags={"stage": "all"}) as parent:
        child_ids = []
        for stage in ("sft", "ppo"):
            with tracker.run(stage, params={stage: {"lr": 1e-5}}, parent_run_id=parent.run_id) as child:
                for step in range(3):
                    child.log_metrics({"loss": 1.0 / (step + 1), "reward": step * 0.5}, step=step)
                with caplog.at_level(logging.WARNING, logger="infra.tracking"):
                    child.log_metrics({"kl": float("nan"), "entropy": float("inf"), "ok": 2.0}, step=3)
                child_ids.append(child.run_id)
        parent.log_metrics({"gold_reward": 0.25}, step=1)

    parent_run = client.get_run(parent.run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.info.run_name == "pipeline"
    assert parent_run.data.params == {"seed": "0", "ppo.kl_coef": "0.05"}
    assert parent_run.data.tags["stage"] == "all"
    assert "mlflow.parentRunId" not in parent_run.data.tags

    for stage, run_id in zip(("sft", "ppo"), child_ids, strict=True):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.info.run_name == stage
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.data.params == {f"{stage}.lr": "1e-05"}
        history = client.get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
        history = client.get_metric_history(run_id, "reward")
        assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 0.5), (2, 1.0)]
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "ok")] == [(3, 2.0)]
        assert client.get_metric_history(run_id, "kl") == []
        assert client.get_metric_history(run_id, "entropy") == []
    assert [(m.step, m.value) for m in client.get_metric_history(parent.run_id, "gold_reward")] == [(1, 0.25)]
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == 4


def test_experiment_is_created_as_a_training_experiment(store: Store) -> None:
    # Without the kind, MLflow 3's UI opens the experiment on its GenAI view (traces, judges).
    tags = store.client.get_experiment(store.tracker.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # An experiment made without the kind (by an older version, or by hand) gets it when a run opens it.
    untagged = store.client.create_experiment("made-elsewhere", artifact_location=store.tracker.artifact_location)
    Tracker(store.tracker.tracking_uri, "made-elsewhere")
    assert store.client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_failed_body_marks_run_failed(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"), store.tracker.run("crashes") as run:
        run.log_metrics({"loss": 1.0}, step=0)
        raise RuntimeError("boom")
    assert store.client.get_run(run.run_id).info.status == RunStatus.to_string(RunStatus.FAILED)


def test_resume_logs_to_existing_run_without_ending_it(store: Store) -> None:
    run = store.client.create_run(store.tracker.experiment_id, run_name="external")
    logger = store.tracker.resume(run.info.run_id)
    logger.log_metrics({"loss": 0.5}, step=7)
    logger.set_tags({"resumed": "yes"})
    resumed = store.client.get_run(run.info.run_id)
    assert resumed.info.status == "RUNNING"
    assert resumed.data.tags["resumed"] == "yes"
    assert [(m.step, m.value) for m in store.client.get_metric_history(run.info.run_id, "loss")] == [(7, 0.5)]


def test_table_and_plot_land_in_experiment_artifact_location(store: Store) -> None:
    history = [
        {
            "iteration": i,
            "gold_reward": 0.1 * i,
            "reward": 0.2 * i,
            "kl": 0.01 * i,
            "entropy": 2.0 - 0.1 * i,
            "response_length": 40.0 + i,
        }
        for i in range(4)
    ]
    rows = [
        {"prompt": "Say hi.", "response": "hi", "reward": 0.5},
        {"prompt": "Count to 2.", "response": "1 2", "reward": 1.25},
    ]
    fig = plot_report(Report("run", rows=history[1:]))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles[1:4] == ["gold reward", "RM score (renormalized each iteration)", "KL to SFT (nats/response)"]
    with store.tracker.run("artifacts") as run:
        run.log_table(rows, "samples/iteration_1.json")
        run.log_png(figure_png(fig), "plots/iterations.png")
        run.log_dict({"iterations": 4}, "summary.json")

    artifacts = store.run_artifacts(run.run_id)
    assert artifacts.is_relative_to(store.artifact_root)
    table = json.loads((artifacts / "samples" / "iteration_1.json").read_text())
    assert table == {
        "columns": ["prompt", "response", "reward"],
        "data": [["Say hi.", "hi", 0.5], ["Count to 2.", "1 2", 1.25]],
    }
    assert (artifacts / "plots" / "iterations.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((artifacts / "summary.json").read_text()) == {"iterations": 4}
    logged = {f.path for f in store.client.list_artifacts(run.run_id)}
    assert logged == {"samples", "plots", "summary.json"}


def test_artifact_dir_upload(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    with store.tracker.run("upload") as run:
        run.log_artifact_dir(src, "checkpoint")
    artifacts = store.run_artifacts(run.run_id) / "checkpoint"
    assert (artifacts / "config.json").read_text() == "{}"
    assert (artifacts / "sub" / "weights.bin").read_bytes() == b"\x00\x01"


def test_secrets_never_reach_store_or_artifacts(store: Store) -> None:
    config = {
        "s3": {"secret_access_key": SECRET, "bucket": "runs"},
        "api_token": SECRET,
        "hub": {"read": SecretStr(SECRET)},
    }
    with store.tracker.run("secrets", params=config, tags={"api_token": SECRET, "team": "rl"}) as run:
        run.log_params({"extra": {"password": SECRET, "beta": 0.1}})
        run.set_tags({"credential": SECRET, "hub_token": SECRET, "kind": "test"})
        run.log_dict(config, "config.json")
        run.log_table([{"prompt": "p", "auth_token": SECRET, "key": SecretStr(SECRET)}], "samples/s.json")

    data = store.client.get_run(run.run_id).data
    assert data.params == {"s3.bucket": "runs", "extra.beta": "0.1"}
    assert data.tags["team"] == "rl"
    assert data.tags["kind"] == "test"
    assert all(SECRET not in v for v in [*data.params.values(), *data.tags.values()])

    files = [p for p in store.artifact_root.rglob("*") if p.is_file()]
    assert any(p.name == "config.json" for p in files)
    for path in [*files, store.db_file]:
        assert SECRET.encode() not in path.read_bytes(), path


def test_artifacts_stay_out_of_cwd(store: Store) -> None:
    with store.tracker.run("cwd-check") as run:
        run.log_dict({"a": 1}, "a.json")
    assert Path.cwd() == store.cwd
    assert store.artifact_root.is_relative_to(store.root.resolve())
    assert not store.artifact_root.is_relative_to(store.cwd.resolve())
    assert store.run_artifacts(run.run_id).is_relative_to(store.artifact_root)
    assert not (store.cwd / "mlruns").exists()
    assert list(store.cwd.iterdir()) == []


def test_a_copied_store_reads_and_writes_its_own_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A SQLite store copied to another folder (as ``cp -r`` of a run's folder does): opening it re-points every
    artifact path at the copy, once; the original is left as it was."""
    import shutil

    original, copy = tmp_path / "a" / "rlhf-mlflow", tmp_path / "b" / "rlhf-mlflow"
    tracker = Tracker(f"sqlite:///{original}/mlflow.db", "rlhf")
    with tracker.run("first") as run:
        run.log_dict({"x": 1}, "config.json")
    shutil.copytree(original.parent, copy.parent)
    held = sorted(p.relative_to(original) for p in original.rglob("*"))

    moved = Tracker(f"sqlite:///{copy}/mlflow.db", "rlhf")
    assert f"was copied or moved from {original.resolve()}" in capsys.readouterr().err
    assert moved.artifact_location == (copy.resolve() / "mlartifacts" / "rlhf").as_uri()
    first = moved.client.get_run(run.run_id).info.artifact_uri
    assert first.startswith((copy.resolve() / "mlartifacts").as_uri())
    assert json.loads(Path(moved.client.download_artifacts(run.run_id, "config.json", str(tmp_path))).read_text())
    with moved.run("second") as second:
        second.log_dict({"x": 2}, "config.json")
    assert (copy / "mlartifacts" / "rlhf" / second.run_id / "artifacts" / "config.json").is_file()
    assert sorted(p.relative_to(original) for p in original.rglob("*")) == held
    Tracker(f"sqlite:///{copy}/mlflow.db", "rlhf")  # in place now: nothing more to do, nothing said
    assert "copied or moved" not in capsys.readouterr().err
