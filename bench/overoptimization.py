"""Reward-model over-optimization on the toy world, after Gao et al. 2022 ("Scaling Laws for Reward Model
Overoptimization").

    python -m bench.overoptimization [--steps 100] [--every 10] [--seed 0] [--betas 0.01 0.03 0.1 0.3 1]
                                     [--eval-prompts 256] [--out bench-out/overoptimization]

The models: one toy-world iteration (``rlhf run`` with ``reward.ensemble_size=3``, ``reward.aggregate=
mean_minus_std``, made once in ``$RLHF_CACHE_DIR/bench-overopt-world``): the SFT policy, iteration 1's preference
pairs, and three reward models trained on them (seeds 0-2). "One RM" is the first of them alone; "ensemble" is the
three, scored as their mean less their standard deviation (Coste et al. 2023).

PPO runs from the SFT policy, for ``--steps`` steps of the default phase (64 rollouts a step), against each of the
two, with no KL penalty (``kl_coef=0``, no adaptive control, no KL stop) and with the default adaptive penalty.
At steps 2, 4, 6 and 8 and every ``--every`` steps the policy is evaluated on ``--eval-prompts`` held-out prompts:
KL to the SFT policy (nats per response, summed log-ratio of its own samples), the proxy score (the reward it
optimizes) and the gold reward. DPO runs from the SFT policy on the same pairs once per ``--betas`` value (the
default phase otherwise), each a point.

Fit (Gao et al., eq. 2, the RL form): R(d) = d (alpha - beta log d), with d = sqrt(KL) and R the gold reward's gain
over the SFT policy's (its step-0 point, sampled like the others), by least squares on R/d = alpha - beta log d over
the points with KL > 0.01 (a curve whose sqrt(KL) spans less than a factor of 2, held near its target by a KL
penalty, gets none). Its peak, where beta > 0, is at d* = exp(alpha/beta - 1), with R(d*) = beta d*. Printed:
every point, the fit and peak of each PPO curve, the best measured gold of each; saved: ``overoptimization.png``
(gold and proxy against sqrt(KL)) and ``overoptimization.json`` (all points and fits) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from bench.ppo_vs_trl import world_models
from infra.artifacts import PhaseInputs, data_judge, read_pairs, read_prompts
from rlhf_core.config import DPOConfig, EvalConfig, PPOConfig
from rlhf_core.evaluate import evaluate_policy, sample_baseline
from rlhf_core.modeling import load_policy, load_tokenizer
from rlhf_core.reward import ENSEMBLE_DIR, load_reward_function
from tasks.dpo import run_dpo
from tasks.ppo import run_ppo

ENSEMBLE_SETTINGS = ("reward.ensemble_size=3", "reward.aggregate=mean_minus_std")


def single_reward_model(ensemble_dir: Path, into: Path) -> Path:
    """The ensemble's first member alone, as a reward-model folder of its own."""
    shutil.copytree(ensemble_dir, into, ignore=shutil.ignore_patterns(ENSEMBLE_DIR))
    config_path = into / "config.json"
    config = json.loads(config_path.read_text()) | {"reward_aggregate": "mean"}
    config_path.write_text(json.dumps(config, indent=2))
    return into


@dataclass
class Evaluator:
    """The held-out evaluation of a policy's weights: KL to SFT, proxy score and gold reward."""

    data: Path
    sft: Path
    eval_prompts: int
    seed: int
    config: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.tokenizer = load_tokenizer(self.sft)
        self.sft_model = load_policy(self.sft).eval()
        self.policy = load_policy(self.sft).eval()
        self.gold_fn = data_judge(self.data)
        prompts = read_prompts(self.data, "eval")[: self.eval_prompts]
        self.baseline = sample_baseline(
            self.sft_model, self.tokenizer, prompts, gold_fn=self.gold_fn, config=self.config, seed=self.seed
        )

    def __call__(self, weights: dict[str, torch.Tensor], reward_dir: Path) -> dict[str, float]:
        self.policy.load_state_dict(weights)
        proxy = load_reward_function(reward_dir, self.tokenizer)
        with torch.random.fork_rng():  # the evaluation's sampling leaves the training run's random stream alone
            metrics, _ = evaluate_policy(
                self.policy,
                self.sft_model,
                self.tokenizer,
                self.baseline,
                reward_fn=proxy,
                gold_fn=self.gold_fn,
                config=self.config,
                seed=self.seed + 1,
            )
        return {name: metrics[name] for name in ("kl", "reward", "gold_reward", "sft_gold_reward", "win_rate_vs_sft")}


