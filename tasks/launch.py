"""A phase as N data-parallel processes: :func:`launch_sft` starts them with torchrun from inside the phase's
task, shows their output as it comes, waits, and fails with the ranks' last lines if any rank fails. Each rank
runs ``python -m tasks.launch SPEC.json``; only rank 0 logs metrics (to the phase's MLflow run) and writes the
checkpoint and the result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from infra.deepspeed_engine import DeepSpeedConfig
from rlhf_core.sft import SFTConfig
from tasks.common import PhaseLog, phase_logger

_EXCEPTION = re.compile(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception): ")


def launch_sft(
    base_dir: Path,
    data_dir: Path,
    out_dir: Path,
    config: SFTConfig,
    seed: int,
    deepspeed: DeepSpeedConfig,
    log: PhaseLog | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """:func:`tasks.sft.run_sft` as ``deepspeed.num_processes`` ranks; returns rank 0's metrics."""
    with tempfile.TemporaryDirectory(prefix="rlhf-launch-") as tmp:
        spec = {
            "phase": "sft",
            "base_dir": str(base_dir),
            "data_dir": str(data_dir),
            "out_dir": str(out_dir),
            "config": config.model_dump(),
            "seed": seed,
            "deepspeed": deepspeed.model_dump(),
            "trust_remote_code": trust_remote_code,
            "result": str(Path(tmp) / "result.json"),
            "mlflow": [log.run.client.tracking_uri, log.run.run_id] if log is not None and log.run else None,
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        run_ranks(Path(tmp) / "spec.json", deepspeed.num_processes, log.label if log else "sft")
        return json.loads(Path(spec["result"]).read_text())


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
    from tasks.sft import run_sft

    rank = int(os.environ["RANK"])
    on_metrics = None
    if rank == 0 and spec["mlflow"]:
        from mlflow.tracking import MlflowClient

        from infra.tracking import RunLogger

        run = RunLogger(MlflowClient(spec["mlflow"][0]), spec["mlflow"][1])
        on_metrics = run.log_metrics
    metrics = run_sft(
        Path(spec["base_dir"]),
        Path(spec["data_dir"]),
        Path(spec["out_dir"]),
        SFTConfig(**spec["config"]),
        spec["seed"],
        on_metrics,
        spec["trust_remote_code"],
        None,
        DeepSpeedConfig(**spec["deepspeed"]),
    )
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps(metrics))


if __name__ == "__main__":
    rank_main(json.loads(Path(sys.argv[1]).read_text()))
