"""The dev stack end to end: real Prefect, MLflow and moto servers on free loopback ports, no mocks."""

import os
import socket
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from flows.stack_cli import stack_app
from infra.stack import stack_down, stack_env, stack_status, stack_up

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def moto_client(port: int):
    """boto3's S3 client on the stack's moto server, with moto's fake credentials."""
    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def get(url: str) -> tuple[int, bytes]:
    with NO_PROXY.open(url, timeout=10) as response:
        return response.status, response.read()


def live_processes(pgid: int) -> list[int]:
    """Non-zombie processes whose pid or process group is pgid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        state, _, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if state != "Z" and pgid in (int(entry.name), int(group)):
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_stack_up_twice_then_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefect_port, mlflow_port, s3_port = free_ports(3)
    state = tmp_path / "stack"
    ports = {"prefect_port": prefect_port, "mlflow_port": mlflow_port, "s3_port": s3_port}
    started = time.monotonic()
    try:
        services = stack_up(state, **ports, timeout=180)
        print(f"stack up in {time.monotonic() - started:.1f} s")
        assert {n: s.status for n, s in services.items()} == {
            "s3": "started",
            "prefect": "started",
            "mlflow": "started",
        }
        assert get(f"http://127.0.0.1:{prefect_port}/api/health") == (200, b"true")
        assert get(f"http://127.0.0.1:{mlflow_port}/health")[0] == 200
        s3 = moto_client(s3_port)
        assert "rlhf-artifacts" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        env = stack_env(state)
        assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{prefect_port}/api"
        assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"
        assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{s3_port}"
        assert env["RLHF_STORAGE_URI"] == "s3://rlhf-artifacts"  # the prefix adds pipelines/default, once

        # The MLflow client needs no S3 credentials: artifacts go through the server into the bucket.
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        run = client.create_run(client.create_experiment("stack-test"))
        (tmp_path / "hello.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "hello.txt"))
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="rlhf-artifacts", Prefix="mlflow/").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/hello.txt") for k in keys), keys

        pids = {name: s.pid for name, s in services.items()}
        again = stack_up(state, **ports, timeout=180)
        assert {name: s.pid for name, s in again.items()} == pids
        assert {s.status for s in again.values()} == {"already up"}
        assert all(row["alive"] and row["healthy"] for row in stack_status(state).values())
        assert CliRunner().invoke(stack_app, ["status", "--state-dir", str(state)]).exit_code == 0
        cli_up = CliRunner().invoke(stack_app, ["up", "--state-dir", str(state), *_port_args(ports)])
        assert cli_up.exit_code == 0 and f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in cli_up.output
        groups = {pid: live_processes(pid) for pid in pids.values()}
        assert all(groups.values())
    finally:
        stopped = stack_down(state, timeout=30)
    assert sorted(stopped) == ["mlflow", "prefect", "s3"]
    assert {pid: live_processes(pid) for pid in pids.values()} == {pid: [] for pid in pids.values()}
    assert not any(row["alive"] for row in stack_status(state).values())
    assert not list(state.glob("*.pid"))
    assert CliRunner().invoke(stack_app, ["status", "--state-dir", str(state)]).exit_code == 1
    print(f"whole cycle in {time.monotonic() - started:.1f} s")


def _port_args(ports: dict[str, int]) -> list[str]:
    return [arg for key, port in ports.items() for arg in (f"--{key.replace('_', '-')}", str(port))]


def test_what_the_local_s3_stored_survives_down_and_up(tmp_path: Path) -> None:
    """moto keeps objects in memory: ``stack down`` saves the bucket beside the stack's databases and ``stack up``
    loads it back, so the artifacts and lineage pointers the MLflow and Prefect databases point at are still there."""
    prefect_port, mlflow_port, s3_port = free_ports(3)
    ports = {"prefect_port": prefect_port, "mlflow_port": mlflow_port, "s3_port": s3_port}
    state = tmp_path / "stack"
    s3 = moto_client(s3_port)
    key = "pipelines/default/lineages/nightly/latest.json"
    try:
        stack_up(state, **ports, timeout=180)
        s3.put_object(Bucket="rlhf-artifacts", Key=key, Body=b'{"iteration": 3}', ContentType="application/json")
        s3.put_object(Bucket="rlhf-artifacts", Key="pipelines/default/a/b", Body=b"")  # an empty object, nested
        assert sorted(stack_down(state, timeout=30)) == ["mlflow", "prefect", "s3"]
        services = stack_up(state, **ports, timeout=180)
        assert services["s3"].note == f"2 objects loaded back from {state.resolve() / 's3-snapshot'}"
        assert s3.get_object(Bucket="rlhf-artifacts", Key=key)["Body"].read() == b'{"iteration": 3}'
        assert s3.head_object(Bucket="rlhf-artifacts", Key=key)["ContentType"] == "application/json"
        assert s3.get_object(Bucket="rlhf-artifacts", Key="pipelines/default/a/b")["Body"].read() == b""
    finally:
        stack_down(state, timeout=30)
