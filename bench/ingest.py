"""Ingestion benchmark: how long reading and checking a large preference dataset takes, and how much memory.

    python -m bench.ingest [--rows 100000] [--format hub|jsonl]

Writes ``--rows`` preference pairs in the toy world's vocabulary as a dataset folder in the hub's layout
(``data/train-*.parquet`` and a README card, read with ``datasets.load_dataset`` as a hub id is) or as one JSONL file,
then runs the data check the pipeline runs before anything is written (infra/user_data.check_data: load, map to our
columns, every row's text and token count checked against the toy tokenizer, the gold judge on every pair). It prints
the rows, the wall time of the check, and the process's peak resident memory before and after it. Run it on a quiet
machine: each figure is one run.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_core import world


def rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng, prompts = random.Random(seed), world.all_prompts()
    return [
        {"prompt": p, "chosen": world.demonstration(p, 1.0, rng), "rejected": world.demonstration(p, 0.0, rng)}
        for p in (rng.choice(prompts) for _ in range(n))
    ]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--format", choices=["hub", "jsonl"], default="hub")
    args = parser.parse_args()

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from infra.user_data import check_data
    from rlhf_core.data import DataConfig

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("HF_DATASETS_CACHE", f"{tmp}/hf-cache")
        table = rows(args.rows)
        if args.format == "hub":
            source = Path(tmp) / "dataset"
            (source / "data").mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(table), source / "data" / "train-00000-of-00001.parquet")
            (source / "README.md").write_text("# preferences\n")
        else:
            source = Path(tmp) / "preferences.jsonl"
            source.write_text("".join(json.dumps(r) + "\n" for r in table))
        size_mib = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2**20
        del table
        before = peak_mib()
        started = time.perf_counter()
        checked = check_data(DataConfig(human_preferences=str(source)), seed=0, max_tokens=64)
        seconds = time.perf_counter() - started
        print(
            f"{args.format}: {len(checked.preferences)} rows ({size_mib:.1f} MiB on disk) checked in {seconds:.1f} s "
            f"({len(checked.preferences) / seconds:,.0f} rows/s); peak RSS {before:.0f} MiB before the check, "
            f"{peak_mib():.0f} MiB after"
        )


if __name__ == "__main__":
    main()
