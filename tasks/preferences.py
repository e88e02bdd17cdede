"""Preference collection phase: the current policy answers twice, the labelers choose."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from infra.artifacts import PAIRS_FILE, PhaseInputs, data_judge, read_prompts
from infra.catalog import PREFERENCES
from infra.datasets import write_rows
from infra.labeling import read_batch, read_imports, write_batch
from rlhf_core.config import DEFAULT_COMPUTE, ComputeConfig, PreferenceConfig
from rlhf_core.modeling import load_tokenizer
from rlhf_core.preferences import collect_preferences, labeling_pairs, preferences_from_labels
from tasks.common import (
    PhaseOutput,
    RunContext,
    artifact_key,
    existing_output,
    fetch,
    fetch_inputs,
    frozen_policy,
    phase_logger,
    phase_task,
    phase_workspace,
    publish,
)


def run_preferences(
    inputs: PhaseInputs,
    out_dir: Path,
    *,
    config: PreferenceConfig,
    seed: int,
    trust_remote_code: bool = False,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> dict[str, float]:
    """Sample (as ``compute`` says: precision and attention kernel) and label response pairs on the preference
    prompts; write them as Parquet."""
    tokenizer = load_tokenizer(inputs.policy, trust_remote_code)
    policy = frozen_policy(inputs.policy, trust_remote_code, compute)
    prompts = read_prompts(inputs.data, "preference")
    pairs, stats = collect_preferences(policy, tokenizer, prompts, data_judge(inputs.data), config=config, seed=seed)
    if stats["noise_at_limit"]:
        phase_logger().warning(
            f"the simulated labelers cannot reach preferences.target_agreement={config.target_agreement} on these "
            f"pairs (noise scale {stats['noise_scale']:.3g}, at the end of its range; the gold judge scores "
            f"{stats['gold_tie_rate']:.0%} of them alike): their labels are as consistent as the judge allows"
        )
    write_rows(out_dir / PAIRS_FILE, [dataclasses.asdict(p) for p in pairs])
    return stats


@phase_task("collect-preferences")
def preferences_task(
    context: RunContext,
    *,
    data: PhaseOutput,
    policy: PhaseOutput,
    config: PreferenceConfig,
    seed: int,
    iteration: int,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> PhaseOutput:
    inputs = {"data": data, "policy": policy, "config": config, "seed": seed, "compute": compute}
    key = artifact_key(context, f"iteration-{iteration:03d}", "preferences", inputs)
    if done := existing_output(context, key):
        return done
    dirs = fetch_inputs(context, data=data, policy=policy)
    params = {"preferences": config.model_dump(), "seed": seed}
    with phase_workspace(context, PREFERENCES, key, iteration=iteration, params=params) as work:
        metrics = run_preferences(
            dirs,
            work.out_dir,
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
            phase="collect-preferences",
            iteration=iteration,
            config=config,
            seed=seed,
            parents={"policy": policy.ref.key, "data": data.ref.key},
            metrics=PREFERENCES.namespaced(metrics),
        )


def run_labeling_batch(
    inputs: PhaseInputs,
    out_dir: Path,
    *,
    config: PreferenceConfig,
    seed: int,
    id_prefix: str,
    trust_remote_code: bool = False,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> dict[str, float]:
    """Sample the pairs people will label (as :func:`run_preferences` samples them) and write the batch."""
    tokenizer = load_tokenizer(inputs.policy, trust_remote_code)
    policy = frozen_policy(inputs.policy, trust_remote_code, compute)
    prompts, judge = read_prompts(inputs.data, "preference"), data_judge(inputs.data)
    pairs = labeling_pairs(policy, tokenizer, prompts, judge, config=config, seed=seed, id_prefix=id_prefix)
    write_batch(out_dir, pairs)
    return {"batch_pairs": len(pairs), "dropped_identical": config.n_pairs - len(pairs)}


@phase_task("labeling-batch")
def labeling_batch_task(
    context: RunContext,
    *,
    data: PhaseOutput,
    policy: PhaseOutput,
    config: PreferenceConfig,
    seed: int,
    iteration: int,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> PhaseOutput:
    """The current policy's response pairs as a labeling batch for people (``preferences.source: human``)."""
    inputs = {"data": data, "policy": policy, "config": config, "seed": seed, "compute": compute}
    key = artifact_key(context, f"iteration-{iteration:03d}", "labeling_batch", inputs)
    if done := existing_output(context, key):
        return done
    dirs = fetch_inputs(context, data=data, policy=policy)
    with tempfile.TemporaryDirectory(prefix="rlhf-batch-") as tmp:
        metrics = run_labeling_batch(
            dirs,
            Path(tmp),
            config=config,
            seed=seed,
            id_prefix=key.rsplit("-", 1)[-1][:8],  # the batch's key: a labels file cannot be taken for another batch's
            trust_remote_code=context.trust_remote_code,
            compute=compute,
        )
        return publish(
            context,
            key,
            Path(tmp),
            phase="labeling-batch",
            iteration=iteration,
            config=config,
            seed=seed,
            parents={"policy": policy.ref.key, "data": data.ref.key},
            metrics=PREFERENCES.namespaced(metrics),
        )


@phase_task("human-preferences")
def human_preferences_task(
    context: RunContext,
    *,
    batch: PhaseOutput,
    labels: list[PhaseOutput],
    config: PreferenceConfig,
    seed: int,
    iteration: int,
) -> PhaseOutput:
    """The batch's pairs as labeled by people: the iteration's preference dataset, with what the labels say about
    the labelers (agreement, kappa, majority and gold agreement per labeler)."""
    inputs = {"batch": batch, "labels": labels, "config": config, "seed": seed}
    key = artifact_key(context, f"iteration-{iteration:03d}", "preferences", inputs)
    if done := existing_output(context, key):
        return done
    pairs = read_batch(fetch(context, batch))
    human_labels = read_imports(context.store, [ref.ref for ref in labels])
    params = {"preferences": config.model_dump(), "seed": seed}
    with phase_workspace(context, PREFERENCES, key, iteration=iteration, params=params) as work:
        preferences, stats = preferences_from_labels(pairs, human_labels)
        write_rows(work.out_dir / PAIRS_FILE, [dataclasses.asdict(p) for p in preferences])
        work.log({k: v for k, v in stats.items() if v == v}, iteration)  # NaN: undefined (one labeler), not logged
        return publish(
            context,
            key,
            work.out_dir,
            mlflow_run_id=work.mlflow_run_id,
            phase="human-preferences",
            iteration=iteration,
            config=config,
            seed=seed,
            parents={"batch": batch.ref.key, "labels": [ref.ref.key for ref in labels]},
            metrics=PREFERENCES.namespaced(stats),
        )
