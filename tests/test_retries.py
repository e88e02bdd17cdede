"""Retries only for what may pass: a phase task is retried on a transient failure (storage, a lost or refused
connection, a timeout) and never on one that fails the same way again (bad input, a failed rank, out of memory,
a divergence, a bug), since a retry re-runs a phase that may take hours."""

import socket
import uuid

import httpx
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.states import Failed

from infra.datasets import DatasetError
from infra.storage import StorageError, TransientStorageError
from rlhf_core.checkpoint import DivergenceError
from tasks.common import phase_task, should_retry

TRANSIENT = [
    TransientStorageError("s3://rlhf/x: 503 SlowDown after 8 attempts"),
    ConnectionResetError(104, "Connection reset by peer"),
    ConnectionRefusedError(111, "Connection refused"),
    TimeoutError("timed out"),
    requests.exceptions.ConnectionError("HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded"),
    requests.exceptions.ReadTimeout("HTTPConnectionPool(host='mlflow', port=5000): Read timed out."),
    httpx.ConnectError("All connection attempts failed"),
]
PERMANENT = [
    ValueError("ppo.kl_coef: Input should be greater than or equal to 0"),
    DatasetError("prefs.jsonl: row 3, column 'chosen': empty or whitespace-only text"),
    StorageError("S3 bucket 'nope' does not exist at http://127.0.0.1:9000"),
    DivergenceError("ppo: KL to the reference is 61.2 nats at step 17, past ppo.max_kl=50.0"),
    RuntimeError("sft: a rank of 2 failed (torchrun exit 1): ValueError: bad shard"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    AssertionError("a bug"),
    KeyError("reward/val_accuracy"),
    TypeError("run_ppo() missing 1 required keyword-only argument: 'seed'"),
]


def name(error: BaseException) -> str:
    return type(error).__name__


@pytest.mark.parametrize("error", TRANSIENT, ids=name)
def test_a_transient_failure_is_retried(error):
    assert should_retry(None, None, Failed(data=error))


@pytest.mark.parametrize("error", PERMANENT, ids=name)
def test_a_failure_that_would_repeat_is_not(error):
    assert not should_retry(None, None, Failed(data=error))


def test_mlflow_losing_its_server_is_transient(monkeypatch):
    """MLflow's client raises its own MlflowException while handling requests' ConnectionError: the cause counts."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket closes
    with pytest.raises(Exception) as caught:
        MlflowClient(f"http://127.0.0.1:{port}").get_run("0" * 32)
    assert type(caught.value).__name__ == "MlflowException"
    assert should_retry(None, None, Failed(data=caught.value))
    assert not should_retry(None, None, Failed(data=ValueError("bad config")))


def test_a_phase_task_is_retried_on_a_lost_connection_and_not_on_out_of_memory(prefect_api):
    attempts: dict[str, int] = {}

    @phase_task("flaky")
    def flaky(kind: str, key: str) -> str:
        attempts[kind] = attempts.get(kind, 0) + 1
        if kind == "transient" and attempts[kind] == 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        if kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    @flow
    def both(key: str) -> tuple:
        return flaky("transient", key, return_state=True), flaky("oom", key, return_state=True)

    transient, oom = both(uuid.uuid4().hex)  # a fresh key: nothing cached
    assert transient.is_completed() and attempts["transient"] == 2
    assert oom.is_failed() and attempts["oom"] == 1
