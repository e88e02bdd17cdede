"""The math of RLHF as pure functions on tensors.

Shapes: B = batch, T = response length (padded), V = vocabulary. Every ``mask`` is 1 on real
response tokens and 0 on padding, and every reduction respects it, so padding never changes a loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1. values, mask: (B, T)."""
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1. values, mask: (B, T) -> scalar, or (B,) with dim=1."""
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance of the masked entries. values, mask: (B, T) -> scalar."""
    mean = masked_mean(values, mask)
    return masked_sum((values - mean) ** 2, mask) / (mask.sum() - 1).clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalize the masked entries to mean 0 (unless ``shift_mean`` is False) and variance 1.
    values, mask: (B, T) -> (B, T); padded entries come back as 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """``log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]`` without materializing
    the (B, T, V) log-probabilities. logits: (B, T, V), index: (B, T) -> (B, T)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    # logsumexp is unstable in half precision: go row by row in log_softmax instead.
    return torch.stack(
        [F.log_softmax(row, -1).gather(-1, idx[:, None])[:, 0] for row, idx in zip(logits, index, strict=True)]
    )


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position. logits: (B, T, V) -> (B, T)."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy (Schulman,
    "Approximating KL divergence", 2020). With rho = ref/policy: k1 = -log rho (unbiased, can be
    negative), k3 = (rho - 1) - log rho (unbiased, never negative). (B, T), (B, T) -> (B, T)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over response tokens.
    rewards, values, mask: (B, T) -> advantages, returns: (B, T). Positions past a sequence's end
    contribute nothing: their reward, value and bootstrap are zero."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        nextvalues = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]
        advantages[:, t] = lastgaelam
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate objective (Schulman et al. 2017), negated for minimization.
    (B, T) each -> scalar loss and detached stats ``clipfrac`` and ``approx_kl`` (the k3 estimator)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: the worse of the clipped and unclipped squared errors, halved.
    (B, T) each -> scalar loss and the detached ``value_clipfrac``."""
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[returns - values] / Var[returns] over the masked entries; 1 is a perfect critic."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


def bradley_terry_loss(rewards_chosen: Tensor, rewards_rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged: the negative log-likelihood of the labels under
    the Bradley-Terry model (Ouyang et al. 2022, eq. 1), with Llama 2's margin for how much better the chosen
    response was said to be (Touvron et al. 2023, eq. 2). (B,), (B,), (B,) or None -> scalar."""
    difference = rewards_chosen - rewards_rejected
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()


def kl_shaped_rewards(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, *, token_scores: Tensor | None = None
) -> Tensor:
    """Per-token rewards: ``-kl_coef * kl`` at every response token, plus the sequence's score at its
    last token (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2), and ``token_scores`` (B, T), a score credited token
    by token, where given. scores: (B,), kl, mask: (B, T) -> (B, T)."""
    rewards = -kl_coef * kl * mask
    if token_scores is not None:
        rewards = rewards + token_scores * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return rewards.index_put((torch.arange(len(scores), device=scores.device), last), scores, accumulate=True)


def dpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct preference optimization on the policy-to-reference log-ratios of the chosen and rejected responses,
    with h = beta * (chosen - rejected). (B,), (B,) -> scalar loss and detached stats.

    sigmoid (Rafailov et al. 2023, eq. 7): -log sigma(h); with ``label_smoothing`` e > 0 it is conservative DPO
    (cDPO, Mitchell 2023), for labels flipped with probability e: -(1 - e) log sigma(h) - e log sigma(-h).
    ipo (Azar et al. 2023, eq. 17): (chosen - rejected - 1 / (2 beta))^2. IPO's log-ratios are meant per token:
    pass length-normalized ones (means over response tokens, not sums), as :mod:`rlhf_core.dpo` does for it.
    Stats: the implicit rewards beta * log-ratio, their margin, and how often the chosen one is higher."""
    margin = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    with torch.no_grad():
        stats = {
            "rewards_chosen": beta * chosen_logratios.mean(),
            "rewards_rejected": beta * rejected_logratios.mean(),
            "reward_margin": beta * margin.mean(),
            "reward_accuracy": (margin > 0).float().mean(),
        }
    return losses.mean(), stats


def aggregate_credit(member_credit: Tensor, rewards: Tensor, mask: Tensor) -> Tensor:
    """An ensemble's reward credited token by token: the members' mean credit, plus what the aggregate ``rewards``
    take off that mean (``min``, ``mean_minus_std``) on each response's last token; rows sum to ``rewards``.
    member_credit: (K, B, T), rewards: (B,), mask: (B, T) -> (B, T)."""
    mean = member_credit.mean(0)
    rows, last = torch.arange(len(rewards), device=rewards.device), (mask.sum(1).long() - 1).clamp(min=0)
    return mean.index_put((rows, last), rewards - mean.sum(1), accumulate=True)


def aggregate_rewards(member_scores: Tensor, how: str = "mean", uncertainty_coef: float = 1.0) -> Tensor:
    """One reward from an ensemble's scores (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
    Overoptimization"): ``mean``; ``min``, the worst case; or ``mean_minus_std``, the mean less ``uncertainty_coef``
    times the members' (population) standard deviation, penalizing what the members disagree on. (K, B) -> (B,)."""
    if how == "mean":
        return member_scores.mean(0)
    if how == "min":
        return member_scores.min(0).values
    if how == "mean_minus_std":
        return member_scores.mean(0) - uncertainty_coef * member_scores.std(0, correction=0)
    raise ValueError(f"reward aggregate must be 'mean', 'min' or 'mean_minus_std', got {how!r}")
