"""What a default PPO phase learns, per seed: to compare the learning of two versions of the PPO loop.

    python -m bench.ppo_learning [--seeds 0 1 2] [--artifacts DIR] [--set key=value ...]

Runs the default PPO phase (``PPOConfig()``, ``--set`` overriding fields) from the toy world's SFT policy against
iteration 1's reward model (the models of ``bench.ppo_vs_trl``), once per seed, and prints the reward-model score,
KL to the reference and gold reward averaged over steps in four quarters of the phase, the phase's wall time, and
the mean and standard error over seeds. Run it in two checkouts to compare them: a speed-up that leaves learning per
sample unchanged leaves these within their standard errors.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.ppo_vs_trl import world_models
from infra.artifacts import PhaseInputs
from rlhf_core.config import PPOConfig
from tasks.ppo import run_ppo

METRICS = ("reward", "kl", "gold_reward")


def quarters(history: list[dict[str, float]], name: str) -> list[float]:
    size = len(history) // 4
    return [statistics.mean(row[name] for row in history[i * size : (i + 1) * size]) for i in range(4)]


def mean_and_stderr(values: list[float]) -> str:
    stderr = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):7.3f} ± {stderr:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--artifacts", type=Path, help="A local store with the SFT policy and reward model to use.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="ppo field=value")
    args = parser.parse_args()
    fields = dict(item.split("=", 1) for item in args.overrides)
    config = PPOConfig(**{key: yaml.safe_load(value) for key, value in fields.items()})
    models = world_models(args.artifacts)
    inputs = PhaseInputs(data=models["data"], policy=models["policy"], sft=models["policy"], reward=models["reward"])
    results = []
    for seed in args.seeds:
        history: list[dict[str, float]] = []
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="rlhf-bench-learning-") as tmp:
            run_ppo(inputs, Path(tmp), config=config, seed=seed, on_metrics=lambda m, _, h=history: h.append(m))
        results.append(
            {"seed": seed, "seconds": time.perf_counter() - start} | {m: quarters(history, m) for m in METRICS}
        )
        row = results[-1]
        print(
            f"seed {seed}: {row['seconds']:.1f} s; by quarter of {config.steps} steps: "
            + "; ".join(f"{m} " + " ".join(f"{v:.3f}" for v in row[m]) for m in METRICS),
            flush=True,
        )
    print(f"PPO phase {config.model_dump(exclude_defaults=True) or 'defaults'}, {torch.get_num_threads()} threads")
    print(f"{'':<22}" + "".join(f"{'quarter ' + str(q + 1):>20}" for q in range(4)))
    for m in METRICS:
        print(f"{m:<22}" + "".join(f"{mean_and_stderr([r[m][q] for r in results]):>20}" for q in range(4)))
    print(f"{'wall s':<22}{mean_and_stderr([r['seconds'] for r in results]):>20}")


if __name__ == "__main__":
    main()
