"""Preference collection: the current policy answers each prompt twice and labelers pick the better."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.labelers import LabelerConfig, agreement_stats, calibrate_noise_scale, default_labelers, draw_labels
from rlhf_core.modeling import sample_responses
from rlhf_core.types import GoldScorer


class PreferenceConfig(BaseModel):
    """Sampling response pairs from the current policy and labeling them."""

    model_config = ConfigDict(extra="forbid")
    n_pairs: int = Field(1536, ge=1, description="Response pairs sampled per iteration (identical pairs are dropped).")
    max_new_tokens: int = Field(32, ge=1, description="Longest sampled response, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for the response pairs.")
    batch_size: int = Field(256, ge=1, description="Prompts per generation batch.")
    labelers: list[LabelerConfig] = Field(
        default_factory=default_labelers,
        min_length=2,
        description="The simulated labelers; each pair is labeled by all of them.",
    )
    target_agreement: float | None = Field(
        0.7,
        gt=0.5,
        lt=1.0,
        description="Scale labeler noise so two labelers agree on this fraction of pairs (InstructGPT saw about "
        "0.7); null keeps noise_scale fixed.",
    )
    noise_scale: float = Field(1.0, gt=0, description="Shared labeler noise when target_agreement is null.")


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    labeler: str
    chosen_gold: float
    rejected_gold: float


def collect_preferences(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    gold_fn: GoldScorer,
    *,
    config: PreferenceConfig,
    seed: int,
) -> tuple[list[PreferencePair], dict[str, float]]:
    """Sample ``n_pairs`` response pairs, have every labeler judge every pair, and keep each pair's
    label from one labeler (round robin); the overlap measures inter-annotator agreement."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pair_prompts = [prompts[i % len(prompts)] for i in range(config.n_pairs)]
    rng.shuffle(pair_prompts)
    first, second = [], []
    for start in range(0, len(pair_prompts), config.batch_size):
        batch = pair_prompts[start : start + config.batch_size]
        samples = sample_responses(
            policy, tokenizer, batch + batch, config.max_new_tokens, temperature=config.temperature
        )
        first += samples.texts[: len(batch)]
        second += samples.texts[len(batch) :]
    keep = [i for i in range(len(pair_prompts)) if first[i] != second[i]]
    pair_prompts = [pair_prompts[i] for i in keep]
    first, second = [first[i] for i in keep], [second[i] for i in keep]

    golds = list(zip(gold_fn(pair_prompts, first), gold_fn(pair_prompts, second), strict=True))
    lengths = [(len(a.split()), len(b.split())) for a, b in zip(first, second, strict=True)]
    scale = (
        calibrate_noise_scale(golds, lengths, config.labelers, config.target_agreement)
        if config.target_agreement is not None
        else config.noise_scale
    )
    labels = draw_labels(golds, lengths, config.labelers, noise_scale=scale, rng=rng)

    pairs = []
    for i, prompt in enumerate(pair_prompts):
        who = i % len(config.labelers)
        (a, ga), (b, gb) = (first[i], golds[i][0]), (second[i], golds[i][1])
        if not labels[who][i]:
            (a, ga), (b, gb) = (b, gb), (a, ga)
        pairs.append(PreferencePair(prompt, a, b, config.labelers[who].name, ga, gb))
    decided = [p for p in pairs if p.chosen_gold != p.rejected_gold]
    stats = {
        **agreement_stats(labels),
        "noise_scale": scale,
        "n_pairs": len(pairs),
        "dropped_identical": config.n_pairs - len(pairs),
        "label_gold_accuracy": sum(p.chosen_gold > p.rejected_gold for p in decided) / max(1, len(decided)),
    }
    return pairs, stats
