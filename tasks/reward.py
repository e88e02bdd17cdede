"""Reward-model phase: Bradley-Terry training on every preference so far, normalized on the latest."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from infra.artifacts import read_pairs, reward_init_dir
from infra.catalog import REWARD
from infra.deepspeed_config import DeepSpeedConfig
from rlhf_core.checkpoint import Checkpointer
from rlhf_core.config import DEFAULT_COMPUTE, ComputeConfig, RewardConfig
from rlhf_core.engine import without_tied_copies
from rlhf_core.lora import add_lora, merged
from rlhf_core.modeling import load_scorer, load_tokenizer
from rlhf_core.reward import (
    ENSEMBLE_DIR,
    RewardFunction,
    bootstrap_resample,
    normalize_reward_model,
    score_texts,
    split_pairs,
    train_reward_model,
)
from rlhf_core.sft import num_training_steps
from rlhf_core.types import MetricsCallback
from tasks.common import (
    PhaseOutput,
    RunContext,
    artifact_key,
    existing_output,
    fetch,
    phase_engine,
    phase_task,
    phase_workspace,
    publish,
    world_size,
)
from tasks.launch import run_entry


def run_reward(
    init_dir: Path,
    preference_dirs: list[Path],
    out_dir: Path,
    *,
    config: RewardConfig,
    seed: int,
    on_metrics: MetricsCallback | None = None,
    trust_remote_code: bool = False,
    checkpointer: Checkpointer | None = None,
    deepspeed: DeepSpeedConfig | None = None,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> dict[str, float]:
    """Train a reward model from ``init_dir``'s backbone on all pairs in ``preference_dirs`` (``config.ensemble_size``
    of them, the first at ``out_dir``, the rest in ``out_dir/ensemble``); normalize each on the responses of the last
    one (the current policy's samples). The first member reports its steps and resumes from checkpoints. As one of
    N data-parallel ranks, every rank trains and scores alike and rank 0 writes. ``compute``: precision,
    recomputation and attention kernel."""
    tokenizer = load_tokenizer(init_dir, trust_remote_code)
    pairs = [pair for d in preference_dirs for pair in read_pairs(d)]
    train, val = split_pairs(pairs, config.val_fraction)
    latest = read_pairs(preference_dirs[-1])
    epoch_size = None if config.epoch_size == "all" else max(1, round(len(train) * len(latest) / len(pairs)))
    prompts, responses = [p.prompt for p in latest] * 2, [p.chosen for p in latest] + [p.rejected for p in latest]
    metrics: dict[str, float] = {}
    members = []
    for member in range(config.ensemble_size):
        member_seed = seed + member
        member_init = init_dir / ENSEMBLE_DIR / f"member-{member}"  # a warm start from the previous ensemble's
        torch.manual_seed(member_seed)  # a fresh scalar head (from a backbone): the same seed, the same reward model
        model = load_scorer(
            member_init if member_init.is_dir() else init_dir,
            trust_remote_code,
            attn_implementation=compute.attn_implementation,
        )
        model.config.reward_gain, model.config.reward_bias = 1.0, 0.0  # a previous reward model trains on raw scores
        model.config.reward_pooling, model.config.reward_logprob_coef = config.pooling, config.logprob_coef
        if config.lora is not None:
            model = add_lora(model, config.lora, scorer=True)
        member_train = bootstrap_resample(train, member_seed) if config.bootstrap else train
        total = num_training_steps(epoch_size or len(member_train), config.batch_size, config.max_epochs)
        engine = phase_engine(model, config, total, deepspeed, compute=compute)
        first = member == 0
        result = train_reward_model(
            engine,
            tokenizer,
            member_train,
            val,
            config=config,
            seed=member_seed,
            epoch_size=epoch_size,
            on_metrics=on_metrics if first else None,
            checkpointer=checkpointer if first else None,
        )
        norm = normalize_reward_model(model, tokenizer, prompts, responses, max_length=config.max_length)
        model.config.reward_aggregate, model.config.reward_uncertainty_coef = config.aggregate, config.uncertainty_coef
        folder = out_dir if first else out_dir / ENSEMBLE_DIR / f"member-{member}"
        if config.lora is not None:  # LoRA runs below ZeRO-3: every rank holds the whole model and merges it
            model, weights = merged(model), None
        else:
            weights = engine.full_state_dict()  # every rank takes part in gathering; rank 0 writes
        if engine.rank == 0:
            model.save_pretrained(folder, state_dict=weights and without_tied_copies(model, weights))
        members.append(model)
        if first:
            metrics = {
                "val_accuracy": result.val_accuracy,
                "val_gold_accuracy": result.val_gold_accuracy,
                "first_loss": result.first_loss,
                "final_loss": result.final_loss,
                "steps": result.steps,
                "train_pairs": len(train),
                "stopped_early": result.stopped_early,
                **result.val_by_strength,
                **norm,
            }
    if engine.rank == 0:
        tokenizer.save_pretrained(out_dir)
    if len(members) > 1:
        metrics |= ensemble_metrics(
            RewardFunction(members[0], members=members[1:]), tokenizer, val, latest, max_length=config.max_length
        )
    return metrics


def ensemble_metrics(
    ensemble: RewardFunction, tokenizer: PreTrainedTokenizerBase, val: list, latest: list, *, max_length: int
) -> dict[str, float]:
    """The ensemble's validation accuracy (its aggregate reward's ordering), and its members' disagreement on the
    current policy's samples."""
    models = [ensemble.model, *ensemble.members]

    def member_scores(pairs: list, side: str) -> torch.Tensor:  # (K, N)
        prompts, responses = [p.prompt for p in pairs], [getattr(p, side) for p in pairs]
        return torch.stack([score_texts(m, tokenizer, prompts, responses, max_length=max_length) for m in models])

    chosen, rejected = (
        ensemble.aggregate(member_scores(val, "chosen")),
        ensemble.aggregate(member_scores(val, "rejected")),
    )
    disagreement = member_scores(latest, "chosen").std(0, correction=0).mean().item()
    return {"ensemble_val_accuracy": (chosen > rejected).float().mean().item(), "ensemble_disagreement": disagreement}


