"""Evaluation phase: the policy against the SFT model on held-out prompts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from infra.artifacts import (
    BASELINE_FILE,
    METRICS_FILE,
    SAMPLES_FILE,
    PhaseInputs,
    data_judge,
    data_judge_breakdown,
    read_prompts,
)
from infra.catalog import EVALUATION, HUMAN_EVALUATION
from infra.datasets import read_rows, write_rows
from infra.labeling import read_batch, read_imports, write_batch
from rlhf_core.config import DEFAULT_COMPUTE, ComputeConfig, EvalConfig
from rlhf_core.evaluate import evaluate_policy, evaluation_pairs, human_win_rate, sample_baseline
from rlhf_core.modeling import load_tokenizer
from rlhf_core.reward import load_reward_function
from tasks.common import (
    PhaseOutput,
    RunContext,
    artifact_key,
    at_precision,
    existing_output,
    fetch,
    fetch_inputs,
    frozen_policy,
    phase_task,
    phase_workspace,
    publish,
)


def run_baseline(
    data_dir: Path,
    sft_dir: Path,
    *,
    config: EvalConfig,
    seed: int,
    trust_remote_code: bool = False,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> list[dict]:
    """The SFT model's responses to the held-out prompts, with their gold rewards: the baseline of every
    iteration's evaluation."""
    tokenizer, sft = load_tokenizer(sft_dir, trust_remote_code), frozen_policy(sft_dir, trust_remote_code, compute)
    prompts = read_prompts(data_dir, "eval")
    return sample_baseline(sft, tokenizer, prompts, gold_fn=data_judge(data_dir), config=config, seed=seed)


