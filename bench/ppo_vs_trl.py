"""Our PPO loop against TRL 1.12's ``PPOTrainer``, side by side on the same models, prompts and configuration.

    python -m bench.ppo_vs_trl [--rounds 3] [--steps 6] [--threads 2] [--artifacts DIR]

The models are those of the default toy world after SFT: the SFT policy (also the reference), and iteration 1's
reward model (also the critic's start), which pools its score at the last token (``reward.pooling: last``), where
TRL reads a reward, from its scalar head alone (``reward.logprob_coef: 0``). ``--artifacts`` names a local store
(``rlhf-artifacts`` of an ``rlhf run``) holding exactly one SFT policy and one such iteration-1 reward model;
without it the bench makes them once with a short ``rlhf run`` in ``$RLHF_CACHE_DIR/bench-ppo-world``. TRL runs in
its own virtualenv, made on first use (``bench/trl_venv.py``): it is never a project dependency.

Matched configuration: 64 rollouts a step, up to 32 new tokens at temperature 1, minibatch 16, 4 epochs with no early
stop (``target_kl=None``; TRL has none), a fixed KL coefficient 0.15 (k1), clip ranges 0.2, gamma 1, lambda 0.95,
missing-EOS penalty 1.0, learning rate 3e-4 for policy and critic, fp32, ``--threads`` CPU threads. Each side runs
in a fresh process per round, the sides alternating so that load hits both; a round's first step (warm-up) is
dropped. Remaining semantic differences, none of which changes the work a step does:
- TRL trains policy and value model as one wrapper under one AdamW; we have two AdamW optimizers (same rate here).
- TRL reads the reward model's raw score; ours applies its normalization (gain and bias): a shift and a scale.
- TRL calls ``gc.collect()`` (and empties the device cache) twice a step; that is part of its step as shipped.
- Both keep the policy's log-probs from ``generate``'s scores (no recompute forward).
- TRL does not clip gradients; we clip policy and critic at norm 1.0.
- TRL puts the score one position after the EOS (a state the critic learns a value for); we put it on the last
  response token. TRL weighs its value loss by vf_coef / 2 in one backward; ours has its own optimizer and so
  no weight (under Adam, a constant factor on a loss of its own would change only its gradient clipping).
- We train on minibatches grouped by response length, their rollouts packed several to a row (``ppo.packing``), and
  the reference and critic score the rollout packed too; TRL trains uniformly random minibatches at the rollout's
  padded width.
- We run each minibatch's critic step in a thread beside its policy step, and the rollout's critic forward beside
  its reference forward, each on one of the two threads (``ppo.parallel_critic``): the same updates (bitwise, in the
  test), overlapped; TRL runs its one wrapper's forward and backward on both threads. So the parts of our step below
  (the rollout's forwards; the update's forwards, backward, optimizer step) overlap: their sum is more than the wall
  time.
See ``bench/trl_ppo_side.py`` for TRL's side in detail.

Printed: seconds per step and samples per second (median over rounds, with min-max), the ratio, and the ratio of
each round's medians (a round's two sides run minutes apart, so its ratio sees less of the machine's drift), where
our step's time goes, the share of padding in the trained positions, and MFU on useful (non-padding) tokens against
a float32 matmul peak measured here. FLOPs per useful token: 2N for a forward, 6N for a forward and backward, N the
parameters of a model without its input embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from infra.pinned_env import cache_dir

SAMPLES_PER_STEP = 64


def matched_config(steps: int) -> dict[str, Any]:
    """Our ``PPOConfig`` at the matched configuration (the defaults where they already match)."""
    return {
        "steps": steps,
        "rollout_batch_size": SAMPLES_PER_STEP,
        "minibatch_size": 16,
        "epochs": 4,
        "max_new_tokens": 32,
        "lr": 3e-4,
        "critic_lr": 3e-4,
        "adaptive_kl": False,
        "kl_coef": 0.15,
        "target_kl": None,
        "checkpoint_every": 0,
    }


# --- the models --------------------------------------------------------------------------------------------------

# TRL reads a reward from the scalar head at the sequence's last token: the reward model is made to score so
TRL_READABLE_REWARD = {"pooling": "last", "logprob_coef": 0.0}
TRL_READABLE_SETTINGS = tuple(f"reward.{key}={value}" for key, value in TRL_READABLE_REWARD.items())


def check_trl_readable(reward_dir: Path) -> None:
    """Refuse a reward model that scores otherwise than TRL reads one (:data:`TRL_READABLE_REWARD`)."""
    stored = json.loads((reward_dir / "config.json").read_text())
    for key, wanted in TRL_READABLE_REWARD.items():  # a model without the key scores as TRL reads
        if (value := stored.get(f"reward_{key}", wanted)) != wanted:
            raise SystemExit(
                f"--artifacts: the reward model in {reward_dir} has reward.{key}: {value}; TRL reads a reward from "
                f"the scalar head at the last token: make it with reward.{key}={wanted}"
            )


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected exactly one {pattern}, found {[p.name for p in found]}")
    return found[0]


def world_models(
    artifacts: Path | None, *, name: str = "bench-ppo-world", settings: tuple[str, ...] = ()
) -> dict[str, Path]:
    """The data, SFT policy, iteration-1 preference pairs and reward model folders of a one-iteration toy-world run
    (``settings``: more ``--set`` items for it), made once in ``$RLHF_CACHE_DIR/<name>`` unless ``artifacts`` names
    a local store that holds them."""
    if artifacts is None:
        home = cache_dir() / name
        home.mkdir(parents=True, exist_ok=True)
        artifacts = home / "rlhf-artifacts"
        if not artifacts.is_dir():
            print(f"making the toy world's SFT and reward models once, in {home} ...", file=sys.stderr)
            rlhf = str(Path(sys.executable).parent / "rlhf")
            env = os.environ | {"PREFECT_HOME": str(home / "prefect"), "RLHF_CACHE_DIR": str(home / "cache")}
            command = [
                rlhf,
                "run",
                *(arg for item in ("iterations=1", "ppo.steps=1", *settings) for arg in ("--set", item)),
            ]
            made = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True)
            if made.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{made.stderr[-4000:]}")
    lineage = only(artifacts / "pipelines", "*")
    return {
        "data": only(lineage / "data", "world-*"),
        "policy": only(lineage / "sft", "policy-*"),
        "preferences": only(lineage / "iteration-001", "preferences-*"),
        "reward": only(lineage / "iteration-001", "reward_model-*"),
    }


# --- our side, in a process of its own -----------------------------------------------------------------------------


class PartTimer:
    """Wall time of named parts of a PPO step, measured by wrapping the functions and methods the loop calls (each
    wrapper calls the original). A part inside the rollout or the update is named after it: ``update/backward``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stage = ""

    def wrap(self, owner: Any, name: str, part: str, *, stage: bool = False) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            outer, label = self.stage, f"{self.stage}/{part}" if self.stage and not stage else part
            if stage:
                self.stage = part
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.stage = outer

        setattr(owner, name, timed)


