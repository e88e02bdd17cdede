"""Pipeline benchmark: wall time and peak memory of the default ``rlhf run`` and of its cached rerun.

    python -m bench.pipeline [--set section.key=value ...]

Runs in a fresh temporary folder with its own Prefect home, so the first run starts cold (empty caches)
and the second finds every phase cached. Peak memory is the largest resident set of the run's processes
(the CLI process or Prefect's temporary server), from wait4's rusage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr.read().decode()[-4000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args()
    rlhf = str(Path(sys.executable).parent / "rlhf")
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-pipeline-") as tmp:
        cwd = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env |= {"PREFECT_HOME": str(cwd / "prefect"), "RLHF_CACHE_DIR": str(cwd / "cache")}
        command = [rlhf, "run", "--json", str(cwd / "summary.json")]
        for item in args.overrides:
            command += ["--set", item]
        first_wall, first_rss = timed_run(command, cwd, env)
        first = json.loads((cwd / "summary.json").read_text())
        assert all(state == "Completed" for state in first["phases"].values()), first["phases"]
        rerun_wall, rerun_rss = timed_run(command, cwd, env)
        phases = json.loads((cwd / "summary.json").read_text())["phases"]
        assert all(state == "Cached" for state in phases.values()), phases
    print(f"{'run':<14}{'wall s':>10}{'peak RSS MiB':>16}")
    print(f"{'first':<14}{first_wall:>10.1f}{first_rss:>16.0f}")
    print(f"{'cached rerun':<14}{rerun_wall:>10.1f}{rerun_rss:>16.0f}")
    print(f"cached rerun costs {100 * rerun_wall / first_wall:.1f}% of the first run's wall time")
    print(f"first run: SFT gold reward {first['sft']['gold_reward']:.3f}")
    for row in first["iterations"]:
        print("  " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
