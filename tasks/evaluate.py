"""Evaluation phase: the policy against the SFT model on held-out prompts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from infra.datasets import write_rows
from rlhf_core.evaluate import EvalConfig, evaluate_policy
from rlhf_core.modeling import load_policy, load_tokenizer
from rlhf_core.reward import load_reward_function
from tasks.common import PhaseOutput, RunContext, artifact_key, existing_output, fetch, phase_task, publish, tracked
from tasks.data import data_judge, read_prompts

SAMPLES_FILE = "samples.parquet"


def run_evaluation(
    policy_dir: Path,
    sft_dir: Path,
    reward_dir: Path | None,
    data_dir: Path,
    out_dir: Path,
    config: EvalConfig,
    seed: int,
    trust_remote_code: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Evaluate and write ``metrics.json`` and the sample table to ``out_dir``."""
    tokenizer = load_tokenizer(policy_dir, trust_remote_code)
    policy = load_policy(policy_dir, trust_remote_code).eval()
    sft = load_policy(sft_dir, trust_remote_code).eval()
    reward_fn = load_reward_function(reward_dir, tokenizer, trust_remote_code) if reward_dir else None
    metrics, rows = evaluate_policy(
        policy, sft, reward_fn, tokenizer, read_prompts(data_dir, "eval"), data_judge(data_dir), config, seed
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_rows(out_dir / SAMPLES_FILE, rows)
    return metrics, rows


@phase_task("evaluate")
def evaluate_task(
    context: RunContext,
    data: PhaseOutput,
    policy: PhaseOutput,
    sft: PhaseOutput,
    reward: PhaseOutput,
    config: EvalConfig,
    seed: int,
    iteration: int,
) -> PhaseOutput:
    inputs = {"data": data, "policy": policy, "sft": sft, "reward": reward, "config": config, "seed": seed}
    key = artifact_key(context, f"iteration-{iteration:03d}", "evaluation", inputs)
    if done := existing_output(context, key):
        return done
    dirs = [fetch(context, ref) for ref in (policy, sft, reward, data)]
    with (
        tracked(context, f"iteration-{iteration}/evaluation", {"evaluation": config.model_dump()}) as log,
        tempfile.TemporaryDirectory(prefix="rlhf-eval-") as tmp,
    ):
        metrics, _ = run_evaluation(*dirs, Path(tmp), config, seed, context.trust_remote_code)
        metrics = {f"eval/{k}": v for k, v in metrics.items()}
        log(metrics, iteration)
        parents = {"policy": policy.ref.uri, "sft": sft.ref.uri, "reward_model": reward.ref.uri}
        return publish(
            context,
            key,
            Path(tmp),
            {
                "phase": "evaluate",
                "iteration": iteration,
                "parents": parents,
                "config": config.model_dump(),
                "seed": seed,
            },
            metrics,
        )
