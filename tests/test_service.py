"""The pipeline as a service: conditional writes, lineage pointer and lock on a folder and on S3 (moto), then the
real thing end to end — `rlhf stack up` servers on free loopback ports (Prefect with API auth on), `rlhf serve`
in a subprocess, flow runs created through the Prefect API the way the UI's Run button does, a lineage continued
across two runs, a concurrent lock attempt refused, `prefect deploy --all` of prefect.yaml, `stack down`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from test_flow import RLHF, TINY, rlhf
from test_stack import free_ports, live_processes
from typer.testing import CliRunner

from flows.cli import app
from flows.config import ConfigError, PipelineConfig, load_config
from infra.lineage import Lineage, LineageError, LineageLockedError, LineagePointer
from infra.storage import ObjectStore, open_store, upload_dir
from infra.tracking import flatten_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(RLHF).parent / "prefect")
AUTH = "rlhf-admin:s3cret-for-tests"
LINEAGE = "svc"
SERVICE_CONFIG = [o for o in TINY if not o.startswith("iterations=")] + ["iterations=1"]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(f"s3://{request.getfixturevalue('s3_bucket')}/root")


# ------------------------------------------------------------------------------------ storage and lineage


def test_put_if_absent_creates_once(store: ObjectStore) -> None:
    assert store.put_if_absent("a/lock", b"first")
    assert not store.put_if_absent("a/lock", b"second")
    assert store.get_bytes("a/lock") == b"first"
    assert store.list_keys("a") == ["a/lock"]  # no temp file left behind
    store.delete_prefix("a/lock")
    assert store.put_if_absent("a/lock", b"third") and store.get_bytes("a/lock") == b"third"


def test_put_if_absent_has_one_winner_among_racing_writers(store: ObjectStore) -> None:
    barrier, wins = threading.Barrier(8), []

    def attempt(i: int) -> None:
        barrier.wait()
        if store.put_if_absent("race/lock", f"writer-{i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get_bytes("race/lock") == f"writer-{wins[0]}".encode()


def _output(store: ObjectStore, tmp_path: Path, key: str) -> dict[str, Any]:
    folder = tmp_path / key.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.bin").write_bytes(key.encode())
    return {"artifact": upload_dir(store, folder, key).to_dict(), "metrics": {"m": 1.0}}


def test_lineage_lock_is_exclusive_and_names_its_holder(store: ObjectStore) -> None:
    lineage = Lineage(store, "pipelines/default", "nightly")
    assert lineage.lock_key == "pipelines/default/lineages/nightly/lock"
    with lineage.locked("run-1") as held:
        assert lineage.holder() == held
        with pytest.raises(LineageLockedError) as refused:
            Lineage(store, "pipelines/default", "nightly").acquire("run-2")
        message = str(refused.value)
        for part in ("'nightly'", held.holder, "flow run run-1", held.created_at, "rlhf lineage unlock nightly"):
            assert part in message
    assert lineage.holder() is None  # released
    with pytest.raises(RuntimeError), lineage.locked("run-3"):
        raise RuntimeError("the run failed")
    assert lineage.holder() is None  # released on failure too
    stale = lineage.acquire("crashed")
    assert lineage.unlock() == stale and lineage.holder() is None
    assert not lineage.release(stale)  # a broken lock is not released twice
    with pytest.raises(ValueError, match="invalid lineage name"):
        Lineage(store, "p", "../escape")


def test_lineage_pointer_round_trip_and_checks(store: ObjectStore, tmp_path: Path) -> None:
    lineage = Lineage(store, "p", "nightly")
    assert lineage.read() is None
    data, sft, policy, prefs = (_output(store, tmp_path, f"p/{k}") for k in ("data", "sft", "it1/policy", "it1/prefs"))
    pointer = LineagePointer(lineage="nightly", iteration=1, data=data, sft=sft, policy=policy, preferences=[prefs])
    lineage.advance(pointer)
    assert lineage.read() == pointer
    assert json.loads(store.get_bytes("p/lineages/nightly/latest.json"))["policy"] == policy
    store.delete_prefix("p/it1/policy")
    with pytest.raises(LineageError, match="missing or incomplete"):
        lineage.read()
    store.put_bytes("p/lineages/nightly/latest.json", b'{"lineage": "nightly"}')
    with pytest.raises(LineageError, match="not a valid pointer"):
        lineage.read()
    with pytest.raises(ValueError):
        Lineage(store, "p", "other").advance(pointer)


def test_lineage_cli_show_and_unlock(tmp_path: Path) -> None:
    where = ["--set", f"storage.uri={tmp_path / 'store'}"]
    lineage = Lineage(open_store(str(tmp_path / "store")), "pipelines/default", "nightly")
    missing = CliRunner().invoke(app, ["lineage", "show", "nightly", *where])
    looked = tmp_path / "store" / "pipelines" / "default" / "lineages"
    assert missing.exit_code == 2 and f"lineage 'nightly' not found in {looked} (" in " ".join(missing.output.split())
    held = lineage.acquire("run-9")
    shown = CliRunner().invoke(app, ["lineage", "show", "nightly", "--json", *where])
    assert shown.exit_code == 0 and json.loads(shown.output)["lock"]["flow_run_id"] == "run-9"
    brief = CliRunner().invoke(app, ["lineage", "show", "nightly", *where]).output
    assert "iterations: none completed yet" in brief and f"held by {held.holder}" in brief
    assert len(brief.splitlines()) == 3
    unlocked = CliRunner().invoke(app, ["lineage", "unlock", "nightly", *where])
    assert unlocked.exit_code == 0 and held.holder in unlocked.output.replace("\n", "")
    assert lineage.holder() is None
    assert "was not locked" in CliRunner().invoke(app, ["lineage", "unlock", "nightly", *where]).output


def _dotted_keys(node: dict[str, Any], path: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        name = f"{path}.{key}" if path else key
        keys |= _dotted_keys(value, name) if isinstance(value, dict) else {name}
    return keys


def test_config_keeps_secrets_and_unsafe_names_out() -> None:
    for override, key, secret in (
        ("lineage=Nightly/../x", "lineage", "no secret here"),
        ("tracking.uri=http://user:pw-1234@mlflow:5000", "tracking.uri", "pw-1234"),
        ("storage.uri=s3://AKIAX:sEcReT99@bucket/x", "storage.uri", "sEcReT99"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            load_config(None, [override])
        assert secret not in str(e.value)
    config = load_config(None, ["lineage=nightly", "tracking.uri=http://mlflow:5000"])
    assert config.experiment == "rlhf/nightly"
    dumped = config.model_dump(mode="json")
    params = flatten_params(dumped)  # what Tracker.run logs: secret-filtered through infra.tracking.redact
    assert params["lineage"] == "nightly"
    assert set(params) == _dotted_keys(dumped)  # no config field even looks like a secret: nothing to filter
    fields = PipelineConfig.model_json_schema()["properties"]
    assert "lineage" in fields and fields["lineage"]["description"]


# ------------------------------------------------------------------------------------ the service end to end


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


def _wait(what: str, check: Any, timeout: float, log: Path, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode}):\n{_tail(log)}")
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s:\n{_tail(log)}")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C for the served process (it pauses its schedule and exits), then SIGKILL whatever is left."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        if not live_processes(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while live_processes(proc.pid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.3)
    proc.wait(timeout=10)


def test_served_deployment_continues_a_lineage(
    tmp_path: Path, pipeline_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.stack import stack_down, stack_env, stack_up

    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", AUTH)  # the stack's Prefect server inherits it: auth on
    started = time.monotonic()
    prefect_port, mlflow_port, s3_port = free_ports(3)
    state = tmp_path / "stack"
    serve_log = tmp_path / "serve.log"
    serve: subprocess.Popen[bytes] | None = None
    groups: list[int] = []
    try:
        services = stack_up(state, prefect_port=prefect_port, mlflow_port=mlflow_port, s3_port=s3_port, timeout=180)
        groups = [s.pid for s in services.values() if s.pid]
        stack = stack_env(state)
        env = pipeline_env | stack | {"PREFECT_API_AUTH_STRING": AUTH}
        for key, value in stack.items():  # this process talks to moto and MLflow too
            if key.startswith("AWS_"):
                monkeypatch.setenv(key, value)
        print(f"stack up: {time.monotonic() - started:.0f} s")

        args = [RLHF, "serve", "--lineage", LINEAGE, "--cron", "0 0 1 1 *"]
        for item in [*SERVICE_CONFIG, f"tracking.uri={stack['MLFLOW_TRACKING_URI']}"]:
            args += ["--set", item]
        (tmp_path / "serve").mkdir()
        with serve_log.open("wb") as log:
            serve = subprocess.Popen(
                args, cwd=tmp_path / "serve", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _check_service(tmp_path, env, stack, serve, serve_log, started)
    finally:
        if serve is not None:
            _stop_group(serve)
        stopped = stack_down(state, timeout=30)
    assert sorted(stopped) == ["mlflow", "prefect", "s3"]
    leftovers = {pgid: live_processes(pgid) for pgid in [*groups, *([serve.pid] if serve else [])]}
    assert leftovers == {pgid: [] for pgid in leftovers}, "processes left behind"
    print(f"whole service test: {time.monotonic() - started:.0f} s")


def _check_service(
    tmp_path: Path,
    env: dict[str, str],
    stack: dict[str, str],
    serve: subprocess.Popen[bytes],
    serve_log: Path,
    started: float,
) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    api = stack["PREFECT_API_URL"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused_api:
        opener.open(urllib.request.Request(f"{api}/flows/filter", data=b"{}", method="POST"), timeout=10)
    assert refused_api.value.code == 401  # the API wants the auth string

    with (
        temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: AUTH}),
        get_client(sync_client=True) as client,
    ):

        def deployment() -> Any:
            try:
                return client.read_deployment_by_name(f"rlhf-pipeline/{LINEAGE}")
            except Exception:  # not registered yet
                return None

        dep = _wait("`rlhf serve` registers the deployment", deployment, 180, serve_log, serve)
        print(f"deployment served: {time.monotonic() - started:.0f} s")
        # the UI's Custom run form: every config field with its description; the given config as default
        schema = dep.parameter_openapi_schema
        assert list(schema["properties"]) == ["config"]
        definitions = schema["definitions"]
        fields = definitions["PipelineConfig"]["properties"]
        assert {"lineage", "iterations", "ppo", "storage"} <= set(fields)
        for field in fields.values():  # a section's description may sit on its model's definition
            ref = field.get("$ref", "/").rsplit("/", 1)[-1]
            assert field.get("description") or definitions[ref]["description"], field
        assert schema["definitions"]["PPOConfig"]["properties"]["kl_coef"]["default"] == 0.15
        defaults = dep.parameters["config"]
        assert defaults["lineage"] == LINEAGE and defaults["iterations"] == 1 and defaults["ppo"]["steps"] == 2
        assert defaults["storage"]["uri"] == stack["RLHF_STORAGE_URI"]  # the stack's storage, from the environment
        assert [s.schedule.cron for s in dep.schedules] == ["0 0 1 1 *"]
        assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1

        # run 1, created the way the UI's Run button does; meanwhile, prefect.yaml goes to a process work pool
        run1 = client.create_flow_run_from_deployment(dep.id)
        client.create_work_pool(WorkPoolCreate(name="rlhf-process", type="process"))
        deploy = subprocess.run(
            [PREFECT, "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        pooled = client.read_deployment_by_name("rlhf-pipeline/nightly")
        assert pooled.work_pool_name == "rlhf-process" and pooled.entrypoint == "flows/pipeline.py:rlhf_pipeline"
        assert pooled.parameters == {"config": {"lineage": "nightly", "iterations": 1}}
        assert pooled.parameter_openapi_schema["definitions"]["PipelineConfig"]["properties"]["lineage"]["description"]
        assert [s.schedule.cron for s in pooled.schedules] == ["0 3 * * *"]
        assert pooled.global_concurrency_limit is not None and pooled.global_concurrency_limit.limit == 1

        def finished(run_id: uuid.UUID) -> Any:
            run = client.read_flow_run(run_id)
            return run if run.state is not None and run.state.is_final() else None

        run1 = _wait("run 1 finishes", lambda: finished(run1.id), 420, serve_log, serve)
        assert run1.state.is_completed(), f"{run1.state}\n{_tail(serve_log)}"
        print(f"run 1 done: {time.monotonic() - started:.0f} s")

        # run 2 continues the lineage; while it holds the lock, another attempt is refused
        run2 = client.create_flow_run_from_deployment(dep.id)
        bucket, _, root = stack["RLHF_STORAGE_URI"].removeprefix("s3://").partition("/")
        lineage = Lineage(open_store(f"s3://{bucket}/{root}"), "pipelines/default", LINEAGE)

        def lock_of_run2() -> Any:
            holder = lineage.holder()
            if holder is None and finished(run2.id):
                raise AssertionError(f"run 2 ended before its lock was seen: {client.read_flow_run(run2.id).state}")
            return holder if holder is not None and holder.flow_run_id == str(run2.id) else None

        holder = _wait("run 2 takes the lineage lock", lock_of_run2, 300, serve_log, serve)
        with pytest.raises(LineageLockedError) as refused:
            lineage.acquire("a concurrent run")
        for part in (f"lineage '{LINEAGE}'", holder.holder, str(run2.id), f"rlhf lineage unlock {LINEAGE}"):
            assert part in str(refused.value)
        run2 = _wait("run 2 finishes", lambda: finished(run2.id), 420, serve_log, serve)
        assert run2.state.is_completed(), f"{run2.state}\n{_tail(serve_log)}"
        print(f"run 2 done: {time.monotonic() - started:.0f} s")
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run2.id]))
        )
        assert [r.name for r in subflows] == ["iteration-2"]
        # one Prefect table artifact key for the lineage: its history holds both runs' iterations
        tables = [a for a in client.read_artifacts() if a.key == f"rlhf-{LINEAGE}-iterations"]
        assert sorted(str(a.flow_run_id) for a in tables) == sorted([str(run1.id), str(run2.id)])

    # the store: both iterations' artifacts, the pointer at iteration 2, the lock released
    pointer = lineage.read()
    assert pointer is not None and pointer.iteration == 2 and pointer.flow_run_id == str(run2.id)
    assert len(pointer.preferences) == 2 and lineage.holder() is None
    assert "/iteration-002/policy-" in pointer.policy["artifact"]["key"]
    assert pointer.reward is not None and "/iteration-002/reward_model-" in pointer.reward["artifact"]["key"]
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page["Contents"]]
    artifacts = f"{root}/pipelines/default/".lstrip("/")
    assert root == "" and all(k.startswith(("pipelines/default/", "mlflow/")) for k in keys), sorted(keys)[:5]
    folders = {k.removeprefix(artifacts).rsplit("-", 1)[0] for k in keys if k.endswith("MANIFEST.json")}
    assert folders == {"data/world", "sft/policy", "sft/baseline"} | {
        f"iteration-00{k}/{name}" for k in (1, 2) for name in ("preferences", "reward_model", "policy", "evaluation")
    }
    assert f"{artifacts}lineages/{LINEAGE}/latest.json" in keys
    reward_2 = next(k for k in keys if "/iteration-002/reward_model-" in k and k.endswith("MANIFEST.json"))
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=reward_2)["Body"].read())
    assert "/iteration-001/reward_model-" in manifest["metadata"]["parents"]["init"]  # run 2 continued run 1's

    # MLflow: one experiment for the lineage, one run per pipeline run, iterations counted on
    client = MlflowClient(stack["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(f"rlhf/{LINEAGE}")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.data.tags["prefect_flow_run_id"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {str(run1.id), str(run2.id)}
    for run, iteration in ((run1, 1), (run2, 2)):
        parent = parents[str(run.id)]
        assert parent.data.params["lineage"] == LINEAGE
        history = client.get_metric_history(parent.info.run_id, "iteration/win_rate_vs_sft")
        assert [m.step for m in history] == [iteration]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[str(run2.id)].info.run_id]
    phases = ("evaluation", "ppo", "preferences", "reward")
    assert sorted(r.info.run_name for r in children) == [f"iteration-2/{p}" for p in phases]
    ppo = next(r for r in children if r.info.run_name == "iteration-2/ppo")
    assert [m.step for m in client.get_metric_history(ppo.info.run_id, "ppo/kl")] == [1, 2]
    mlflow_objects = [k for k in keys if k.startswith("mlflow/")]
    assert any(k.endswith("plots/iterations.png") for k in mlflow_objects)  # proxied by the server into the bucket
    at = {"RLHF_STORAGE_URI": stack["RLHF_STORAGE_URI"], "MLFLOW_TRACKING_URI": stack["MLFLOW_TRACKING_URI"]}
    shown = CliRunner().invoke(app, ["lineage", "show", LINEAGE, "--json"], env=at)
    assert json.loads(shown.output)["latest"]["iteration"] == 2
    brief = CliRunner().invoke(app, ["lineage", "show", LINEAGE], env=at).output
    assert "iterations: 2 completed" in brief and f"champion: rlhf-{LINEAGE} version " in brief, brief
    assert len(brief.splitlines()) <= 8
    _check_registry_export_and_report(tmp_path, env, stack, client, parents, (run1, run2))


def _check_registry_export_and_report(
    tmp_path: Path, env: dict[str, str], stack: dict[str, str], client: Any, parents: dict[str, Any], runs: tuple
) -> None:
    """On the MLflow server: a version per iteration across the lineage's runs, the champion the better one; then
    `rlhf export` (weights through the server's proxied artifacts) and `rlhf report` over the whole lineage."""
    from transformers import AutoModelForCausalLM

    name = f"rlhf-{LINEAGE}"
    win = [
        client.get_metric_history(parents[str(run.id)].info.run_id, "iteration/win_rate_vs_sft")[0].value
        for run in runs
    ]
    found = client.search_model_versions(f"name = '{name}'")
    versions = {v.tags["rlhf.iteration"]: str(v.version) for v in found}
    assert sorted(versions) == ["1", "2"]
    errors = {v.tags["rlhf.iteration"]: float(v.tags["rlhf.metric.win_rate_stderr"]) for v in found}
    champion = "2" if win[1] - win[0] > math.hypot(errors["1"], errors["2"]) else "1"
    assert client.get_model_version_by_alias(name, "champion").tags["rlhf.iteration"] == champion
    assert str(client.get_model_version_by_alias(name, "newest").version) == versions["2"]
    tracking = ["--set", f"tracking.uri={stack['MLFLOW_TRACKING_URI']}"]
    out = tmp_path / "exported"
    done = rlhf(env, tmp_path, "export", "--lineage", LINEAGE, "--out", str(out), *tracking)
    assert done.returncode == 0 and f"(iteration {champion})" in done.stdout, done.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    page = tmp_path / "lineage.html"
    done = rlhf(env, tmp_path, "report", "--lineage", LINEAGE, "--out", str(page), *tracking)
    assert done.returncode == 0, done.stderr[-3000:]
    html = page.read_text()
    assert f"RLHF lineage {LINEAGE}" in html and f"<td>2</td>\n<td>{win[1]:.3f}</td>" in html
