"""Run records: an identical run is found again only while everything it made is still there."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config
from flows.done import run_identity
from infra.run_records import mlflow_run_is_active, read_record, record_key, why_stale, write_record
from infra.storage import LocalStore, upload_dir


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def artifact(store: LocalStore, tmp_path: Path, key: str) -> str:
    folder = tmp_path / key.replace("/", "_")
    folder.mkdir(exist_ok=True)
    (folder / "weights.bin").write_bytes(b"weights")
    upload_dir(store, folder, key, metadata={})
    return key


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    return uri, MlflowClient(uri)


def test_a_record_stands_while_its_artifacts_and_mlflow_run_do(store, tmp_path, mlflow_db):
    uri, client = mlflow_db
    run = client.create_run(client.create_experiment("records")).info.run_id
    keys = [artifact(store, tmp_path, f"p/sft/policy-{i}") for i in range(2)]
    write_record(store, "p", key="k1", summary={"mlflow_run_id": run, "phases": {}}, artifacts=keys)
    record = read_record(store, "p", "k1")
    assert record is not None and record.artifacts == keys and record.summary["mlflow_run_id"] == run
    assert why_stale(record, store, uri) is None
    assert read_record(store, "p", "other") is None

    store.delete_prefix(f"{keys[1]}/weights.bin")  # half an artifact: it no longer counts
    assert "1 of its artifacts are gone or incomplete" in why_stale(record, store, uri)
    artifact(store, tmp_path, keys[1])  # made again
    assert why_stale(record, store, uri) is None
    client.delete_run(run)
    assert f"MLflow run {run} is not found active" in why_stale(record, store, uri)


def test_an_unreadable_record_is_no_record(store):
    store.put_bytes(record_key("p", "k"), b"{not json")
    assert read_record(store, "p", "k") is None


def test_mlflow_runs_are_looked_up_in_a_sqlite_store_without_mlflow(mlflow_db, tmp_path):
    uri, client = mlflow_db
    run = client.create_run(client.create_experiment("lookup")).info.run_id
    assert mlflow_run_is_active(uri, run) is True
    assert mlflow_run_is_active(uri, "0" * 32) is False
    assert mlflow_run_is_active(f"sqlite:///{tmp_path}/none.db", run) is False  # no store there at all
    (tmp_path / "other.db").write_bytes(b"not a database")
    assert mlflow_run_is_active(f"sqlite:///{tmp_path}/other.db", run) is None  # cannot tell: not up to date
    assert mlflow_run_is_active("databricks", run) is None
    assert mlflow_run_is_active("http://127.0.0.1:9", run) is None  # nothing listens: cannot tell


def test_a_runs_identity_is_its_config_code_inputs_and_mlflow_store_not_where_its_store_lives(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def key(*overrides: str) -> str:
        return run_identity(load_config(None, list(overrides)), inputs=None)

    assert key() == key("storage.uri=/elsewhere") == key("storage.uri=s3://bucket/rlhf")
    assert key() != key("storage.prefix=pipelines/other")
    assert key() != key("ppo.lr=0.001")
    assert key() != key("tracking.uri=http://mlflow:5000")
    assert run_identity(load_config(), inputs=None) != run_identity(load_config(), inputs="digest of user data")