def run_ours(models: dict[str, Path], steps: int, threads: int, out: Path) -> None:
    import rlhf_core.ppo as ppo
    from infra.artifacts import PhaseInputs
    from rlhf_core.engine import TorchEngine
    from rlhf_core.reward import RewardFunction
    from tasks.ppo import run_ppo

    torch.set_num_threads(threads)
    timer = PartTimer()
    timer.wrap(ppo, "collect_rollout", "rollout", stage=True)
    timer.wrap(ppo, "ppo_update", "update", stage=True)
    timer.wrap(ppo, "sample_responses", "generate")
    timer.wrap(ppo, "response_logprobs", "policy/reference forward")
    timer.wrap(ppo, "response_values", "critic forward")
    timer.wrap(RewardFunction, "member_scores", "reward model")
    timer.wrap(RewardFunction, "member_credit", "reward model")
    timer.wrap(TorchEngine, "backward", "backward")
    timer.wrap(TorchEngine, "step", "optimizer step")
    seconds, parts, lengths, widths, real_tokens = [], [], [], [], []
    last = [time.perf_counter()]
    trained = {"real": 0, "padded": 0}
    original_minibatch = ppo.rollout_minibatch

    def count_minibatch(*args: Any, **kwargs: Any) -> Any:
        mb = original_minibatch(*args, **kwargs)
        trained["real"] += int(mb.attention_mask.sum())
        trained["padded"] += (mb.packed.input_ids if mb.packed is not None else mb.attention_mask).numel()
        return mb

    ppo.rollout_minibatch = count_minibatch
    original_collect = ppo.collect_rollout

    def record_rollout(*args: Any, **kwargs: Any) -> Any:
        rollout = original_collect(*args, **kwargs)
        real_tokens.append(int(rollout.samples.attention_mask.sum()))
        widths.append(rollout.samples.responses.shape[1])
        return rollout

    ppo.collect_rollout = record_rollout

    def on_metrics(metrics: dict[str, float], step: int) -> None:
        now = time.perf_counter()
        seconds.append(now - last[0])
        last[0] = now
        lengths.append(metrics["response_length"])
        parts.append(dict(timer.seconds) | {"trained_real": trained["real"], "trained_padded": trained["padded"]})
        timer.seconds.clear()
        trained.update(real=0, padded=0)

    inputs = PhaseInputs(data=models["data"], policy=models["policy"], sft=models["policy"], reward=models["reward"])
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-ours-") as tmp:
        last[0] = time.perf_counter()
        run_ppo(inputs, Path(tmp), config=ppo.PPOConfig(**matched_config(steps)), seed=0, on_metrics=on_metrics)
    result = {"seconds_per_step": seconds, "response_length": lengths, "parts": parts}
    result |= {"rollout_real_tokens": real_tokens, "response_width": widths}
    out.write_text(json.dumps(result))