def run_evaluation(
    inputs: PhaseInputs,
    out_dir: Path,
    *,
    baseline: list[dict],
    config: EvalConfig,
    seed: int,
    trust_remote_code: bool = False,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> tuple[dict[str, float], list[dict]]:
    """Evaluate ``inputs.policy`` against the SFT model's ``baseline`` responses (:func:`run_baseline`; the KL is to
    ``inputs.sft``, the score ``inputs.reward``'s where given); write ``metrics.json`` and the sample table to
    ``out_dir``. ``compute``: every model's precision and attention kernel."""
    if inputs.sft is None:
        raise ValueError("evaluation compares the policy with the SFT model: inputs.sft is required")
    tokenizer = load_tokenizer(inputs.policy, trust_remote_code)
    policy = frozen_policy(inputs.policy, trust_remote_code, compute)
    sft = frozen_policy(inputs.sft, trust_remote_code, compute)
    reward_fn = None
    if inputs.reward:
        attn = compute.attn_implementation
        reward_fn = load_reward_function(inputs.reward, tokenizer, trust_remote_code, attn_implementation=attn)
        for model in [reward_fn.model, *reward_fn.members]:
            at_precision(model, compute)
    judge = data_judge(inputs.data)
    metrics, rows = evaluate_policy(
        policy,
        sft,
        tokenizer,
        baseline,
        reward_fn=reward_fn,
        gold_fn=judge,
        gold_breakdown=data_judge_breakdown(inputs.data),
        config=config,
        seed=seed,
    )
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    write_rows(out_dir / SAMPLES_FILE, rows)
    return metrics, rows


@phase_task("sft-baseline")
def sft_baseline_task(
    context: RunContext,
    *,
    data: PhaseOutput,
    sft: PhaseOutput,
    config: EvalConfig,
    seed: int,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> PhaseOutput:
    """The SFT model's held-out responses, sampled once with a seed of their own and reused by every iteration's
    evaluation, so that the baseline does not move with the policy or the config."""
    inputs = {"data": data, "sft": sft, "config": config, "seed": seed, "compute": compute}
    key = artifact_key(context, "sft", "baseline", inputs)
    if done := existing_output(context, key):
        return done
    rows = run_baseline(
        fetch(context, data),
        fetch(context, sft),
        config=config,
        seed=seed,
        trust_remote_code=context.trust_remote_code,
        compute=compute,
    )
    with tempfile.TemporaryDirectory(prefix="rlhf-baseline-") as tmp:
        write_rows(Path(tmp) / BASELINE_FILE, rows)
        return publish(
            context,
            key,
            Path(tmp),
            phase="sft-baseline",
            config=config,
            seed=seed,
            metrics={},
            parents={"data": data.ref.key, "sft": sft.ref.key},
        )


@phase_task("evaluate")
def evaluate_task(
    context: RunContext,
    *,
    data: PhaseOutput,
    policy: PhaseOutput,
    sft: PhaseOutput,
    baseline: PhaseOutput,
    reward: PhaseOutput | None,
    config: EvalConfig,
    seed: int,
    iteration: int,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> PhaseOutput:
    """``reward``: the iteration's reward model, whose score of the policy's responses is reported; None (DPO)."""
    inputs = {"data": data, "policy": policy, "sft": sft, "reward": reward, "config": config, "seed": seed}
    inputs |= {"baseline": baseline, "compute": compute}
    key = artifact_key(context, f"iteration-{iteration:03d}", "evaluation", inputs)
    if done := existing_output(context, key):
        return done
    dirs = fetch_inputs(context, data=data, policy=policy, sft=sft, reward=reward)
    params = {"evaluation": config.model_dump(), "seed": seed}
    with phase_workspace(context, EVALUATION, key, iteration=iteration, params=params) as work:
        metrics, _ = run_evaluation(
            dirs,
            work.out_dir,
            baseline=read_rows(fetch(context, baseline) / BASELINE_FILE),
            config=config,
            seed=seed,
            trust_remote_code=context.trust_remote_code,
            compute=compute,
        )
        work.log(metrics, iteration)
        return publish(
            context,
            key,
            work.out_dir,
            mlflow_run_id=work.mlflow_run_id,
            phase="evaluate",
            iteration=iteration,
            config=config,
            seed=seed,
            parents={"policy": policy.ref.key, "sft": sft.ref.key, "baseline": baseline.ref.key}
            | ({"reward_model": reward.ref.key} if reward is not None else {}),
            metrics=EVALUATION.namespaced(metrics),
        )


@phase_task("evaluation-batch")
def evaluation_batch_task(
    context: RunContext, *, evaluation: PhaseOutput, config: EvalConfig, seed: int, iteration: int
) -> PhaseOutput:
    """``config.human_pairs`` of the evaluation's (policy, SFT) response pairs, blind, as a labeling batch."""
    inputs = {"evaluation": evaluation, "config": config, "seed": seed}
    key = artifact_key(context, f"iteration-{iteration:03d}", "evaluation_batch", inputs)
    if done := existing_output(context, key):
        return done
    rows = read_rows(fetch(context, evaluation) / SAMPLES_FILE)
    pairs = evaluation_pairs(rows, config.human_pairs, seed, id_prefix=key.rsplit("-", 1)[-1][:8])
    with tempfile.TemporaryDirectory(prefix="rlhf-batch-") as tmp:
        write_batch(Path(tmp), pairs)
        return publish(
            context,
            key,
            Path(tmp),
            phase="evaluation-batch",
            iteration=iteration,
            config=config,
            seed=seed,
            parents={"evaluation": evaluation.ref.key},
            metrics=HUMAN_EVALUATION.namespaced({"pairs": len(pairs)}),
        )


@phase_task("human-evaluation")
def human_evaluation_task(
    context: RunContext, *, batch: PhaseOutput, labels: list[PhaseOutput], config: EvalConfig, seed: int, iteration: int
) -> PhaseOutput:
    """The human-judged win rate of the policy against the SFT model on the batch's blind pairs."""
    inputs = {"batch": batch, "labels": labels, "config": config, "seed": seed}
    key = artifact_key(context, f"iteration-{iteration:03d}", "human_evaluation", inputs)
    if done := existing_output(context, key):
        return done
    pairs = read_batch(fetch(context, batch))
    human_labels = read_imports(context.store, [ref.ref for ref in labels])
    params = {"evaluation": config.model_dump(), "seed": seed}
    with phase_workspace(context, HUMAN_EVALUATION, key, iteration=iteration, params=params) as work:
        metrics = human_win_rate(pairs, human_labels)
        (work.out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        work.log(metrics, iteration)
        return publish(
            context,
            key,
            work.out_dir,
            mlflow_run_id=work.mlflow_run_id,
            phase="human-evaluation",
            iteration=iteration,
            config=config,
            seed=seed,
            parents={"batch": batch.ref.key, "labels": [ref.ref.key for ref in labels]},
            metrics=HUMAN_EVALUATION.namespaced(metrics),
        )
