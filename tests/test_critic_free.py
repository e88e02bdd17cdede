"""The critic-free methods' advantages and GRPO's loss, against values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.critic_free import (
    group_advantages,
    grpo_loss,
    leave_one_out_advantages,
    reinforce_pp_advantages,
)

SQRT_HALF = math.sqrt(0.5)  # the Bessel-corrected standard deviation of {0, 1}


def test_grpo_normalizes_within_each_prompts_group_and_dr_grpo_does_not_divide():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    expected = 0.5 / (SQRT_HALF + 1e-4)
    assert group_advantages(scores, 2).tolist() == pytest.approx([expected, -expected, -expected, expected, 0, 0])
    assert group_advantages(scores, 2, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0])
    with pytest.raises(ValueError, match="6 scores do not make groups of 4"):
        group_advantages(scores, 4)


def test_rloo_subtracts_the_mean_of_the_other_samples():
    scores = torch.tensor([3.0, 0.0, 0.0, 1.0, 2.0, 3.0])
    # 3 - (0 + 0) / 2, 0 - (3 + 0) / 2, ...; 1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2
    assert leave_one_out_advantages(scores, 3).tolist() == pytest.approx([3, -1.5, -1.5, -1.5, 0, 1.5])


def test_reinforce_pp_returns_carry_the_score_and_the_kl_and_are_whitened_over_the_batch():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logprobs = torch.zeros(2, 3)
    ref = torch.tensor([[-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])  # k1 KL 0.5 on the first token of the first response
    advantages = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), logprobs, ref, mask, kl_coef=0.2)
    # rewards: [-0.1, 1 | pad] and [0, 0, 0]; returns to the end: [0.9, 1] and [0, 0, 0]
    returns = torch.tensor([0.9, 1.0, 0.0, 0.0, 0.0])
    whitened = (returns - returns.mean()) / returns.std()
    assert advantages[mask.bool()].tolist() == pytest.approx(whitened.tolist(), abs=1e-6)
    assert advantages[0, 2] == 0  # padding
    # the -baseline variant: each prompt's mean score first (one prompt of two here: 0.5), so the first response's
    # returns are [0.4, 0.5] and the second's [-0.5] * 3
    with_baseline = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), logprobs, ref, mask, kl_coef=0.2, group_size=2)
    returns = torch.tensor([0.4, 0.5, -0.5, -0.5, -0.5])
    whitened = (returns - returns.mean()) / returns.std()
    assert with_baseline[mask.bool()].tolist() == pytest.approx(whitened.tolist(), abs=1e-6)


def test_grpo_loss_clips_the_ratio_adds_k3_kl_and_normalizes_by_length_or_not():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    same = torch.zeros(2, 3)
    advantages = torch.tensor([1.0, 0.5])
    # ratio 1, no KL: each token's loss is -A; per response -1 and -0.5
    assert grpo_loss(same, same, same, advantages, mask=mask, clip_range=0.2, kl_coef=0.1).item() == pytest.approx(
        -0.75
    )
    dr = grpo_loss(same, same, same, advantages, mask=mask, clip_range=0.2, kl_coef=0.1, length_normalized=False)
    assert dr.item() == pytest.approx((-2 - 0.5) / 6)
    # a ratio of 1.5 on every token is clipped to 1.2 for a positive advantage, kept at 1.5 for a negative one
    up = torch.full((2, 3), math.log(1.5))
    loss = grpo_loss(up, same, up, torch.tensor([1.0, -1.0]), mask=mask, clip_range=0.2, kl_coef=0.0)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    # k3 with the reference at half the policy's probability: (0.5 - 1) - log 0.5 on each token
    half = torch.full((2, 3), math.log(0.5))
    kl = grpo_loss(same, same, half, torch.zeros(2), mask=mask, clip_range=0.2, kl_coef=1.0)
    assert kl.item() == pytest.approx(-0.5 + math.log(2))
