"""The critic-free policy-gradient methods' math: advantages estimated from several samples per prompt instead of a
learned value function, and GRPO's loss.

Shapes: B = responses, k per prompt in consecutive groups (B = n_prompts * k), T = response length (padded). Every
``mask`` is 1 on real response tokens, and padding never changes a result.
"""

from __future__ import annotations

from torch import Tensor

from rlhf_core.losses import kl_penalty, masked_mean, masked_whiten


def _groups(scores: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B / k, k): each prompt's k scores in a row."""
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not make groups of {group_size} (at least 2 per prompt)")
    return scores.view(-1, group_size)


def group_advantages(scores: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath, section 4.1.2): each response's score less its
    group's mean, divided by the group's standard deviation (Bessel-corrected) plus ``eps``. ``scale=False`` leaves
    out the division, as Dr. GRPO does (Liu et al. 2025, "Understanding R1-Zero-Like Training"): dividing by a small
    spread inflates the advantages of prompts that are nearly always solved or failed. (B,) -> (B,)."""
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO's advantages (Ahmadian et al. 2024, "Back to Basics", eq. 5; Kool et al. 2019): each response's score
    less the mean of the other k - 1 scores of its prompt, an unbiased baseline. (B,) -> (B,)."""
    groups = _groups(scores, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def reinforce_pp_advantages(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    group_size: int | None = None,
) -> Tensor:
    """REINFORCE++'s token advantages (Hu 2025, arXiv:2501.03262, section 3): a per-token reward of -kl_coef times the
    k1 KL estimate to the reference, the response's score added at its last token, summed to a return from each token
    to the end (gamma = 1), then whitened over every token of the batch. ``group_size``: REINFORCE++-baseline, which
    first subtracts each prompt's mean score from its responses' scores. scores: (B,); the rest (B, T) -> (B, T)."""
    if group_size is not None:
        scores = scores - _groups(scores, group_size).mean(-1).repeat_interleave(group_size)
    rewards = -kl_coef * kl_penalty(logprobs, ref_logprobs) * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    rewards = rewards + last * scores[:, None]
    returns = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    return masked_whiten(returns, mask)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor,
    clip_range: float,
    kl_coef: float,
    length_normalized: bool = True,
) -> Tensor:
    """GRPO's objective as a loss (Shao et al. 2024, eq. 3): the clipped surrogate of PPO on each token with its
    response's advantage, less ``kl_coef`` times the k3 estimate of KL to the reference as a term of the loss (not of
    the reward). Averaged over each response's tokens, then over responses (``length_normalized``); or, as Dr. GRPO
    does, summed over tokens and divided by the longest response's length for every response, which no longer
    favours long wrong answers over short ones. logprobs, old_logprobs, ref_logprobs, mask: (B, T); advantages: (B,)
    or (B, T) -> scalar."""
    ratio = (logprobs - old_logprobs).exp()
    advantage = advantages[:, None] if advantages.dim() == 1 else advantages
    surrogate = -(advantage * ratio).minimum(advantage * ratio.clamp(1 - clip_range, 1 + clip_range))
    per_token = surrogate + kl_coef * kl_penalty(logprobs, ref_logprobs, "k3")
    if length_normalized:
        return masked_mean(per_token, mask, dim=1).mean()
    return (per_token * mask).sum() / (mask.shape[0] * mask.shape[1])
