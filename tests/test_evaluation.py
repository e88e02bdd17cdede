"""Evaluation against a fixed SFT baseline: sampled once with a seed of its own, matched pair by pair with the
policy's responses, the win rate reported with its standard error over prompts."""

from __future__ import annotations

import math

import pytest

from rlhf_core import world
from rlhf_core.config import EvalConfig
from rlhf_core.evaluate import evaluate_policy, sample_baseline, win_rate, win_rate_stderr
from rlhf_core.modeling import load_policy, load_tokenizer


def test_win_rate_and_its_standard_error_by_hand() -> None:
    policy, baseline = [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]
    assert win_rate(policy, baseline) == 0.75  # two wins, two ties
    # one sample per prompt: scores 1, .5, 1, .5 -> mean .75, sample variance 1/12, s.e. sqrt(1/12/4)
    assert win_rate_stderr(policy, baseline, 1) == pytest.approx(math.sqrt(1 / 12 / 4))
    # two samples per prompt, averaged first: both prompts score .75, so no spread between prompts
    assert win_rate_stderr(policy, baseline, 2) == 0.0
    assert win_rate_stderr([1.0], [0.0], 1) == 0.0


def test_the_baseline_is_drawn_once_and_does_not_move_with_the_policy_or_its_seed(sft_dir, base_dir) -> None:
    tokenizer, sft = load_tokenizer(sft_dir), load_policy(sft_dir).eval()
    prompts = world.make_world(0).eval_prompts[:12]
    config = EvalConfig(max_new_tokens=8, samples_per_prompt=3)
    baseline = sample_baseline(sft, tokenizer, prompts, gold_fn=world.gold_rewards, config=config, seed=7)
    assert [row["prompt"] for row in baseline] == [p for p in prompts for _ in range(3)]
    assert baseline == sample_baseline(sft, tokenizer, prompts, gold_fn=world.gold_rewards, config=config, seed=7)

    results = [
        evaluate_policy(
            policy, sft, tokenizer, baseline, reward_fn=None, gold_fn=world.gold_rewards, config=config, seed=seed
        )
        for policy, seed in ((sft, 1), (load_policy(base_dir).eval(), 2))
    ]
    sft_gold = sum(row["sft_gold"] for row in baseline) / len(baseline)
    for metrics, rows in results:
        assert metrics["sft_gold_reward"] == pytest.approx(sft_gold)  # the same baseline whatever is evaluated
        assert [row["sft"] for row in rows] == [row["sft"] for row in baseline] and len(rows) == 36
        assert 0.0 <= metrics["win_rate_stderr"] <= 0.5
    assert results[0][0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the SFT model against itself
