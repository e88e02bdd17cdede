"""Preference collection phase: the current policy answers twice, the labelers choose."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from infra.artifacts import PAIRS_FILE, PhaseInputs, data_judge, read_prompts
from infra.catalog import PREFERENCES
from infra.datasets import write_rows
from rlhf_core.modeling import load_policy, load_tokenizer
from rlhf_core.preferences import PreferenceConfig, collect_preferences
from tasks.common import (
    PhaseOutput,
    RunContext,
    artifact_key,
    existing_output,
    fetch_inputs,
    phase_task,
    phase_workspace,
    publish,
)


def run_preferences(
    inputs: PhaseInputs, out_dir: Path, *, config: PreferenceConfig, seed: int, trust_remote_code: bool = False
) -> dict[str, float]:
    """Sample and label response pairs on the preference prompts; write them as Parquet."""
    tokenizer = load_tokenizer(inputs.policy, trust_remote_code)
    policy = load_policy(inputs.policy, trust_remote_code).eval()
    prompts = read_prompts(inputs.data, "preference")
    pairs, stats = collect_preferences(policy, tokenizer, prompts, data_judge(inputs.data), config=config, seed=seed)
    write_rows(out_dir / PAIRS_FILE, [dataclasses.asdict(p) for p in pairs])
    return stats


@phase_task("collect-preferences")
def preferences_task(
    context: RunContext, *, data: PhaseOutput, policy: PhaseOutput, config: PreferenceConfig, seed: int, iteration: int
) -> PhaseOutput:
    inputs = {"data": data, "policy": policy, "config": config, "seed": seed}
    key = artifact_key(context, f"iteration-{iteration:03d}", "preferences", inputs)
    if done := existing_output(context, key):
        return done
    dirs = fetch_inputs(context, data=data, policy=policy)
    params = {"preferences": config.model_dump(), "seed": seed}
    with phase_workspace(context, PREFERENCES, key, iteration=iteration, params=params) as work:
        metrics = run_preferences(
            dirs, work.out_dir, config=config, seed=seed, trust_remote_code=context.trust_remote_code
        )
        work.log(metrics, iteration)
        return publish(
            context,
            key,
            work.out_dir,
            phase="collect-preferences",
            iteration=iteration,
            config=config,
            seed=seed,
            parents={"policy": policy.ref.uri, "data": data.ref.uri},
            metrics=PREFERENCES.namespaced(metrics),
        )
