"""Quality benchmark: SFT, then iterations of (preferences -> reward model -> PPO -> evaluation), or with
``--set algorithm=dpo`` of (preferences -> DPO -> evaluation), in-process on the toy world, through the same phase
functions the Prefect tasks call, with the pipeline's seeds and inputs (DPO's pairs sampled from the current policy
with ``dpo.online``, else from the SFT model; its reference the SFT model or the previous policy).

    python -m bench.quality --seeds 0 1 2 [--set ppo.steps=60 ...]

Targets (issue 17): win rate vs SFT >= 0.80 after iteration 3, gold reward above SFT's in every iteration, mean KL
at most 5 nats, for every seed. With several seeds it also prints the mean final win rate and its standard error
from the spread between seeds: a change of rounding (thread count, CPU, how a forward is batched) re-draws each
seed's run, so two versions of the code compare by that mean, not seed by seed (README, "How far these numbers
repeat").
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import transformers

from flows.config import PipelineConfig, load_config
from infra.artifacts import BASE_MODEL_DIR, PhaseInputs, read_pairs
from rlhf_core.world import gold_components
from tasks.data import write_data
from tasks.dpo import run_dpo
from tasks.evaluate import run_baseline, run_evaluation
from tasks.ppo import run_ppo
from tasks.preferences import run_preferences
from tasks.reward import reward_start, run_reward
from tasks.sft import run_sft

COLUMNS = (
    "iteration",
    "win_rate_vs_sft",
    "gold_reward",
    "sft_gold_reward",
    "reward",
    "kl",
    "entropy",
    "response_length",
    "rm_val_accuracy",
    "labeler_agreement",
    "wall_s",
)


def attribute_means(samples: list[dict]) -> str:
    """Mean gold reward per attribute over the evaluation samples, the policy's beside the SFT model's."""
    means = {}
    for who in ("policy", "sft"):
        parts = [gold_components(row["prompt"], row[who]) for row in samples]
        means[who] = {name: sum(p[name] for p in parts) / len(parts) for name in parts[0]}
    return "  ".join(f"{name}={means['policy'][name]:+.2f} ({means['sft'][name]:+.2f})" for name in means["sft"])


@contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[name]``."""
    start = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def dpo_policy_phase(
    config: PipelineConfig, *, sft: Path, policy: Path, preference_dirs: list[Path], it: Path, seed: int
) -> None:
    """The iteration's DPO phase as the pipeline runs it: on every iteration's pairs or the latest, against the SFT
    model or the previous policy."""
    dirs = preference_dirs if config.dpo.pairs == "all" else preference_dirs[-1:]
    reference = sft if config.dpo.reference == "sft" else policy
    pairs = [pair for d in dirs for pair in read_pairs(d)]
    run_dpo(policy, reference, pairs, it / "policy", sft_dir=sft, config=config.dpo, seed=seed)


Observer = Callable[[int, Path, list[dict]], dict[str, float]]  # (iteration, its folder, evaluation rows) -> figures


