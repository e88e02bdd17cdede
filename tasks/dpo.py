"""DPO phase (``algorithm: dpo``): the policy fit to the preference pairs directly, against a frozen reference."""

from __future__ import annotations

from pathlib import Path

import torch

from infra.artifacts import read_pairs
from infra.catalog import DPO
from infra.deepspeed_config import DeepSpeedConfig
from rlhf_core.checkpoint import Checkpointer
from rlhf_core.config import DEFAULT_COMPUTE, ComputeConfig, DPOConfig
from rlhf_core.dpo import train_dpo
from rlhf_core.lora import add_lora
from rlhf_core.modeling import load_policy, load_tokenizer
from rlhf_core.preferences import PreferencePair
from rlhf_core.sft import num_training_steps
from rlhf_core.types import MetricsCallback
from tasks.common import (
    PhaseOutput,
    RunContext,
    artifact_key,
    at_precision,
    existing_output,
    fetch,
    phase_engine,
    phase_task,
    phase_workspace,
    publish,
    world_size,
)
from tasks.launch import run_entry
from tasks.ppo import load_policy_and_reference, save_policy


def run_dpo(
    policy_dir: Path,
    reference_dir: Path,
    pairs: list[PreferencePair],
    out_dir: Path,
    *,
    sft_dir: Path,
    config: DPOConfig,
    seed: int,
    on_metrics: MetricsCallback | None = None,
    trust_remote_code: bool = False,
    checkpointer: Checkpointer | None = None,
    deepspeed: DeepSpeedConfig | None = None,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> dict[str, float]:
    """DPO from ``policy_dir`` on ``pairs`` against ``reference_dir`` (with LoRA and an SFT
    reference: the policy with its adapters off); saves the new policy to ``out_dir``, returns the last metrics.
    ``compute``: precision (the reference's too), recomputation (the policy's) and attention kernel."""
    attn = compute.attn_implementation
    tokenizer = load_tokenizer(policy_dir, trust_remote_code)
    torch.manual_seed(seed)  # fresh LoRA adapters: the same seed, the same adapters
    if config.lora is not None and reference_dir == sft_dir:
        policy, reference = load_policy_and_reference(
            policy_dir, sft_dir, config.lora, trust_remote_code, attn_implementation=attn
        )
    else:
        policy = load_policy(policy_dir, trust_remote_code, attn_implementation=attn)
        policy = add_lora(policy, config.lora) if config.lora is not None else policy
        reference = load_policy(reference_dir, trust_remote_code, attn_implementation=attn)
        reference = reference.eval().requires_grad_(False)
    total = num_training_steps(len(pairs), config.batch_size, config.epochs)
    engine = phase_engine(policy, config, total, deepspeed, compute=compute)
    at_precision(reference, compute)  # the log-ratios between models at the same precision
    result = train_dpo(
        engine, reference, tokenizer, pairs, config=config, seed=seed, on_metrics=on_metrics, checkpointer=checkpointer
    )
    save_policy(policy, engine, tokenizer, out_dir, lora=config.lora is not None)
    return result.history[-1] | {"steps": result.steps, "train_pairs": len(pairs)}


@phase_task("dpo")
def dpo_task(
    context: RunContext,
    *,
    policy: PhaseOutput,
    sft: PhaseOutput,
    preferences: list[PhaseOutput],
    config: DPOConfig,
    seed: int,
    iteration: int,
    deepspeed: DeepSpeedConfig | None = None,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> PhaseOutput:
    """``policy``: the current policy, where DPO starts (and its reference with ``dpo.reference: previous``);
    ``preferences``: the pairs to train on (every iteration's, or the latest, as ``dpo.pairs`` says)."""
    reference = policy if config.reference == "previous" else sft
    inputs = {"policy": policy, "sft": sft, "preferences": preferences, "config": config, "seed": seed}
    inputs |= {"deepspeed": deepspeed, "compute": compute}
    key = artifact_key(context, f"iteration-{iteration:03d}", "policy", inputs)
    if done := existing_output(context, key):
        return done
    pairs = [pair for p in preferences for pair in read_pairs(fetch(context, p))]
    with phase_workspace(
        context,
        DPO,
        key,
        iteration=iteration,
        params={
            "dpo": config.model_dump(),
            "seed": seed,
            "world_size": world_size(deepspeed),
        },
        total_steps=num_training_steps(len(pairs), config.batch_size, config.epochs),
        checkpoint_every=config.checkpoint_every,
    ) as work:
        metrics = run_entry(
            run_dpo,
            context,
            work,
            deepspeed=deepspeed,
            compute=compute,
            policy_dir=fetch(context, policy),
            reference_dir=fetch(context, reference),
            pairs=pairs,
            out_dir=work.out_dir,
            sft_dir=fetch(context, sft),
            config=config,
            seed=seed,
        )
        return publish(
            context,
            key,
            work.out_dir,
            mlflow_run_id=work.mlflow_run_id,
            phase="dpo",
            iteration=iteration,
            config=config,
            seed=seed,
            parents={
                "policy": policy.ref.key,
                "reference": reference.ref.key,
                "preferences": [p.ref.key for p in preferences],
            },
            metrics=DPO.namespaced(metrics),
        )
