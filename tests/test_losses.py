"""The math, against values worked out by hand on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_core.kl_control import AdaptiveKLController, FixedKLController
from rlhf_core.losses import (
    bradley_terry_loss,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    selective_log_softmax,
    value_loss,
)


def pad(x: torch.Tensor, n: int, value: float = 0.0) -> torch.Tensor:
    """Append n padded positions (with garbage ``value``) to the time axis."""
    return torch.cat([x, torch.full((x.shape[0], n), value)], 1)


def test_masked_mean_and_var_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 99.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 3.0])
    assert masked_var(values, mask).item() == pytest.approx(1.0)  # var([1, 2, 3]), unbiased


def test_masked_whiten_gives_zero_mean_unit_variance_on_real_tokens():
    values = torch.tensor([[1.0, 2.0, 7.0], [3.0, 5.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    white = masked_whiten(values, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(white, mask).item() == pytest.approx(1.0, rel=1e-4)
    assert white[0, 2] == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_selective_log_softmax_matches_naive(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 11) * 3).to(dtype)
    index = torch.randint(0, 11, (3, 5))
    expected = F.log_softmax(logits.float(), -1).gather(-1, index[..., None])[..., 0]
    tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 5e-2
    torch.testing.assert_close(selective_log_softmax(logits, index).float(), expected, atol=tolerance, rtol=0)


def test_entropy_of_uniform_is_log_vocab():
    assert entropy_from_logits(torch.zeros(2, 3, 8)).allclose(torch.full((2, 3), math.log(8)))


def test_kl_of_policy_against_itself_is_zero():
    logprobs = torch.log(torch.tensor([[0.2, 0.5, 0.9]]))
    for estimator in ("k1", "k3"):
        assert kl_penalty(logprobs, logprobs, estimator).abs().max().item() == 0.0


def test_kl_estimators_by_hand():
    logprobs, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_penalty(logprobs, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 = (rho - 1) - log rho with rho = ref / pi = 0.5
    assert kl_penalty(logprobs, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logprobs, ref, "k2")


def test_gae_with_lambda_zero_is_one_step_td_error():
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.5, 0.3, 0.4]])
    mask = torch.ones(1, 3)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.0)
    td = [0.1 + 0.9 * 0.3 - 0.5, -0.2 + 0.9 * 0.4 - 0.3, 1.0 + 0.0 - 0.4]
    assert advantages[0].tolist() == pytest.approx(td)
    assert returns[0].tolist() == pytest.approx([a + v for a, v in zip(td, [0.5, 0.3, 0.4], strict=True)])


def test_gae_with_lambda_one_gamma_one_is_monte_carlo_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert returns[0].tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert advantages[0].tolist() == pytest.approx([1.5, 1.0, 0.5])


def test_padding_changes_no_loss():
    torch.manual_seed(0)
    b, t = 4, 5
    logprobs, old, ref = torch.randn(b, t) - 2, torch.randn(b, t) - 2, torch.randn(b, t) - 2
    values, old_values, scores = torch.randn(b, t), torch.randn(b, t), torch.randn(b)
    mask = torch.ones(b, t)
    mask[1, 3:] = 0
    rewards = kl_shaped_rewards(scores, kl_penalty(logprobs, ref) * mask, mask, 0.1)
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    adv = masked_whiten(adv, mask)
    base = (
        policy_loss(logprobs, old, adv, mask, clip_range=0.2)[0],
        value_loss(values, old_values, ret, mask, clip_range_value=0.2)[0],
    )

    padded_mask = pad(mask, 3)
    p_rewards = kl_shaped_rewards(
        scores, kl_penalty(pad(logprobs, 3, 5.0), pad(ref, 3, -5.0)) * padded_mask, padded_mask, 0.1
    )
    p_adv, p_ret = compute_gae(p_rewards, pad(values, 3, 9.0), padded_mask, gamma=1.0, lam=0.95)
    p_adv = masked_whiten(p_adv, padded_mask)
    padded = (
        policy_loss(pad(logprobs, 3, 1.0), pad(old, 3, -1.0), p_adv, padded_mask, clip_range=0.2)[0],
        value_loss(pad(values, 3, 9.0), pad(old_values, 3, -9.0), p_ret, padded_mask, clip_range_value=0.2)[0],
    )
    torch.testing.assert_close(p_adv[:, :t], adv)
    for a, b_ in zip(base, padded, strict=True):
        assert a.item() == pytest.approx(b_.item(), abs=1e-6)


def test_kl_shaped_rewards_put_score_on_last_real_token():
    kl = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = kl_shaped_rewards(torch.tensor([10.0, 20.0]), kl, mask, kl_coef=0.5)
    assert rewards.tolist() == [[-0.5, 9.0, 0.0], [-0.5, -0.5, 19.5]]


def test_token_scores_are_rewarded_where_they_were_earned():
    kl = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    credit = torch.tensor([[4.0, 6.0, 99.0], [5.0, 5.0, 10.0]])  # 99: past the first response's end, masked out
    rewards = kl_shaped_rewards(torch.tensor([-1.0, 0.0]), kl, mask, kl_coef=0.5, token_scores=credit)
    assert rewards.tolist() == [[3.5, 4.0, 0.0], [4.5, 4.5, 9.5]]


def test_policy_loss_clips_and_reports():
    advantages = torch.tensor([[1.0, -1.0]])
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5, both outside 1 +- 0.2
    loss, stats = policy_loss(new, old, advantages, torch.ones(1, 2), clip_range=0.2)
    # positive advantage: min(1.5, 1.2) * 1 -> 1.2 ; negative: max(0.5, 0.8) * -1 -> -0.8 ; loss = -mean(1.2, -0.8)
    assert loss.item() == pytest.approx(-0.2)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    same, same_stats = policy_loss(old, old, advantages, torch.ones(1, 2), clip_range=0.2)
    assert same.item() == pytest.approx(0.0) and same_stats["approx_kl"].item() == 0.0


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    old, new, returns = torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[1.0]])
    loss, stats = value_loss(new, old, returns, torch.ones(1, 1), clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8**2)  # clipped prediction 0.2 is further from the return
    assert stats["value_clipfrac"].item() == 1.0


def test_explained_variance_is_one_for_a_perfect_critic():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    assert explained_variance(returns, returns, torch.ones(1, 3)).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 3) + 2, returns, torch.ones(1, 3)).item() == pytest.approx(0.0)


def test_bradley_terry_loss():
    equal = torch.tensor([0.3, -1.0])
    assert bradley_terry_loss(equal, equal).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.log(1 + math.exp(-2))
    )
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([5.0])).item() > 5.0


def test_adaptive_kl_controller_moves_toward_target_and_is_capped():
    ctl = AdaptiveKLController(value=0.1, target=4.0, horizon=100)
    ctl.update(current_kl=8.0, n_steps=10)  # error capped at +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(current_kl=3.0, n_steps=10)  # error -0.25 capped at -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