def reward_start(previous_dir: Path | None, data_dir: Path, sft_dir: Path, config: RewardConfig) -> Path:
    """Where a reward model starts: the last iteration's with ``config.warm_start``, else the base backbone."""
    if config.warm_start and previous_dir is not None:
        return previous_dir
    return reward_init_dir(data_dir, sft_dir)


@phase_task("train-reward-model")
def reward_task(
    context: RunContext,
    *,
    data: PhaseOutput,
    sft: PhaseOutput,
    preferences: list[PhaseOutput],
    config: RewardConfig,
    seed: int,
    iteration: int,
    previous: PhaseOutput | None = None,
    deepspeed: DeepSpeedConfig | None = None,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> PhaseOutput:
    """``previous``: the last iteration's reward model, the starting point when ``config.warm_start``."""
    previous = previous if config.warm_start else None
    inputs = {"data": data, "sft": sft, "preferences": preferences, "config": config, "seed": seed}
    inputs |= {"previous": previous, "deepspeed": deepspeed, "compute": compute}
    key = artifact_key(context, f"iteration-{iteration:03d}", "reward_model", inputs)
    if done := existing_output(context, key):
        return done
    sft_dir = fetch(context, sft)
    previous_dir = fetch(context, previous) if previous is not None else None
    init_dir = reward_start(previous_dir, fetch(context, data), sft_dir, config)
    init = previous if init_dir == previous_dir else sft if init_dir == sft_dir else data
    with phase_workspace(
        context,
        REWARD,
        key,
        iteration=iteration,
        params={"reward": config.model_dump(), "seed": seed, "world_size": world_size(deepspeed)},
        checkpoint_every=config.checkpoint_every,
    ) as work:
        metrics = run_entry(
            run_reward, context, work, init_dir=init_dir, preference_dirs=[fetch(context, p) for p in preferences],
            out_dir=work.out_dir, config=config, seed=seed, deepspeed=deepspeed, compute=compute,
        )  # fmt: skip
        work.log(metrics, iteration)
        return publish(
            context,
            key,
            work.out_dir,
            mlflow_run_id=work.mlflow_run_id,
            phase="train-reward-model",
            iteration=iteration,
            config=config,
            seed=seed,
            parents={"init": init.ref.key, "preferences": [p.ref.key for p in preferences]},
            metrics=REWARD.namespaced(metrics),
        )