def run_seed(
    config: PipelineConfig, root: Path, *, observe: Observer | None = None, seconds: dict[str, float] | None = None
) -> list[dict[str, float]]:
    """The pipeline's phases in-process in ``root``: a row of figures per iteration. ``observe`` adds figures of its
    own to each; ``seconds`` collects each phase's wall time (``sft``, ``preferences-1``, ...)."""
    seconds = {} if seconds is None else seconds
    start = time.perf_counter()
    seed = config.seed
    data, sft = root / "data", root / "sft"
    with timed(seconds, "data"):
        write_data(data, seed, config.data)
    with timed(seconds, "sft"):
        run_sft(data / BASE_MODEL_DIR, data, sft, config=config.sft, seed=seed)
    with timed(seconds, "sft-baseline"):
        baseline = run_baseline(data, sft, config=config.evaluation, seed=seed * 1000)  # as the pipeline samples it
    print(f"  data + SFT: {time.perf_counter() - start:.0f} s", flush=True)
    policy, preference_dirs, rows = sft, [], []
    for k in range(1, config.iterations + 1):
        t0 = time.perf_counter()
        it = root / f"iteration-{k}"
        iteration_seed = seed * 1000 + k
        preference_dirs.append(it / "preferences")
        phase_s = {}
        with timed(phase_s, "preferences"):
            sampler = sft if config.algorithm == "dpo" and not config.dpo.online else policy
            inputs = PhaseInputs(data=data, policy=sampler)
            pref = run_preferences(inputs, preference_dirs[-1], config=config.preferences, seed=iteration_seed)
        if config.algorithm == "dpo":
            rm, reward = {}, None
            with timed(phase_s, "dpo"):
                dpo_policy_phase(
                    config, sft=sft, policy=policy, preference_dirs=preference_dirs, it=it, seed=iteration_seed
                )
        else:
            previous = root / f"iteration-{k - 1}" / "reward" if k > 1 else None
            with timed(phase_s, "reward"):
                init = reward_start(previous, data, sft, config.reward)
                rm = run_reward(init, preference_dirs, it / "reward", config=config.reward, seed=iteration_seed)
            reward = it / "reward"
            with timed(phase_s, "ppo"):
                inputs = PhaseInputs(data=data, policy=policy, sft=sft, reward=reward)
                run_ppo(inputs, it / "policy", config=config.ppo, seed=iteration_seed)
        inputs = PhaseInputs(data=data, policy=it / "policy", sft=sft, reward=reward)
        policy = it / "policy"
        (it / "evaluation").mkdir()
        with timed(phase_s, "evaluation"):
            metrics, samples = run_evaluation(
                inputs, it / "evaluation", baseline=baseline, config=config.evaluation, seed=iteration_seed
            )
        rows.append(
            {
                "iteration": k,
                **metrics,
                **({"rm_val_accuracy": rm["val_accuracy"]} if rm else {}),
                "labeler_agreement": pref["labeler_agreement"],
                "wall_s": time.perf_counter() - t0,
            }
        )
        seconds |= {f"{name}-{k}": s for name, s in phase_s.items()}
        print("  " + "  ".join(f"{c}={rows[-1][c]:.3f}" for c in COLUMNS if c in rows[-1]), flush=True)
        if config.data.gold_reward is None:  # the toy world's judge has attributes
            print(f"    gold by attribute, policy (SFT): {attribute_means(samples)}", flush=True)
        if observe is not None:
            rows[-1] |= (observed := observe(k, it, samples))
            print("    " + "  ".join(f"{name}={value:.3f}" for name, value in observed.items()), flush=True)
        print("    seconds by phase: " + "  ".join(f"{name}={s:.0f}" for name, s in phase_s.items()), flush=True)
    rows[-1]["total_s"] = time.perf_counter() - start
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    verdicts, final_win_rates = [], []
    for seed in args.seeds:
        config = load_config(None, [*args.overrides, f"seed={seed}"])
        print(f"seed {seed}", flush=True)
        with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
            rows = run_seed(config, Path(tmp))
        last = rows[-1]
        ok = (
            last["win_rate_vs_sft"] >= 0.80
            and all(r["gold_reward"] > r["sft_gold_reward"] for r in rows)
            and all(r["kl"] <= 5 for r in rows)
        )
        verdicts.append(ok)
        final_win_rates.append(last["win_rate_vs_sft"])
        print(
            f"seed {seed}: final win rate {last['win_rate_vs_sft']:.3f}, total {last['total_s']:.0f} s, "
            f"targets {'met' if ok else 'MISSED'}",
            flush=True,
        )
    print(f"{sum(verdicts)}/{len(verdicts)} seeds met every target")
    if len(final_win_rates) > 1:
        # A change of rounding re-draws every seed's run, so compare configurations by this mean, not seed by seed.
        n = len(final_win_rates)
        mean, sem = statistics.mean(final_win_rates), statistics.stdev(final_win_rates) / math.sqrt(n)
        print(f"final win rate over {n} seeds: mean {mean:.3f}, standard error {sem:.3f}")


if __name__ == "__main__":
    main()
