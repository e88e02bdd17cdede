"""Evaluation on held-out prompts: the policy against the SFT model, judged by the gold reward."""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.config import EvalConfig
from rlhf_core.labelers import HumanLabel, LabelingPair
from rlhf_core.losses import masked_mean, masked_sum
from rlhf_core.modeling import Samples, response_logprobs, sample_responses
from rlhf_core.reward import RewardFunction
from rlhf_core.types import GoldBreakdown, GoldScorer


def win_rate(policy_gold: list[float], baseline_gold: list[float]) -> float:
    """Share of prompts where the policy's response beats the baseline's; ties count one half."""
    wins = sum(1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy_gold, baseline_gold, strict=True))
    return wins / len(policy_gold)


def win_rate_stderr(policy_gold: list[float], baseline_gold: list[float], samples_per_prompt: int) -> float:
    """Standard error of :func:`win_rate` over prompts: the pairs of one prompt (``samples_per_prompt`` consecutive
    ones) are averaged first, since they are not independent; 0 for a single prompt."""
    scores = [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy_gold, baseline_gold, strict=True)]
    k = samples_per_prompt
    per_prompt = [sum(scores[i : i + k]) / k for i in range(0, len(scores), k)]
    n = len(per_prompt)
    if n < 2:
        return 0.0
    mean = sum(per_prompt) / n
    return (sum((x - mean) ** 2 for x in per_prompt) / (n - 1) / n) ** 0.5


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams across the responses (Li et al. 2016); 0 when there are none."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _sample(model, tokenizer, prompts, config: EvalConfig) -> list[Samples]:
    return [
        sample_responses(
            model, tokenizer, prompts[i : i + config.batch_size], config.max_new_tokens, temperature=config.temperature
        )
        for i in range(0, len(prompts), config.batch_size)
    ]


def repeated(prompts: list[str], config: EvalConfig) -> list[str]:
    """Each prompt ``samples_per_prompt`` times in a row: the order policy and baseline samples are matched in."""
    return [p for p in prompts for _ in range(config.samples_per_prompt)]


def _gold_parts(prefix: str, prompts: list[str], texts: list[str], gold_breakdown: GoldBreakdown) -> dict[str, float]:
    parts = [gold_breakdown(p, t) for p, t in zip(prompts, texts, strict=True)]
    return {f"{prefix}/{name}": sum(part[name] for part in parts) / len(parts) for name in parts[0]}


@torch.no_grad()
def sample_baseline(
    sft_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    gold_fn: GoldScorer | None,
    config: EvalConfig,
    seed: int,
) -> list[dict]:
    """The SFT model's responses to the held-out prompts (``samples_per_prompt`` each, with their gold rewards),
    drawn once from a stream of their own: every iteration's policy is compared with the same baseline."""
    torch.manual_seed(seed)
    prompts = repeated(prompts, config)
    texts = [t for s in _sample(sft_model, tokenizer, prompts, config) for t in s.texts]
    rows = [{"prompt": p, "sft": t} for p, t in zip(prompts, texts, strict=True)]
    if gold_fn is not None:
        for row, gold in zip(rows, gold_fn(prompts, texts), strict=True):
            row["sft_gold"] = float(gold)
    return rows


