"""Pipeline benchmark: wall time and peak memory of the default ``rlhf run``, of running it again (an identical run
that completed: reported from its record, nothing run), and of ``--rerun`` (the flow again, every phase from Prefect's
cache), and where each run's time goes.

    python -m bench.pipeline [--set section.key=value ...]

Runs in a fresh temporary folder with its own Prefect home, so the first run starts cold (empty caches). Peak memory
is the largest resident set of the run's processes (the CLI process or Prefect's temporary server), from wait4's
rusage. The breakdown comes from the timestamps of the run's own log (``--verbose``): start-up (imports, config,
input checks, with Prefect's temporary server starting beside them) until the flow begins, the phases, publishing
(registry, report, plots) after the last phase until the flow ends, and shutting down.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) \| ")
# the breakdown's parts: each ends at the first (last, for "phases") log line that matches
MILESTONES = {
    "start-up": r"Beginning flow run",
    "phases": r"Task run .* Finished in state",
    "publishing": r"Flow run 'rlhf-[^']*' - Finished in state",
}


def timed_run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, dict[str, float]]:
    """Wall seconds, peak RSS (MiB) and the breakdown (:data:`MILESTONES`, seconds) of one ``rlhf run``."""
    log = cwd / "run.log"
    began, start = datetime.datetime.now(), time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([*args, "--verbose"], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{log.read_text()[-4000:]}")
    return wall, usage.ru_maxrss / 1024, breakdown(log.read_text().splitlines(), began, wall)


def breakdown(lines: list[str], began: datetime.datetime, wall: float) -> dict[str, float]:
    """Seconds between the run's start, its milestones' log lines and its end."""
    midnight = began.replace(hour=0, minute=0, second=0, microsecond=0)
    stamps: dict[str, float] = {}
    for line in lines:
        if not (match := _LOG_TIME.match(line)):
            continue
        h, m, sec = match.groups()
        at = (midnight + datetime.timedelta(hours=int(h), minutes=int(m), seconds=float(sec)) - began).total_seconds()
        for name, pattern in MILESTONES.items():
            if re.search(pattern, line) and (name == "phases" or name not in stamps):
                stamps[name] = at
    parts, previous = {}, 0.0
    for name in MILESTONES:
        if name in stamps:
            parts[name], previous = stamps[name] - previous, stamps[name]
    return parts | {"shutdown": wall - previous}


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
        first_wall, first_rss, first_parts = timed_run(command, cwd, env)
        first = json.loads((cwd / "summary.json").read_text())
        assert all(state == "Completed" for state in first["phases"].values()), first["phases"]
        again_wall, again_rss, _ = timed_run(command, cwd, env)
        again = json.loads((cwd / "summary.json").read_text())
        assert again.get("up_to_date") is True, again["phases"]
        rerun_wall, rerun_rss, rerun_parts = timed_run([*command, "--rerun"], cwd, env)
        phases = json.loads((cwd / "summary.json").read_text())["phases"]
        assert all(state == "Cached" for state in phases.values()), phases
    print(f"{'run':<30}{'wall s':>10}{'peak RSS MiB':>16}")
    print(f"{'first':<30}{first_wall:>10.1f}{first_rss:>16.0f}")
    print(f"{'again (up to date)':<30}{again_wall:>10.1f}{again_rss:>16.0f}")
    print(f"{'--rerun (every phase cached)':<30}{rerun_wall:>10.1f}{rerun_rss:>16.0f}")
    print(f"running it again costs {100 * again_wall / first_wall:.1f}% of the first run's wall time")
    print(f"\n{'where the time goes, s':<26}{'first':>10}{'--rerun':>14}")
    for name in [*MILESTONES, "shutdown"]:
        print(f"{name:<26}{first_parts.get(name, float('nan')):>10.1f}{rerun_parts.get(name, float('nan')):>14.1f}")
    print(f"first run: SFT gold reward {first['sft']['gold_reward']:.3f}")
    for row in first["iterations"]:
        print("  " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
