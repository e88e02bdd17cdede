"""Resume benchmark: what checkpointing costs a phase, and what a crash costs with it.

    python -m bench.resume [--crash-at 25] [--every 10]

On the default toy world (untrained tiny Llama as policy and reference, a reward model made from it: the
cost of a PPO step does not depend on how good the models are) it runs the default PPO phase three times,
checkpoints to a local folder store:
1. without checkpoints;
2. with a checkpoint every ``--every`` steps;
3. with checkpoints, crashed after step ``--crash-at`` (an exception from the metrics callback), then
   resumed in a fresh loop from the last checkpoint.
It prints the wall time of each, the checkpoint size, and the overheads, and checks that the resumed
policy equals the uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from infra.artifacts import PhaseInputs
from infra.checkpoints import StoreCheckpointer
from infra.storage import LocalStore, folder_digest
from rlhf_core.config import PPOConfig
from rlhf_core.data import DataConfig
from rlhf_core.modeling import load_scorer, load_tokenizer
from tasks.data import write_data
from tasks.ppo import run_ppo


class Crash(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crash-at", type=int, default=25, help="PPO step after which the first attempt dies.")
    parser.add_argument("--every", type=int, default=PPOConfig().checkpoint_every, help="Checkpoint interval.")
    args = parser.parse_args()
    config = PPOConfig(checkpoint_every=args.every)
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-resume-") as tmp:
        root = Path(tmp)
        write_data(root / "data", 0, DataConfig())
        base = root / "data" / "base_model"
        torch.manual_seed(0)
        load_scorer(base).save_pretrained(root / "rm")
        load_tokenizer(base).save_pretrained(root / "rm")  # a reward artifact holds its tokenizer
        store = LocalStore(root / "store")

        def ppo(name: str, checkpointer: StoreCheckpointer | None, on_metrics=None) -> float:
            start = time.perf_counter()
            inputs = PhaseInputs(data=root / "data", policy=base, sft=base, reward=root / "rm")
            run_ppo(inputs, root / name, config=config, seed=0, on_metrics=on_metrics, checkpointer=checkpointer)
            return time.perf_counter() - start

        plain = ppo("plain", None)
        checkpointed = ppo("checkpointed", StoreCheckpointer(store, "bench/a", args.every))
        sizes = [p.stat().st_size for p in (root / "store" / "bench").rglob("*") if p.is_file()]

        def crash(metrics: dict, step: int) -> None:
            if step == args.crash_at:
                raise Crash

        start = time.perf_counter()
        with contextlib.suppress(Crash):
            ppo("crashed", StoreCheckpointer(store, "bench/b", args.every), crash)
        crashed = time.perf_counter() - start
        resumed = ppo("resumed", StoreCheckpointer(store, "bench/b", args.every))
        same = folder_digest(root / "resumed") == folder_digest(root / "checkpointed")
    lost = args.crash_at - args.crash_at // args.every * args.every
    print(
        f"PPO phase, default config ({config.steps} steps x {config.rollout_batch_size} rollouts), CPU threads "
        f"{torch.get_num_threads()}"
    )
    print(f"  without checkpoints            {plain:7.1f} s")
    print(
        f"  checkpoint every {args.every:<3d} steps     {checkpointed:7.1f} s  (+{checkpointed / plain - 1:.1%}); "
        f"last checkpoint {sum(sizes) / 2**20:.1f} MiB"
    )
    print(f"  crashed after step {args.crash_at:<3d}        {crashed:7.1f} s")
    print(f"  resumed to the end             {resumed:7.1f} s  (redid {lost} steps)")
    print(
        f"  crash + resume vs uninterrupted: {crashed + resumed:.1f} s vs {checkpointed:.1f} s "
        f"(+{(crashed + resumed) / checkpointed - 1:.1%}); same policy: {same}"
    )


if __name__ == "__main__":
    main()
