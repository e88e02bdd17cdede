"""A one-command local service stack for development: Prefect server, MLflow server and an S3 endpoint.

    rlhf stack up        # start what is not running yet, wait until healthy, print UI addresses and `export` lines
    rlhf stack status    # exit code 0 when every recorded service is alive and healthy
    rlhf stack down      # stop exactly the processes `up` started

Everything listens on 127.0.0.1. The S3 endpoint is moto's server with fake "testing" credentials and one bucket,
unless ``--s3-endpoint URL`` names a real one (MinIO, AWS): then no moto is started and the MLflow server takes its
credentials from the caller's environment (they are never printed or written down).

The state folder (default ``.rlhf-stack``) holds, per service, ``<name>.pid`` (JSON: pid, port, url, cmdline,
started_at, start_ticks) and ``<name>.log`` (the server's stdout and stderr), plus ``stack.json`` (the config and
the environment to export). Each server runs in its own session (process group), so stopping it also stops the
worker processes it spawned. A pid counts as ours only while the process's kernel start time still matches the
recorded one, which guards against pid reuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from infra.pinned_env import LOCKS, PinnedEnv, PinnedEnvError
from infra.s3_snapshot import load_bucket, save_bucket

__all__ = [
    "DEFAULT_STATE",
    "Service",
    "StackError",
    "stack_down",
    "stack_env",
    "stack_status",
    "stack_up",
]

DEFAULT_STATE = Path(".rlhf-stack")
HOST = "127.0.0.1"
ORDER = ("s3", "prefect", "mlflow", "label-studio")  # start order; stopped together
HEALTH_PATHS = {"s3": "/", "prefect": "/api/health", "mlflow": "/health", "label-studio": "/health"}
LABEL_STUDIO = "label-studio==1.23.2"
S3_SNAPSHOT = "s3-snapshot"  # moto's bucket, saved at `stack down` and loaded back at `stack up`
# Label Studio's own virtualenv (about 1 GB, its pins its own): under the state folder unless this names one.
LABEL_STUDIO_VENV_ENV = "RLHF_LABEL_STUDIO_VENV"
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
MOTO_REGION = "us-east-1"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback checks never go through a proxy
_children: dict[int, subprocess.Popen[bytes]] = {}  # processes this interpreter started, kept so they can be reaped


class StackError(RuntimeError):
    """The stack could not be started; the message names the service and what to check."""


@dataclass
class Service:
    """One service of the stack; ``pid`` is None for an external S3 endpoint."""

    name: str
    port: int
    url: str
    pid: int | None
    log: Path
    status: str = "started"  # "started", "already up" or "external"
    note: str = ""  # what else happened to it (the S3 snapshot loaded back)


@dataclass
class _Plan:
    """A server to start: its command and the environment it adds."""

    name: str
    port: int
    cmd: list[str]
    env: dict[str, str]
    about: str = ""  # what an error should add about where the server came from

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass
class _Stack:
    """What ``stack_up`` was asked for, resolved: where state lives, the ports, the S3 endpoint and bucket."""

    state_dir: Path
    ports: dict[str, int]
    s3_url: str
    bucket: str
    moto: bool  # start moto's S3 server (no external endpoint was given)
    timeout: float
    labeling: bool = False  # also Label Studio


# ----------------------------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, start_ticks) of a process from /proc, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # fields after "pid (comm) "
    return fields[0], int(fields[2]), int(fields[19])


def _reap(pid: int) -> None:
    """Collect the exit status of a child of this interpreter, so it does not linger as a zombie."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            _children.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _is_ours(record: dict[str, Any]) -> bool:
    """Whether the recorded process still runs and is the one we started (not a reused pid, not a zombie)."""
    pid = record["pid"]
    _reap(pid)
    if not Path("/proc").is_dir():  # no procfs: existence is all we can check
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == record.get("start_ticks")


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group (Linux /proc; elsewhere none are seen)."""
    members = []
    if not Path("/proc").is_dir():
        return members
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) and stat[1] == pgid and stat[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stop_groups(records: dict[str, dict[str, Any]], timeout: float) -> list[str]:
    """SIGTERM each of our process groups, wait, then SIGKILL what is left. Returns the names that were running."""
    groups: dict[str, int] = {}
    for name, record in records.items():
        pid = record["pid"]
        if _is_ours(record):
            groups[name] = pid
        elif (_proc_stat(pid) or ("Z",))[0] == "Z" and _group_members(pid):
            groups[name] = pid  # leader gone, workers left: a pgid is never reused while its group exists
    for pgid in groups.values():
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive_group(g) for g in groups.values()):
        time.sleep(0.2)
    for pgid in groups.values():
        if _alive_group(pgid):
            _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive_group(g) for g in groups.values()):
        time.sleep(0.1)
    return list(groups)


def _alive_group(pgid: int) -> bool:
    _reap(pgid)
    return bool(_group_members(pgid))


def _launch(plan: _Plan, state_dir: Path) -> dict[str, Any]:
    """Start a server in its own session, logging to ``<name>.log``, and write its pid file."""
    log = state_dir / f"{plan.name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            plan.cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_child_env(plan.env),
            start_new_session=True,
        )
    _children[proc.pid] = proc
    stat = _proc_stat(proc.pid)
    record = {
        "pid": proc.pid,
        "port": plan.port,
        "url": plan.url,
        "cmdline": plan.cmd,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "start_ticks": stat[2] if stat else None,
    }
    _write_json(state_dir / f"{plan.name}.pid", record)
    return record


# ------------------------------------------------------------------------------------------------ checks


def _http_ok(url: str, timeout: float = 5) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover does not count as taken
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log file)"


def _wait_healthy(plan: _Plan, record: dict[str, Any], deadline: float, log: Path) -> None:
    """Poll the health URL until it answers 2xx; raise StackError with the log's tail (and where the server came
    from) on exit or timeout."""
    health = record["url"] + HEALTH_PATHS[plan.name]
    about = f"\n{plan.about}" if plan.about else ""
    while not _http_ok(health, timeout=min(5.0, max(0.5, deadline - time.monotonic()))):
        if not _is_ours(record):
            raise StackError(
                f"{plan.name} exited before {health} answered{about}\nlast lines of {log}:\n{_log_tail(log)}"
            )
        if time.monotonic() >= deadline:
            raise StackError(
                f"{plan.name} not healthy at {health} within the timeout{about}\nlast lines of {log}:\n{_log_tail(log)}"
            )
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ state


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _read_records(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The pid files in the state folder, by service name (unreadable ones are skipped)."""
    records = {}
    for path in sorted(Path(state_dir).glob("*.pid")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(path.read_text())
            record["pid"] = int(record["pid"])
            records[path.stem] = record
    return records


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY", env.get("no_proxy", "")), HOST, "localhost"]))
    return env | {"NO_PROXY": no_proxy, "no_proxy": no_proxy} | extra


def _bin(script: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    path = Path(sys.executable).parent / script
    return str(path) if path.exists() else script


# ------------------------------------------------------------------------------------------------ public API


def _plans(stack: _Stack) -> list[_Plan]:
    state_dir, ports, bucket, moto = stack.state_dir, stack.ports, stack.bucket, stack.moto
    prefect_env = {
        "PREFECT_HOME": str(state_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://{HOST}:{ports['prefect']}/api",
    }
    mlflow_env = {"MLFLOW_S3_ENDPOINT_URL": stack.s3_url, "MLFLOW_DISABLE_TELEMETRY": "true"}
    # MLflow's server-side job runner (GenAI judges, trace rollups) spawns ~8 worker processes; off unless asked for.
    mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if moto:
        mlflow_env |= MOTO_CREDENTIALS | {"AWS_DEFAULT_REGION": MOTO_REGION}
    prefect = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(ports["prefect"])]
    mlflow = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}"]
    mlflow += ["--artifacts-destination", f"s3://{bucket}/mlflow"]
    mlflow += ["--host", HOST, "--port", str(ports["mlflow"]), "--workers", "1"]
    plans = [
        _Plan("prefect", ports["prefect"], prefect, prefect_env),
        _Plan("mlflow", ports["mlflow"], mlflow, mlflow_env),
    ]
    if moto:
        plans.insert(0, _Plan("s3", ports["s3"], [_bin("moto_server"), "-H", HOST, "-p", str(ports["s3"])], {}))
    if stack.labeling:
        plans.append(_label_studio_plan(stack))
    return plans


def label_studio_env(state_dir: Path) -> PinnedEnv:
    """Label Studio's own virtualenv, installed exactly from its lock (about 1 GB, its pins its own)."""
    root = Path(os.environ.get(LABEL_STUDIO_VENV_ENV) or state_dir / "label-studio-venv")
    return PinnedEnv(root, LOCKS / "label-studio.txt")


def ensure_label_studio(env: PinnedEnv) -> Path:
    """Label Studio's start script, after installing its venv from the lock where it was not built from it (first
    use: about 2 minutes)."""
    try:
        env.ensure()
    except PinnedEnvError as e:
        raise StackError(f"could not install {LABEL_STUDIO}: {e}") from e
    return env.root / "bin" / "label-studio"


def _label_studio_account(state_dir: Path) -> dict[str, str]:
    """The admin account and API token of the stack's Label Studio, made once: the server takes them only when it
    creates its database."""
    path = state_dir / "label-studio.json"
    if not path.exists():
        account = {
            "username": "admin@rlhf.local",
            "password": secrets.token_urlsafe(16),
            "token": secrets.token_hex(20),
        }
        _write_json(path, account)
        path.chmod(0o600)
    return json.loads(path.read_text())


def _label_studio_plan(stack: _Stack) -> _Plan:
    account, port = _label_studio_account(stack.state_dir), stack.ports["label-studio"]
    env = {
        "LABEL_STUDIO_BASE_DATA_DIR": str(stack.state_dir / "label-studio"),
        "LABEL_STUDIO_USERNAME": account["username"],
        "LABEL_STUDIO_PASSWORD": account["password"],
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_USER_TOKEN": account["token"],
    }
    venv = label_studio_env(stack.state_dir)
    cmd = [str(venv.root / "bin" / "label-studio"), "start", "--no-browser", "--host", HOST, "--port", str(port)]
    return _Plan("label-studio", port, cmd, env, about=f"{LABEL_STUDIO} ran from the {venv.describe()}")


def _moto_client(endpoint: str) -> Any:
    """boto3's S3 client on the stack's S3 endpoint, with moto's fake credentials."""
    import boto3

    keys = {"aws_access_key_id": MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"]}
    keys |= {"aws_secret_access_key": MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    return boto3.client("s3", endpoint_url=endpoint, region_name=MOTO_REGION, **keys)


def _ensure_bucket(endpoint: str, bucket: str) -> None:
    from botocore.exceptions import ClientError

    s3 = _moto_client(endpoint)
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)


def _env_for(stack: _Stack, services: dict[str, Service]) -> dict[str, str]:
    env = {
        "PREFECT_API_URL": services["prefect"].url + "/api",
        "MLFLOW_TRACKING_URI": services["mlflow"].url,
        "AWS_ENDPOINT_URL": services["s3"].url,
        "RLHF_STORAGE_URI": f"s3://{stack.bucket}",  # storage.prefix (pipelines/default) says where in it
    }
    if "label-studio" in services:
        env |= {"LABEL_STUDIO_URL": services["label-studio"].url}
        env |= {"LABEL_STUDIO_API_KEY": _label_studio_account(stack.state_dir)["token"]}
    return env | (MOTO_CREDENTIALS | {"AWS_DEFAULT_REGION": MOTO_REGION} if stack.moto else {})


def _check_ports(plans: Iterable[_Plan], running: dict[str, dict[str, Any]]) -> None:
    taken = [p for p in plans if p.name not in running and not _port_free(p.port)]
    ports = [p.port for p in plans]
    dupes = {port for port in ports if ports.count(port) > 1}
    if dupes:
        raise StackError(f"the same port is given to two services: {sorted(dupes)}")
    if taken:
        what = ", ".join(f"port {p.port} ({p.name})" for p in taken)
        raise StackError(
            f"{what} already in use by another process; stop it or pick another port (--{taken[0].name}-port)"
        )


def stack_up(
    state_dir: Path = DEFAULT_STATE,
    *,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    s3_port: int = 9000,
    s3_endpoint: str | None = None,
    bucket: str = "rlhf-artifacts",
    timeout: float = 120,
    labeling: bool = False,
    label_studio_port: int = 8080,
) -> dict[str, Service]:
    """Start the services that are not already running, wait until all are healthy and record the stack. With
    ``labeling``, Label Studio too (installed into its own virtualenv on first use).

    A recorded service whose process is still ours is left alone ("already up"); stale pid files are replaced.
    On failure, everything this call started is stopped again and StackError is raised.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    moto = s3_endpoint is None
    ports = {"prefect": prefect_port, "mlflow": mlflow_port, "s3": s3_port, "label-studio": label_studio_port}
    records = _read_records(state_dir)
    running = {name: r for name, r in records.items() if _is_ours(r)}
    ports |= {name: r["port"] for name, r in running.items()}  # a running service keeps its port
    s3_url = f"http://{HOST}:{ports['s3']}" if moto else str(s3_endpoint).rstrip("/")
    stack = _Stack(state_dir, ports, s3_url, bucket, moto, timeout, labeling or "label-studio" in running)
    plans = _plans(stack)
    _check_ports(plans, running)
    if stack.labeling and "label-studio" not in running:
        ensure_label_studio(label_studio_env(state_dir))
    started: dict[str, dict[str, Any]] = {}
    try:
        services = _start_and_wait(stack, plans, running, started)
    except BaseException:
        _stop_groups(started, timeout=10)
        for name in started:
            (state_dir / f"{name}.pid").unlink(missing_ok=True)
        raise
    if not moto:
        parts = urlsplit(s3_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        services["s3"] = Service("s3", port, s3_url, None, state_dir / "s3.log", "external")
    config = {
        "bucket": bucket,
        "s3_endpoint": s3_url,
        "moto": moto,
        "services": {n: s.url for n, s in services.items()},
    }
    _write_json(state_dir / "stack.json", config | {"env": _env_for(stack, services)})
    return services


def _start_and_wait(
    stack: _Stack, plans: list[_Plan], running: dict[str, dict[str, Any]], started: dict[str, dict[str, Any]]
) -> dict[str, Service]:
    """Launch every missing server at once (they start in parallel), then wait for each in order; ``started``
    collects what this call started."""
    deadline = time.monotonic() + stack.timeout
    for plan in plans:
        if plan.name not in running:
            started[plan.name] = _launch(plan, stack.state_dir)
    services = {}
    for plan in plans:
        record = running.get(plan.name) or started[plan.name]
        log = stack.state_dir / f"{plan.name}.log"
        _wait_healthy(plan, record, deadline, log)
        note = ""
        if plan.name == "s3":
            _ensure_bucket(stack.s3_url, stack.bucket)
            fresh_moto = plan.name not in running and stack.moto  # starts empty: what the last `down` saved goes back
            snapshot = stack.state_dir / S3_SNAPSHOT
            if fresh_moto and (loaded := load_bucket(_moto_client(stack.s3_url), stack.bucket, snapshot)):
                note = f"{loaded} objects loaded back from {stack.state_dir / S3_SNAPSHOT}"
        status = "already up" if plan.name in running else "started"
        services[plan.name] = Service(plan.name, record["port"], record["url"], record["pid"], log, status, note)
    return services


def stack_down(state_dir: Path = DEFAULT_STATE, timeout: float = 20) -> list[str]:
    """Stop the processes recorded in the state folder (whole process groups); returns the names that were running.
    moto's S3 holds objects in memory only: its bucket is saved to the state folder first (``S3_SNAPSHOT``), and the
    next ``stack_up`` loads it back, as the stack's MLflow and Prefect databases keep pointing into it."""
    state_dir = Path(state_dir)
    records = _read_records(state_dir)
    save_moto_bucket(state_dir, records)
    stopped = _stop_groups(records, timeout)
    for name in records:
        (state_dir / f"{name}.pid").unlink(missing_ok=True)
    (state_dir / "stack.json").unlink(missing_ok=True)
    return [name for name in ORDER if name in stopped] + sorted(set(stopped) - set(ORDER))


def save_moto_bucket(state_dir: Path, records: dict[str, dict[str, Any]]) -> int:
    """Save the bucket of a running moto S3 of this stack to ``state_dir / S3_SNAPSHOT``; how many objects."""
    path = state_dir / "stack.json"
    if "s3" not in records or not _is_ours(records["s3"]) or not path.exists():
        return 0
    config = json.loads(path.read_text())
    if not config.get("moto"):
        return 0
    try:
        return save_bucket(_moto_client(config["s3_endpoint"]), config["bucket"], state_dir / S3_SNAPSHOT)
    except Exception as e:  # keep the previous snapshot, and say why this one was not taken: stopping goes on
        print(f"could not save the local S3 bucket to {state_dir / S3_SNAPSHOT}: {e}", file=sys.stderr)
        return 0


def stack_status(state_dir: Path = DEFAULT_STATE) -> dict[str, dict]:
    """Per recorded service: pid, port, url, alive (our process still runs) and healthy (alive and answering)."""
    status = {}
    for name, record in _read_records(Path(state_dir)).items():
        alive = _is_ours(record)
        health = record["url"] + HEALTH_PATHS.get(name, "/")
        healthy = alive and _http_ok(health)
        status[name] = {
            "pid": record["pid"],
            "port": record["port"],
            "url": record["url"],
            "alive": alive,
            "healthy": healthy,
        }
    return status


def stack_env(state_dir: Path = DEFAULT_STATE) -> dict[str, str]:
    """The environment that points clients at the stack (fake credentials only for moto, never real ones)."""
    path = Path(state_dir) / "stack.json"
    if not path.exists():
        raise StackError(f"no stack recorded in {path.parent}; run `rlhf stack up` first")
    return dict(json.loads(path.read_text())["env"])
