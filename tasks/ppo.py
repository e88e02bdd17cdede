"""PPO phase: optimize the current policy against the reward model, KL-anchored to the SFT model."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from infra.artifacts import PhaseInputs, data_judge, read_prompts
from infra.catalog import PPO
from infra.deepspeed_config import DeepSpeedConfig
from infra.deepspeed_engine import inference_module
from rlhf_core.checkpoint import Checkpointer
from rlhf_core.config import DEFAULT_COMPUTE, AttnImplementation, ComputeConfig, LoRAConfig, PPOConfig
from rlhf_core.engine import Engine, Optimization, without_tied_copies
from rlhf_core.lora import ADAPTER_DIR, AdaptersDisabled, add_lora, load_lora, merged
from rlhf_core.modeling import fold_reward_normalization, load_policy, load_scorer, load_tokenizer
from rlhf_core.ppo import AlarmCallback, PPOModels, train_ppo
from rlhf_core.reward import load_reward_function
from rlhf_core.types import MetricsCallback
from tasks.common import (
    PhaseOutput,
    RunContext,
    artifact_key,
    at_precision,
    existing_output,
    fetch_inputs,
    make_engine,
    phase_task,
    phase_workspace,
    publish,
    world_size,
)
from tasks.launch import run_entry


def load_policy_and_reference(
    policy_dir: Path,
    sft_dir: Path,
    lora: LoRAConfig | None,
    trust_remote_code: bool = False,
    *,
    attn_implementation: AttnImplementation = "sdpa",
) -> tuple[nn.Module, nn.Module]:
    """The policy to train and its frozen SFT reference, loaded with ``attn_implementation``. With LoRA, the policy
    is the SFT model with adapters (new, or the previous iteration's from ``policy_dir/adapter``) and the reference
    that model with them off; a policy that is neither (trained in full earlier) gets fresh adapters and a separate
    reference."""
    load = functools.partial(load_policy, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if lora is None or (policy_dir != sft_dir and not (policy_dir / ADAPTER_DIR).is_dir()):
        policy = load(policy_dir)
        reference = load(sft_dir).eval().requires_grad_(False)
        return (policy if lora is None else add_lora(policy, lora)), reference
    base = load(sft_dir)
    adapters = policy_dir / ADAPTER_DIR
    policy = load_lora(base, adapters) if adapters.is_dir() else add_lora(base, lora)
    return policy, AdaptersDisabled(policy)


def save_policy(
    policy: nn.Module, engine: Engine, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *, lora: bool
) -> None:
    """A trained policy and its tokenizer as a folder any phase loads as a causal LM; with LoRA, the merged model
    plus its adapters in ``out_dir/adapter`` (where the next iteration continues them)."""
    weights = None if lora else engine.full_state_dict()  # every rank takes part in gathering; rank 0 writes
    if engine.rank != 0:
        return
    if lora:
        policy.save_pretrained(out_dir / ADAPTER_DIR)
        merged(policy).save_pretrained(out_dir)
    else:
        policy.save_pretrained(out_dir, state_dict=without_tied_copies(policy, weights))
    tokenizer.save_pretrained(out_dir)


def run_ppo(
    inputs: PhaseInputs,
    out_dir: Path,
    *,
    config: PPOConfig,
    seed: int,
    on_metrics: MetricsCallback | None = None,
    trust_remote_code: bool = False,
    checkpointer: Checkpointer | None = None,
    deepspeed: DeepSpeedConfig | None = None,
    on_alarm: AlarmCallback | None = None,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> dict[str, float]:
    """PPO from ``inputs.policy`` with the SFT model as frozen reference and a critic started from the reward
    model (from the SFT model when the reward model has a tokenizer of its own); saves the new policy to
    ``out_dir`` and returns the last step's metrics, with ``alarm/<name>``: the step of each alarm that fired.
    ``compute``: precision (the frozen models' too), recomputation (the policy's and the critic's) and attention
    kernel."""
    if inputs.sft is None or inputs.reward is None:
        raise ValueError("PPO needs the SFT model (its reference) and a reward model: inputs.sft, inputs.reward")
    attn = compute.attn_implementation
    tokenizer = load_tokenizer(inputs.policy, trust_remote_code)
    torch.manual_seed(seed)  # fresh LoRA adapters: the same seed, the same adapters
    policy, reference = load_policy_and_reference(
        inputs.policy, inputs.sft, config.lora, trust_remote_code, attn_implementation=attn
    )
    reward_fn = load_reward_function(inputs.reward, tokenizer, trust_remote_code, attn_implementation=attn)
    torch.manual_seed(seed)  # a critic started from the SFT model gets a fresh head: the same seed, the same critic
    critic = load_scorer(
        inputs.reward if reward_fn.tokenizer is None else inputs.sft, trust_remote_code, attn_implementation=attn
    )
    critic = fold_reward_normalization(critic)  # values in the units of the normalized reward, from the first step
    if config.critic_lora is not None:
        critic = add_lora(critic, config.critic_lora, scorer=True)
    if config.lora is None:  # with LoRA the reference is the policy itself, adapters off
        reference = inference_module(reference, deepspeed)
    reward_fn.model = inference_module(reward_fn.model, deepspeed)
    reward_fn.members = [inference_module(member, deepspeed) for member in reward_fn.members]
    for frozen in [reference, reward_fn.model, *reward_fn.members]:  # the KL between models at the same precision
        at_precision(frozen, compute)
    updates = config.steps * config.epochs * -(-config.rollout_batch_size // config.minibatch_size)
    optimization = Optimization(
        lr=config.lr, total_steps=updates, max_grad_norm=config.max_grad_norm, min_lr_ratio=1.0
    )  # a constant learning rate
    policy_engine = make_engine(policy, optimization, deepspeed, config.minibatch_size, compute=compute)
    critic_engine = make_engine(
        critic,
        dataclasses.replace(optimization, lr=config.critic_lr),
        deepspeed,
        config.minibatch_size,
        compute=compute,
    )
    result = train_ppo(
        PPOModels(policy_engine, critic_engine, reference, reward_fn),
        tokenizer,
        read_prompts(inputs.data, "ppo"),
        config,
        seed=seed,
        gold_fn=data_judge(inputs.data),
        on_metrics=on_metrics,
        checkpointer=checkpointer,
        on_alarm=on_alarm,
    )
    save_policy(policy, policy_engine, tokenizer, out_dir, lora=config.lora is not None)
    return result.history[-1] | {f"alarm/{alarm.name}": alarm.step for alarm in result.alarms}


@phase_task("ppo")
def ppo_task(
    context: RunContext,
    *,
    data: PhaseOutput,
    policy: PhaseOutput,
    sft: PhaseOutput,
    reward: PhaseOutput,
    config: PPOConfig,
    seed: int,
    iteration: int,
    deepspeed: DeepSpeedConfig | None = None,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> PhaseOutput:
    inputs = {"data": data, "policy": policy, "sft": sft, "reward": reward, "config": config, "seed": seed}
    inputs |= {"deepspeed": deepspeed, "compute": compute}
    key = artifact_key(context, f"iteration-{iteration:03d}", "policy", inputs)
    if done := existing_output(context, key):
        return done
    dirs = fetch_inputs(context, data=data, policy=policy, sft=sft, reward=reward)
    with phase_workspace(
        context,
        PPO,
        key,
        iteration=iteration,
        params={
            "ppo": config.model_dump(),
            "seed": seed,
            "world_size": world_size(deepspeed),
        },
        total_steps=config.steps,
        checkpoint_every=config.checkpoint_every,
    ) as work:
        metrics = run_entry(
            run_ppo, context, work, inputs=dirs, out_dir=work.out_dir, config=config, seed=seed,
            deepspeed=deepspeed, compute=compute,
        )  # fmt: skip
        if alarms := {name: step for name, step in metrics.items() if name.startswith("alarm/")}:
            work.log(alarms, config.steps)
        return publish(
            context,
            key,
            work.out_dir,
            mlflow_run_id=work.mlflow_run_id,
            phase="ppo",
            iteration=iteration,
            config=config,
            seed=seed,
            parents={"policy": policy.ref.key, "reference": sft.ref.key, "reward_model": reward.ref.key},
            metrics=PPO.namespaced(metrics),
        )
