"""A phase as N data-parallel processes: :func:`launch` starts them with torchrun from inside the phase's task,
shows their output as it comes, waits, and fails with the ranks' last lines if any rank fails.

Each rank runs ``python -m tasks.launch SPEC.json``, which calls the entry point the spec names
(``"tasks.sft:run_sft"``) with the spec's keyword arguments, validated against the entry's signature so that
folders and configs come back from JSON as the types it declares. Only rank 0 logs metrics (to the phase's MLflow
run, in the phase's namespace) and writes what the entry returns.
"""

from __future__ import annotations

import importlib
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

from pydantic import ConfigDict, validate_call
from pydantic_core import to_jsonable_python

from tasks.common import PhaseLog, phase_logger

_EXCEPTION = re.compile(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception): ")


def launch(entry: str, kwargs: dict[str, Any], *, num_processes: int, log: PhaseLog | None = None) -> dict[str, float]:
    """``entry(**kwargs, on_metrics=...)`` as ``num_processes`` ranks; returns what rank 0's call returned."""
    with tempfile.TemporaryDirectory(prefix="rlhf-launch-") as tmp:
        spec = {
            "entry": entry,
            "kwargs": to_jsonable_python(kwargs),
            "result": str(Path(tmp) / "result.json"),
            "mlflow": [log.run.client.tracking_uri, log.run.run_id] if log is not None and log.run else None,
            "namespace": log.phase.namespace if log is not None else None,
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        run_ranks(Path(tmp) / "spec.json", num_processes, log.label if log else entry)
        return json.loads(Path(spec["result"]).read_text())


def run_entry(
    entry: Callable[..., dict[str, float]],
    kwargs: dict[str, Any],
    *,
    num_processes: int,
    log: PhaseLog,
    **in_process: Any,
) -> dict[str, float]:
    """A phase's entry point as ``num_processes`` ranks (``kwargs`` travel as JSON), or with one, here, given
    ``in_process`` too: what only this process can hand over (a checkpointer, an alarm reporter)."""
    if num_processes > 1:
        return launch(f"{entry.__module__}:{entry.__qualname__}", kwargs, num_processes=num_processes, log=log)
    return entry(**kwargs, on_metrics=log, **in_process)


def run_ranks(spec: Path, n: int, label: str) -> None:
    """``torchrun --standalone`` with ``n`` processes of this module; RuntimeError with the last output if any fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    command += ["-m", "tasks.launch", str(spec)]
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
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
    on_metrics = None
    if rank == 0 and spec["mlflow"]:
        from mlflow.tracking import MlflowClient

        from infra.catalog import PHASES
        from infra.tracking import RunLogger

        run = RunLogger(MlflowClient(spec["mlflow"][0]), spec["mlflow"][1])
        on_metrics = PhaseLog(PHASES[spec["namespace"]], None, 0, run)

    result = entry(**spec["kwargs"], on_metrics=on_metrics)
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    rank_main(json.loads(Path(sys.argv[1]).read_text()))
