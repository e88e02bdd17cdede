"""A phase as N data-parallel processes: :func:`launch` starts them with torchrun from inside the phase's task,
shows their output as it comes, waits, and fails with the ranks' last lines if any rank fails.

Each rank runs ``python -m tasks.launch SPEC.json``, which calls the entry point the spec names
(``"tasks.sft:run_sft"``) with the spec's keyword arguments, validated against the entry's signature so that
folders and configs come back from JSON as the types it declares. Every rank opens the phase's checkpointer from
its spec (the ranks save and restore together). Only rank 0 logs metrics (to the phase's MLflow run, in the
phase's namespace), reports a resume and the training-health alarms as the phase's own process would, and writes
what the entry returns.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, validate_call
from pydantic_core import to_jsonable_python

from infra.checkpoints import CheckpointSpec
from infra.deepspeed_config import DeepSpeedConfig
from rlhf_core.config import ComputeConfig
from tasks.common import (
    PhaseLog,
    RunContext,
    Workspace,
    alarm_reporter,
    phase_logger,
    resume_reporter,
    world_size,
)

RESULT = "result.json"
_EXCEPTION = re.compile(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception): ")


def launch(
    entry: str,
    kwargs: dict[str, Any],
    *,
    num_processes: int,
    log: PhaseLog | None = None,
    checkpoint: CheckpointSpec | None = None,
) -> dict[str, float]:
    """``entry(**kwargs, on_metrics=...)`` as ``num_processes`` ranks, with ``checkpointer=`` opened from
    ``checkpoint`` when given; returns what rank 0's call returned."""
    with tempfile.TemporaryDirectory(prefix="rlhf-launch-") as tmp:
        spec = write_spec(Path(tmp), entry, kwargs, log=log, checkpoint=checkpoint)
        compute = kwargs.get("compute")
        threads = compute.threads if isinstance(compute, ComputeConfig) else None
        run_ranks(spec, num_processes, log.label if log else entry, threads=threads)
        return json.loads((Path(tmp) / RESULT).read_text())


def write_spec(
    folder: Path,
    entry: str,
    kwargs: dict[str, Any],
    *,
    log: PhaseLog | None = None,
    checkpoint: CheckpointSpec | None = None,
) -> Path:
    """The ranks' ``spec.json`` in ``folder``, where rank 0 writes its result too (``RESULT``)."""
    spec = {
        "entry": entry,
        "kwargs": to_jsonable_python(kwargs),
        "result": str(folder / RESULT),
        "mlflow": [log.run.client.tracking_uri, log.run.run_id] if log is not None and log.run else None,
        "namespace": log.phase.namespace if log is not None else None,
        "label": log.label if log is not None else entry,
        "checkpoint": checkpoint.model_dump() if checkpoint is not None else None,
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder / "spec.json"


def run_entry(
    entry: Callable[..., dict[str, float]],
    context: RunContext,
    work: Workspace,
    *,
    deepspeed: DeepSpeedConfig | None,
    compute: ComputeConfig,
    **kwargs: Any,
) -> dict[str, float]:
    """A training phase's entry point (SFT, reward model, PPO) with ``kwargs`` and what every one takes: the engine's
    settings and ``trust_remote_code``. As ``deepspeed.num_processes`` ranks (the arguments and where the
    checkpoints go travel as JSON), or with one, here. Either way it gets the workspace's metrics callback and
    checkpointer and, where the entry takes one, an alarm reporter."""
    kwargs |= {"trust_remote_code": context.trust_remote_code, "deepspeed": deepspeed, "compute": compute}
    log, checkpointer = work.log, work.checkpointer
    if (num_processes := world_size(deepspeed)) > 1:
        if checkpointer is not None and checkpointer.spec is None:
            raise ValueError("ranks reopen the phase's checkpointer from its spec: open it with CheckpointSpec.open")
        checkpoint = checkpointer.spec if checkpointer is not None else None
        name = f"{entry.__module__}:{entry.__qualname__}"
        return launch(name, kwargs, num_processes=num_processes, log=log, checkpoint=checkpoint)
    return entry(**kwargs, on_metrics=log, checkpointer=checkpointer, **_alarms(entry, log))


def _alarms(entry: Callable[..., Any], log: PhaseLog) -> dict[str, Any]:
    """``on_alarm=`` for an entry that watches training-health alarms (PPO)."""
    return {"on_alarm": alarm_reporter(log)} if "on_alarm" in inspect.signature(entry).parameters else {}


def rank_command(spec: Path, n: int) -> list[str]:
    """``torchrun --standalone`` with ``n`` processes of this module, each running ``spec``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    return [*command, "-m", "tasks.launch", str(spec)]


def run_ranks(spec: Path, n: int, label: str, *, threads: int | None = None) -> None:
    """:func:`rank_command` (each rank on ``threads`` CPU threads, else ``$OMP_NUM_THREADS``, else one), its output
    shown as it comes; RuntimeError with the last output if a rank fails."""
    command = rank_command(spec, n)
    env = os.environ | {"OMP_NUM_THREADS": str(threads or os.environ.get("OMP_NUM_THREADS", "1"))}
    tail: deque[str] = deque(maxlen=30)
    errors: list[str] = []  # the ranks' exception lines, to name the cause above torchrun's own summary
    logger = phase_logger()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            logger.info(f"{label} ranks: {line.rstrip()}")
            if _EXCEPTION.match(line) and "ChildFailedError" not in line:
                errors.append(line.strip())
    if proc.returncode != 0:
        cause = errors[-1] if errors else "see the output"
        raise RuntimeError(
            f"{label}: a rank of {n} failed (torchrun exit {proc.returncode}): {cause}\nlast output:\n" + "".join(tail)
        )


def rank_main(spec: dict[str, Any]) -> None:
    """One rank: call the spec's entry point; rank 0 logs its metrics and writes its result."""
    module, _, name = spec["entry"].partition(":")
    entry = validate_call(
        getattr(importlib.import_module(module), name), config=ConfigDict(arbitrary_types_allowed=True)
    )
    rank = int(os.environ["RANK"])
    on_metrics, hooks = None, {}
    if rank == 0 and spec["namespace"]:
        from infra.catalog import PHASES

        run = None
        if spec["mlflow"]:
            from mlflow.tracking import MlflowClient

            from infra.tracking import RunLogger

            run = RunLogger(MlflowClient(spec["mlflow"][0]), spec["mlflow"][1])
        on_metrics = PhaseLog(PHASES[spec["namespace"]], None, 0, run)
        on_metrics.label = spec["label"]
        hooks = _alarms(entry, on_metrics)
    if spec["checkpoint"]:
        checkpoint = CheckpointSpec.model_validate(spec["checkpoint"])
        on_resume = resume_reporter(on_metrics, lambda: checkpointer.latest_uri) if on_metrics else None
        checkpointer = checkpoint.open(on_resume)
        hooks["checkpointer"] = checkpointer

    result = entry(**spec["kwargs"], on_metrics=on_metrics, **hooks)
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps(result))
    # Left to the interpreter's exit, the process group's threads were once torn down still running: a rank that had
    # finished its phase aborted ("terminate called without an active exception") and failed the phase.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    rank_main(json.loads(Path(sys.argv[1]).read_text()))