@torch.no_grad()
def evaluate_policy(
    policy: PreTrainedModel,
    sft_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    baseline: list[dict],
    *,
    reward_fn: RewardFunction | None,
    gold_fn: GoldScorer | None,
    config: EvalConfig,
    seed: int,
    gold_breakdown: GoldBreakdown | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """The policy's responses to the baseline's prompts (:func:`sample_baseline`), matched with the baseline's: the
    win rate and its standard error, gold reward, reward-model score, KL to the SFT model (also the KL reference),
    entropy, length. Returns the summary metrics (with ``gold_breakdown``, the mean of each gold attribute as
    ``gold/<name>`` and ``sft_gold/<name>``) and the matched pairs, a row each."""
    torch.manual_seed(seed)
    prompts, sft_texts = [row["prompt"] for row in baseline], [row["sft"] for row in baseline]
    policy_batches = _sample(policy, tokenizer, prompts, config)
    policy_texts = [t for s in policy_batches for t in s.texts]
    kl, entropy, length, reward, has_eos = [], [], [], [], []
    for s in policy_batches:
        response_mask = s.response_mask
        logprobs, ent = response_logprobs(
            policy,
            s.query_responses,
            s.attention_mask,
            s.context_length,
            temperature=config.temperature,
            with_entropy=True,
        )
        ref_logprobs, _ = response_logprobs(
            sft_model, s.query_responses, s.attention_mask, s.context_length, temperature=config.temperature
        )
        kl.append(masked_sum(logprobs - ref_logprobs, response_mask, dim=1))
        entropy.append(masked_mean(ent, response_mask, dim=1))
        length.append(response_mask.sum(1).float())
        has_eos.append(s.has_eos.float())
        if reward_fn is not None:
            reward.append(reward_fn(s))
    metrics = {
        "kl": torch.cat(kl).mean().item(),
        "entropy": torch.cat(entropy).mean().item(),
        "response_length": torch.cat(length).mean().item(),
        "eos_rate": torch.cat(has_eos).mean().item(),
        "distinct_1": distinct_n(policy_texts, 1),
        "distinct_2": distinct_n(policy_texts, 2),
        "sft_distinct_2": distinct_n(sft_texts, 2),
    }
    if reward:
        metrics["reward"] = torch.cat(reward).mean().item()
    rows = [{"prompt": p, "policy": a, "sft": b} for p, a, b in zip(prompts, policy_texts, sft_texts, strict=True)]
    if gold_fn is not None:
        policy_gold, sft_gold = gold_fn(prompts, policy_texts), [row["sft_gold"] for row in baseline]
        metrics |= {
            "win_rate_vs_sft": win_rate(policy_gold, sft_gold),
            "win_rate_stderr": win_rate_stderr(policy_gold, sft_gold, config.samples_per_prompt),
            "gold_reward": sum(policy_gold) / len(policy_gold),
            "sft_gold_reward": sum(sft_gold) / len(sft_gold),
        }
        for row, pg, sg in zip(rows, policy_gold, sft_gold, strict=True):
            row |= {"policy_gold": pg, "sft_gold": sg}
    if gold_breakdown is not None:
        metrics |= _gold_parts("gold", prompts, policy_texts, gold_breakdown)
        metrics |= _gold_parts("sft_gold", prompts, sft_texts, gold_breakdown)
    return metrics, rows


def evaluation_pairs(rows: list[dict], n: int, seed: int, id_prefix: str) -> list[LabelingPair]:
    """The first ``n`` evaluation rows as blind pairs for people: the policy's and the SFT model's responses as A
    and B in random order (``swapped``: A is the SFT model's)."""
    rng = random.Random(seed)
    pairs = []
    for i, row in enumerate(rows[:n]):
        swapped = rng.random() < 0.5
        (a, ga), (b, gb) = (row["policy"], row["policy_gold"]), (row["sft"], row["sft_gold"])
        if swapped:
            (a, ga), (b, gb) = (b, gb), (a, ga)
        pairs.append(LabelingPair(f"{id_prefix}-{i:05d}", row["prompt"], a, b, ga, gb, swapped))
    return pairs


def human_win_rate(pairs: list[LabelingPair], labels: list[HumanLabel]) -> dict[str, float]:
    """InstructGPT's headline metric: the share of people's judgments that prefer the policy's response to the
    SFT model's, ties counting one half, over every label (several per pair where labelers overlap)."""
    swapped = {pair.pair_id: pair.swapped for pair in pairs}
    score = {True: 1.0, False: 0.0}
    wins = [
        0.5 if label.choice == "tie" else score[(label.choice == "a") != swapped[label.pair_id]] for label in labels
    ]
    return {
        "win_rate_vs_sft": sum(wins) / len(wins) if wins else float("nan"),
        "labels": len(labels),
        "tie_rate": sum(label.choice == "tie" for label in labels) / len(labels) if labels else float("nan"),
    }
