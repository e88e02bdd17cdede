"""PPO phase: optimize the current policy against the reward model, KL-anchored to the SFT model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from infra.deepspeed_engine import DeepSpeedConfig, inference_module
from rlhf_core.checkpoint import Checkpointer
from rlhf_core.lora import ADAPTER_DIR, AdaptersDisabled, LoRAConfig, add_lora, load_lora
from rlhf_core.modeling import load_policy, load_scorer, load_tokenizer
from rlhf_core.ppo import PPOConfig, train_ppo
from rlhf_core.reward import load_reward_function
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


def load_policy_and_reference(
    policy_dir: Path, sft_dir: Path, lora: LoRAConfig | None, trust_remote_code: bool = False
) -> tuple[nn.Module, nn.Module]:
    """The policy to train and its frozen SFT reference. With LoRA, the policy is the SFT model with adapters
    (new, or the previous iteration's from ``policy_dir/adapter``) and the reference that model with them off;
    a policy that is neither (trained in full earlier) gets fresh adapters and a separate reference."""
    if lora is None or (policy_dir != sft_dir and not (policy_dir / ADAPTER_DIR).is_dir()):
        policy = load_policy(policy_dir, trust_remote_code)
        reference = load_policy(sft_dir, trust_remote_code).eval().requires_grad_(False)
        return (policy if lora is None else add_lora(policy, lora)), reference
    base = load_policy(sft_dir, trust_remote_code)
    adapters = policy_dir / ADAPTER_DIR
    policy = load_lora(base, adapters) if adapters.is_dir() else add_lora(base, lora)
    return policy, AdaptersDisabled(policy)


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
    model (from the SFT model when the reward model has a tokenizer of its own); saves the new policy to
    ``out_dir`` and returns the last step's metrics."""
    tokenizer = load_tokenizer(policy_dir, trust_remote_code)
    policy, reference = load_policy_and_reference(policy_dir, sft_dir, config.lora, trust_remote_code)
    reward_fn = load_reward_function(reward_dir, tokenizer, trust_remote_code)
    torch.manual_seed(seed)  # a critic started from the SFT model gets a fresh head: the same seed, the same critic
    critic = load_scorer(reward_dir if reward_fn.tokenizer is None else sft_dir, trust_remote_code)
    if config.lora is None:  # with LoRA the reference is the policy itself, adapters off
        reference = inference_module(reference, deepspeed)
    reward_fn.model = inference_module(reward_fn.model, deepspeed)
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
        reward_fn,
        tokenizer,
        read_prompts(data_dir, "ppo"),
        config,
        seed,
        data_judge(data_dir),
        on_metrics,
        checkpointer,
    )
    if config.lora is None:
        policy.save_pretrained(out_dir, state_dict=policy_engine.full_state_dict())
    else:  # the adapters, and the merged model every other phase loads as any causal LM
        policy.save_pretrained(out_dir / ADAPTER_DIR)
        policy.merge_and_unload().save_pretrained(out_dir)
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
