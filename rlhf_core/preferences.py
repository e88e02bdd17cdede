"""Preference collection: the current policy answers each prompt twice and labelers pick the better, simulated
labelers here, or people, who see the two answers as a labeling batch (A and B in random order) and whose labels
come back as :class:`HumanLabel` rows."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.config import PreferenceConfig
from rlhf_core.labelers import (
    NOISE_RANGE,
    HumanLabel,
    LabelingPair,
    agreement_stats,
    calibrate_noise_scale,
    draw_labels,
    gold_per_word,
    human_label_stats,
)
from rlhf_core.modeling import sample_responses
from rlhf_core.types import GoldScorer


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    labeler: str
    chosen_gold: float
    rejected_gold: float
    strength: int | None = None  # 1..4 (STRENGTHS) where a person gave one


def sample_pairs(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    config: PreferenceConfig,
    rng: random.Random,
) -> tuple[list[str], list[str], list[str]]:
    """``config.n_pairs`` prompts (cycled, shuffled by ``rng``) answered twice by the policy; pairs of identical
    responses are dropped. -> prompts, first responses, second responses."""
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
    return [pair_prompts[i] for i in keep], [first[i] for i in keep], [second[i] for i in keep]


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
    label from one labeler (round robin); the overlap measures inter-annotator agreement. Pairs the gold judge scores
    alike carry no preference, only a labeler's coin flip: ``config.gold_ties`` says whether they are labeled or
    dropped, and the labelers' noise is calibrated on the pairs the judge decides either way."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pair_prompts, first, second = sample_pairs(policy, tokenizer, prompts, config=config, rng=rng)

    golds = list(zip(gold_fn(pair_prompts, first), gold_fn(pair_prompts, second), strict=True))
    tied = [ga == gb for ga, gb in golds]
    if config.gold_ties == "drop":
        keep = [i for i, tie in enumerate(tied) if not tie]
        pair_prompts, first, second, golds = ([xs[i] for i in keep] for xs in (pair_prompts, first, second, golds))
    lengths = [(len(a.split()), len(b.split())) for a, b in zip(first, second, strict=True)]
    word_value = gold_per_word(golds, lengths)
    decided = [i for i, (ga, gb) in enumerate(golds) if ga != gb]
    # Labelers agree on a tie half the time at any noise: the target holds for the pairs the judge decides.
    calibrated = config.target_agreement is not None and bool(decided)
    scale = (
        calibrate_noise_scale(
            [golds[i] for i in decided],
            [lengths[i] for i in decided],
            config.labelers,
            config.target_agreement,
            word_value=word_value,
        )
        if calibrated
        else config.noise_scale
    )
    labels = draw_labels(golds, lengths, config.labelers, noise_scale=scale, rng=rng, word_value=word_value)

    pairs = []
    for i, prompt in enumerate(pair_prompts):
        who = i % len(config.labelers)
        (a, ga), (b, gb) = (first[i], golds[i][0]), (second[i], golds[i][1])
        if not labels[who][i]:
            (a, ga), (b, gb) = (b, gb), (a, ga)
        pairs.append(PreferencePair(prompt, a, b, config.labelers[who].name, ga, gb))
    stats = {
        **(agreement_stats(labels) if pairs else {}),
        "noise_scale": scale,
        "gold_per_word": word_value,
        "noise_at_limit": float(calibrated and not NOISE_RANGE[0] * 1.01 < scale < NOISE_RANGE[1] / 1.01),
        "n_pairs": len(pairs),
        "dropped_identical": config.n_pairs - len(tied),
        "gold_tie_rate": sum(tied) / max(1, len(tied)),
        "dropped_gold_ties": sum(tied) if config.gold_ties == "drop" else 0,
        "label_gold_accuracy": sum(p.chosen_gold > p.rejected_gold for p in pairs) / max(1, len(decided)),
    }
    return pairs, stats


def labeling_pairs(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    gold_fn: GoldScorer,
    *,
    config: PreferenceConfig,
    seed: int,
    id_prefix: str,
) -> list[LabelingPair]:
    """The pairs :func:`collect_preferences` would sample, for people to label: A and B in random order, ids
    ``<id_prefix>-<n>``, the gold rewards kept beside them (never shown)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pair_prompts, first, second = sample_pairs(policy, tokenizer, prompts, config=config, rng=rng)
    golds = zip(gold_fn(pair_prompts, first), gold_fn(pair_prompts, second), strict=True)
    pairs = []
    for i, (prompt, one, two, (g1, g2)) in enumerate(zip(pair_prompts, first, second, golds, strict=True)):
        swapped = rng.random() < 0.5
        (a, ga), (b, gb) = ((two, g2), (one, g1)) if swapped else ((one, g1), (two, g2))
        pairs.append(LabelingPair(f"{id_prefix}-{i:05d}", prompt, a, b, ga, gb, swapped))
    return pairs


def preferences_from_labels(
    pairs: list[LabelingPair], labels: list[HumanLabel]
) -> tuple[list[PreferencePair], dict[str, float]]:
    """Every label that prefers A or B becomes a (chosen, rejected) pair with its labeler and strength; ties carry
    no Bradley-Terry signal and are left out (counted), as are pairs nobody labeled. Returns the pairs and the
    labelers' statistics (see :func:`rlhf_core.labelers.human_label_stats`)."""
    by_id = {pair.pair_id: pair for pair in pairs}
    preferences = []
    for label in labels:
        pair = by_id[label.pair_id]
        if label.choice == "tie":
            continue
        chosen, rejected = ("a", "b") if label.choice == "a" else ("b", "a")
        text = {"a": pair.response_a, "b": pair.response_b}
        gold = {"a": pair.a_gold, "b": pair.b_gold}
        preferences.append(
            PreferencePair(
                pair.prompt, text[chosen], text[rejected], label.labeler, gold[chosen], gold[rejected], label.strength
            )
        )
    gold_choice = {p.pair_id: "a" if p.a_gold > p.b_gold else "b" if p.b_gold > p.a_gold else "tie" for p in pairs}
    stats = human_label_stats([(label.pair_id, label.labeler, label.choice) for label in labels], gold_choice)
    stats["n_pairs"] = len(preferences)
    stats["unlabeled_pairs"] = len(by_id.keys() - {label.pair_id for label in labels})
    return preferences, stats