@dataclass
class Probe:
    """A checkpointer that keeps nothing: it evaluates the policy weights PPO hands it at steps 2, 4, 6 and 8 (where
    gold moves fastest without a KL penalty) and every ``interval`` steps."""

    interval: int
    evaluate: Callable[[int, dict[str, torch.Tensor]], None]
    every: int = 2  # how often PPO hands over its weights

    def restore(self) -> None:
        return None

    def save(self, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        if step < 10 or step % self.interval == 0:
            self.evaluate(step, weights["policy"])


def ppo_curve(
    inputs: PhaseInputs, evaluator: Evaluator, *, config: PPOConfig, seed: int, label: str
) -> list[dict[str, float]]:
    """PPO from SFT against ``inputs.reward``, the policy evaluated at step 0, as :class:`Probe` says and at the
    end."""
    points: list[dict[str, float]] = []

    def evaluate(step: int, weights: dict[str, torch.Tensor]) -> None:
        points.append({"step": step} | evaluator(weights, inputs.reward))
        row = points[-1]
        print(
            f"  {label} step {step:4d}: KL {row['kl']:7.2f}  proxy {row['reward']:6.3f}  gold {row['gold_reward']:6.3f}"
            f"  win {row['win_rate_vs_sft']:.3f}",
            flush=True,
        )

    evaluate(0, evaluator.sft_model.state_dict())
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-overopt-") as out:
        run_ppo(inputs, Path(out), config=config, seed=seed, checkpointer=Probe(config.checkpoint_every, evaluate))
        evaluate(config.steps, load_policy(out).state_dict())
    return points


def dpo_points(
    models: dict[str, Path], evaluator: Evaluator, reward_dir: Path, *, betas: list[float], seed: int
) -> list[dict[str, float]]:
    """One DPO phase from SFT on iteration 1's pairs per beta, evaluated with ``reward_dir`` as the proxy."""
    pairs, points = read_pairs(models["preferences"]), []
    for beta in betas:
        with tempfile.TemporaryDirectory(prefix="rlhf-bench-overopt-dpo-") as out:
            run_dpo(
                models["policy"], models["policy"], pairs, Path(out), sft_dir=models["policy"],
                config=DPOConfig(beta=beta), seed=seed,
            )  # fmt: skip
            points.append({"beta": beta} | evaluator(load_policy(out).state_dict(), reward_dir))
        row = points[-1]
        print(
            f"  dpo beta {beta:5.3f}: KL {row['kl']:7.2f}  proxy {row['reward']:6.3f}  gold {row['gold_reward']:6.3f}"
            f"  win {row['win_rate_vs_sft']:.3f}",
            flush=True,
        )
    return points


def fit_gold(points: list[dict[str, float]]) -> dict[str, float] | None:
    """Least squares of R/d = alpha - beta log d (Gao et al. 2022, eq. 2); None with fewer than 3 points or where
    sqrt(KL) spans less than a factor of 2 (a KL penalty holding KL near its target: no curve in KL to fit)."""
    gold_0 = points[0]["gold_reward"]  # the SFT policy, sampled in the same stream as the later points
    usable = [(math.sqrt(p["kl"]), p["gold_reward"] - gold_0) for p in points if p["kl"] > 0.01]
    if len(usable) < 3 or max(u[0] for u in usable) < 2 * min(u[0] for u in usable):
        return None
    d, gain = np.array([u[0] for u in usable]), np.array([u[1] for u in usable])
    design = np.stack([np.ones_like(d), -np.log(d)], 1)
    (alpha, beta), *_ = np.linalg.lstsq(design, gain / d, rcond=None)
    fit = {"alpha": float(alpha), "beta": float(beta), "points": len(usable)}
    if beta > 0:
        peak_d = math.exp(alpha / beta - 1)
        fit |= {"peak_sqrt_kl": peak_d, "peak_kl": peak_d**2, "peak_gold_gain": beta * peak_d}
    return fit


def plot(curves: dict[str, list[dict[str, float]]], fits: dict[str, dict | None], dpo: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (label, points), color in zip(curves.items(), ("C0", "C1", "C2", "C3"), strict=False):
        d = [math.sqrt(max(p["kl"], 0.0)) for p in points]
        gold_ax.plot(d, [p["gold_reward"] for p in points], "o-", color=color, label=label)
        proxy_ax.plot(d, [p["reward"] for p in points], "o--", color=color, label=label)
        if (fit := fits[label]) is not None:
            grid = np.linspace(max(min(d), 0.05), max(d), 100)
            gold_0 = points[0]["gold_reward"]
            gold_ax.plot(grid, gold_0 + grid * (fit["alpha"] - fit["beta"] * np.log(grid)), ":", color=color)
    if dpo:
        d = [math.sqrt(max(p["kl"], 0.0)) for p in dpo]
        gold_ax.plot(d, [p["gold_reward"] for p in dpo], "s-", color="C4", label="DPO over beta")
        proxy_ax.plot(d, [p["reward"] for p in dpo], "s--", color="C4", label="DPO over beta (one RM's score)")
        for x, p in zip(d, dpo, strict=True):
            gold_ax.annotate(f"{p['beta']:g}", (x, p["gold_reward"]), fontsize=7)
    gold_ax.set(xlabel="sqrt(KL to SFT), nats^0.5", ylabel="gold reward (held out)", title="gold (dotted: fit)")
    proxy_ax.set(xlabel="sqrt(KL to SFT), nats^0.5", ylabel="proxy (reward-model) score", title="proxy")
    for ax in (gold_ax, proxy_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="PPO steps of each curve")
    parser.add_argument("--every", type=int, default=10, help="evaluate every this many PPO steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--betas", type=float, nargs="*", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench-out/overoptimization"))
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = world_models(None, name="bench-overopt-world", settings=ENSEMBLE_SETTINGS)
    evaluator = Evaluator(models["data"], models["policy"], args.eval_prompts, args.seed)
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-overopt-rm-") as tmp:
        rewards = {"one RM": single_reward_model(models["reward"], Path(tmp) / "one"), "ensemble": models["reward"]}
        penalties = {
            "no KL penalty": PPOConfig(steps=args.steps, kl_coef=0.0, adaptive_kl=False, max_kl=None),
            "default KL": PPOConfig(steps=args.steps),
        }
        curves: dict[str, list[dict[str, float]]] = {}
        for reward_label, reward_dir in rewards.items():
            for penalty_label, config in penalties.items():
                label = f"{reward_label}, {penalty_label}"
                print(f"PPO: {label}", flush=True)
                inputs = PhaseInputs(
                    data=models["data"], policy=models["policy"], sft=models["policy"], reward=reward_dir
                )
                config = config.model_copy(update={"checkpoint_every": args.every})
                curves[label] = ppo_curve(inputs, evaluator, config=config, seed=args.seed, label=label)
        print("DPO over beta (proxy: one RM)", flush=True)
        dpo = dpo_points(models, evaluator, rewards["one RM"], betas=args.betas, seed=args.seed)
    fits = {label: fit_gold(points) for label, points in curves.items()}
    gold_0 = next(iter(curves.values()))[0]["gold_reward"]
    print(f"\nSFT policy's gold reward on {args.eval_prompts} held-out prompts: {gold_0:.3f}")
    print(f"{'curve':<30}{'alpha':>8}{'beta':>8}{'peak KL':>9}{'peak gain':>10}{'best gold':>10}{'at KL':>8}")
    for label, points in curves.items():
        best, fit = max(points, key=lambda p: p["gold_reward"]), fits[label] or {}
        print(
            f"{label:<30}{fit.get('alpha', float('nan')):8.3f}{fit.get('beta', float('nan')):8.3f}"
            f"{fit.get('peak_kl', float('nan')):9.2f}{fit.get('peak_gold_gain', float('nan')):10.3f}"
            f"{best['gold_reward']:10.3f}{best['kl']:8.2f}"
        )
    if dpo:
        best = max(dpo, key=lambda p: p["gold_reward"])
        print(
            f"{'DPO, best beta ' + format(best['beta'], 'g'):<30}{'':>43}{best['gold_reward']:10.3f}{best['kl']:8.2f}"
        )
    plot(curves, fits, dpo, args.out / "overoptimization.png")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "curves": curves, "fits": fits, "dpo": dpo}
    (args.out / "overoptimization.json").write_text(json.dumps(result, indent=2))
    print(f"\n{time.perf_counter() - start:.0f} s, {torch.get_num_threads()} threads; plot and points in {args.out}")


if __name__ == "__main__":
    main()
