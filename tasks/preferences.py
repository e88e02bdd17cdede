"""Preference collection phase: the current policy answers twice, the labelers choose."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from infra.datasets import read_rows, write_rows
from rlhf_core.modeling import load_policy, load_tokenizer
from rlhf_core.preferences import PreferenceConfig, PreferencePair, collect_preferences
from tasks.common import PhaseOutput, RunContext, artifact_key, existing_output, fetch, phase_task, publish, tracked
from tasks.data import PAIRS_FILE, data_judge, read_prompts


def read_pairs(pref_dir: Path) -> list[PreferencePair]:
    return [PreferencePair(**row) for row in read_rows(pref_dir / PAIRS_FILE)]


def run_preferences(
    policy_dir: Path,
    data_dir: Path,
    out_dir: Path,
    config: PreferenceConfig,
    seed: int,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Sample and label response pairs on the preference prompts; write them as Parquet."""
    tokenizer = load_tokenizer(policy_dir, trust_remote_code)
    policy = load_policy(policy_dir, trust_remote_code).eval()
    pairs, stats = collect_preferences(
        policy, tokenizer, read_prompts(data_dir, "preference"), data_judge(data_dir), config, seed
    )
    write_rows(out_dir / PAIRS_FILE, [dataclasses.asdict(p) for p in pairs])
    return {f"preferences/{k}": float(v) for k, v in stats.items()}


@phase_task("collect-preferences")
def preferences_task(
    context: RunContext, data: PhaseOutput, policy: PhaseOutput, config: PreferenceConfig, seed: int, iteration: int
) -> PhaseOutput:
    inputs = {"data": data, "policy": policy, "config": config, "seed": seed}
    key = artifact_key(context, f"iteration-{iteration:03d}", "preferences", inputs)
    if done := existing_output(context, key):
        return done
    data_dir, policy_dir = fetch(context, data), fetch(context, policy)
    with (
        tracked(context, f"iteration-{iteration}/preferences", {"preferences": config.model_dump()}) as log,
        tempfile.TemporaryDirectory(prefix="rlhf-pref-") as tmp,
    ):
        metrics = run_preferences(policy_dir, data_dir, Path(tmp), config, seed, context.trust_remote_code)
        log(metrics, iteration)
        return publish(
            context,
            key,
            Path(tmp),
            {
                "phase": "collect-preferences",
                "iteration": iteration,
                "parents": {"policy": policy.ref.uri, "data": data.ref.uri},
                "config": config.model_dump(),
                "seed": seed,
            },
            metrics,
        )
