"""PPO phase: optimize the current policy against the reward model, KL-anchored to the SFT model."""

from __future__ import annotations

import tempfile
from pathlib import Path

from infra.deepspeed_engine import DeepSpeedConfig
from rlhf_core.checkpoint import Checkpointer
from rlhf_core.modeling import load_policy, load_scorer, load_tokenizer
from rlhf_core.ppo import PPOConfig, train_ppo
from tasks.common import (
    MetricsCallback,
    PhaseOutput,
    RunContext,
    artifact_key,
    checkpoint_every,
    checkpointing,
    existing_output,
    fetch,
    make_engine,
    phase_task,
    publish,
    tracked,
)
from tasks.data import data_judge, read_prompts


def run_ppo(
    policy_dir: Path,
    sft_dir: Path,
    reward_dir: Path,
    data_dir: Path,
    out_dir: Path,
    config: PPOConfig,
    seed: int,
    on_metrics: MetricsCallback | None = None,
    trust_remote_code: bool = False,
    checkpointer: Checkpointer | None = None,
    deepspeed: DeepSpeedConfig | None = None,
) -> dict[str, float]:
    """PPO from ``policy_dir`` with the SFT model as frozen reference and a critic started from the reward
    model; saves the new policy to ``out_dir`` and returns the last step's metrics."""
    tokenizer = load_tokenizer(policy_dir, trust_remote_code)
    policy = load_policy(policy_dir, trust_remote_code)
    reference = load_policy(sft_dir, trust_remote_code).eval().requires_grad_(False)
    reward_model = load_scorer(reward_dir, trust_remote_code).eval().requires_grad_(False)
    critic = load_scorer(reward_dir, trust_remote_code)
    updates = config.steps * config.epochs * -(-config.rollout_batch_size // config.minibatch_size)
    micro, clip = config.minibatch_size, config.max_grad_norm
    policy_engine = make_engine(policy, deepspeed, micro, config.lr, updates, max_grad_norm=clip, min_lr_ratio=1.0)
    critic_engine = make_engine(
        critic, deepspeed, micro, config.critic_lr, updates, max_grad_norm=clip, min_lr_ratio=1.0
    )
    result = train_ppo(
        policy_engine,
        critic_engine,
        reference,
        reward_model,
        tokenizer,
        read_prompts(data_dir, "ppo"),
        config,
        seed,
        data_judge(data_dir),
        on_metrics,
        checkpointer,
    )
    policy.save_pretrained(out_dir, state_dict=policy_engine.full_state_dict())
    tokenizer.save_pretrained(out_dir)
    return result.history[-1]


@phase_task("ppo")
def ppo_task(
    context: RunContext,
    data: PhaseOutput,
    policy: PhaseOutput,
    sft: PhaseOutput,
    reward: PhaseOutput,
    config: PPOConfig,
    seed: int,
    iteration: int,
    deepspeed: DeepSpeedConfig | None = None,
) -> PhaseOutput:
    inputs = {"data": data, "policy": policy, "sft": sft, "reward": reward, "config": config, "seed": seed}
    inputs["deepspeed"] = deepspeed
    key = artifact_key(context, f"iteration-{iteration:03d}", "policy", inputs)
    if done := existing_output(context, key):
        return done
    dirs = {
        name: fetch(context, ref)
        for name, ref in (("data", data), ("policy", policy), ("sft", sft), ("reward", reward))
    }
    with (
        tracked(context, f"iteration-{iteration}/ppo", {"ppo": config.model_dump()}, config.steps) as log,
        checkpointing(context, key, log, checkpoint_every(config.checkpoint_every, deepspeed)) as checkpointer,
        tempfile.TemporaryDirectory(prefix="rlhf-ppo-") as tmp,
    ):
        metrics = run_ppo(
            dirs["policy"],
            dirs["sft"],
            dirs["reward"],
            dirs["data"],
            Path(tmp),
            config,
            seed,
            log,
            context.trust_remote_code,
            checkpointer,
            deepspeed,
        )
        parents = {"policy": policy.ref.uri, "reference": sft.ref.uri, "reward_model": reward.ref.uri}
        return publish(
            context,
            key,
            Path(tmp),
            {"phase": "ppo", "iteration": iteration, "parents": parents, "config": config.model_dump(), "seed": seed},
            metrics,
        )