# --- the comparison ------------------------------------------------------------------------------------------------


def matmul_peak(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """float32 matmul FLOP/s on this machine at ``threads`` threads: the best of ``repeats`` timed products."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def non_embedding_params(folder: Path) -> int:
    from rlhf_core.modeling import load_policy

    model = load_policy(folder)
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def useful_flops_per_step(params: int, tokens: float, epochs: int = 4) -> float:
    """Generation and three scoring forwards over a rollout's ``tokens`` real tokens (reference, critic, reward
    model: 4 x 2N a token), then a forward and backward of policy and critic in each epoch (2 x 6N a token)."""
    return (4 * 2 + epochs * 2 * 6) * params * tokens


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds of both sides.")
    parser.add_argument("--steps", type=int, default=6, help="PPO steps per round and side (the first is warm-up).")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for each side.")
    parser.add_argument("--artifacts", type=Path, help="A local store with the SFT policy and reward model to use.")
    parser.add_argument("--side", choices=["ours"], help=argparse.SUPPRESS)  # one round of our side, in a subprocess
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "ours":
        run_ours({k: Path(v) for k, v in json.loads(args.models).items()}, args.steps, args.threads, args.out)
        return
    from bench.trl_venv import trl_python
    from infra.artifacts import read_prompts

    models = world_models(args.artifacts, settings=TRL_READABLE_SETTINGS)
    check_trl_readable(models["reward"])
    trl = trl_python()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-ppo-vs-trl-") as tmp:
        prompts = Path(tmp) / "prompts.json"
        prompts.write_text(json.dumps(read_prompts(models["data"], "ppo")))
        ours_cmd = [
            sys.executable,
            "-m",
            "bench.ppo_vs_trl",
            "--side",
            "ours",
            "--models",
            json.dumps({k: str(v) for k, v in models.items()}),
        ]
        trl_cmd = [str(trl), str(Path(__file__).with_name("trl_ppo_side.py")), "--policy", str(models["policy"])]
        trl_cmd += ["--reward", str(models["reward"]), "--critic", str(models["reward"]), "--prompts", str(prompts)]
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
        for round_ in range(args.rounds):
            for side, command in (("ours", ours_cmd), ("trl", trl_cmd)):
                out = Path(tmp) / f"{side}-{round_}.json"
                common = ["--steps", str(args.steps), "--threads", str(args.threads), "--out", str(out)]
                subprocess.run(command + common, check=True, stdout=subprocess.DEVNULL)
                runs[side].append(json.loads(out.read_text()))
                print(
                    f"round {round_ + 1} {side}: {spread(runs[side][-1]['seconds_per_step'][1:])} s/step",
                    file=sys.stderr,
                )
    report(runs, models, args, load)


def report(
    runs: dict[str, list[dict[str, Any]]], models: dict[str, Path], args: argparse.Namespace, load: tuple
) -> None:
    per_step = {side: [s for run in rs for s in run["seconds_per_step"][1:]] for side, rs in runs.items()}
    medians = {side: statistics.median(v) for side, v in per_step.items()}
    lengths = {side: statistics.mean(x for run in rs for x in run["response_length"][1:]) for side, rs in runs.items()}
    print(
        f"PPO step, {SAMPLES_PER_STEP} rollouts x <= 32 new tokens, minibatch 16, 4 epochs, fp32, "
        f"{args.threads} threads; {args.rounds} alternating rounds of {args.steps - 1} timed steps a side"
    )
    print(f"machine: {os.cpu_count()} CPUs, load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'':<6}{'s/step median (min-max)':>28}{'samples/s':>12}{'response length':>18}")
    for side in ("ours", "trl"):
        print(f"{side:<6}{spread(per_step[side]):>28}{SAMPLES_PER_STEP / medians[side]:>12.1f}{lengths[side]:>18.1f}")
    print(f"speed-up, samples/s ours over TRL: {medians['trl'] / medians['ours']:.2f}x")
    paired = [  # each round's sides ran minutes apart: a ratio per round sees less of the machine's drift
        statistics.median(trl["seconds_per_step"][1:]) / statistics.median(ours["seconds_per_step"][1:])
        for ours, trl in zip(runs["ours"], runs["trl"], strict=True)
    ]
    print(f"  round by round: {', '.join(f'{r:.2f}x' for r in paired)} (median {statistics.median(paired):.2f}x)")
    parts: dict[str, list[float]] = defaultdict(list)
    steps = [p for run in runs["ours"] for p in run["parts"][1:]]
    for p in steps:
        for name, value in p.items():
            parts[name].append(value)
    print("where our step goes (mean seconds a step):")
    for name in sorted(n for n in parts if not n.startswith("trained")):
        print(f"  {name:<38}{statistics.mean(parts[name]):7.3f}")
    real, padded = sum(parts["trained_real"]), sum(parts["trained_padded"])
    print(f"trained token positions that are padding: {1 - real / padded:.1%} (ours)")
    peak = matmul_peak(args.threads)
    params = non_embedding_params(models["policy"])
    rollout_tokens = statistics.mean(t for run in runs["ours"] for t in run["rollout_real_tokens"][1:])
    prompt_tokens = rollout_tokens / SAMPLES_PER_STEP - lengths["ours"]  # per sample, the same prompts on both sides
    print(
        f"float32 matmul peak here: {peak / 1e9:.1f} GFLOP/s ({args.threads} threads); the policy has {params:,} "
        "parameters besides its input embeddings"
    )
    for side in ("ours", "trl"):
        tokens = SAMPLES_PER_STEP * (prompt_tokens + lengths[side])
        print(f"MFU on useful tokens, {side}: {useful_flops_per_step(params, tokens) / medians[side] / peak:.2%}")


if __name__ == "__main__":
    main()
