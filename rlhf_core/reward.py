"""Reward model: a causal LM backbone with a scalar head, trained with the Bradley-Terry loss on
labeler preferences, early-stopped on validation accuracy, and normalized on policy samples."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.checkpoint import Checkpointer, check_finite, checkpoint_due
from rlhf_core.config import AttnImplementation, RewardConfig
from rlhf_core.engine import Engine, rank_rows
from rlhf_core.losses import aggregate_rewards, bradley_terry_loss
from rlhf_core.modeling import (
    EncodedPairs,
    Samples,
    batch_rewards,
    batch_schedule,
    encode_prompt_responses,
    keeps_packed_sequences_apart,
    load_scorer,
    load_tokenizer,
    pack_prompt_responses,
    reward_credit,
    reward_inputs,
    to_device,
)
from rlhf_core.preferences import PreferencePair
from rlhf_core.types import MetricsCallback


def strength_margins(config: RewardConfig, pairs: list[PreferencePair]) -> Tensor | None:
    """Each pair's Bradley-Terry margin from its strength (``config.strength_margins``; 0 without one), or None
    without margins. -> (B,)."""
    if config.strength_margins is None:
        return None
    return torch.tensor([config.strength_margins[p.strength - 1] if p.strength else 0.0 for p in pairs])


def bootstrap_resample(pairs: list[PreferencePair], seed: int) -> list[PreferencePair]:
    """As many pairs as given, drawn from them with replacement."""
    rng = random.Random(seed)
    return [rng.choice(pairs) for _ in pairs]


def validation_share(pair: PreferencePair) -> float:
    """Where a comparison falls in [0, 1), from its prompt and its two responses (whichever won): the same for every
    label of it and in every iteration."""
    first, second = sorted((pair.chosen, pair.rejected))
    digest = hashlib.sha256("\x00".join((pair.prompt, first, second)).encode()).hexdigest()
    return int(digest[:13], 16) / 16**13


def split_pairs(pairs: list[PreferencePair], val_fraction: float) -> tuple[list, list]:
    """A train/validation split by comparison (:func:`validation_share` below ``val_fraction``: validation): every
    label of one comparison lands on the same side, and a comparison stays on its side as pairs accumulate over
    iterations, so a reward model continued from the last one never validates on pairs it trained on. At least one
    pair on each side (the comparison nearest the boundary moves)."""
    order = sorted(pairs, key=validation_share)
    n_val = sum(validation_share(p) < val_fraction for p in order)
    n_val = min(max(1, n_val), len(pairs) - 1)
    return order[n_val:], order[:n_val]


def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    *,
    max_length: int,
    batch_size: int = 256,
) -> Tensor:
    """Normalized reward of each (prompt, response), EOS appended as in rollouts, read packed where the model keeps
    packed sequences apart. -> (N,)."""
    scores, packed = [], keeps_packed_sequences_apart(model)
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = encoded(
                tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size], max_length, packed=packed
            )
            scores.append(batch_rewards(model, to_device(batch, model.device)))
    return torch.cat(scores).cpu() if scores else torch.zeros(0)


def encoded(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int, *, packed: bool
) -> EncodedPairs:
    """Prompts and responses as a reward model reads them, one to a row or, ``packed``, several to a row of
    ``max_length`` (:func:`rlhf_core.modeling.pack_prompt_responses`, for a model that keeps them apart)."""
    if packed:
        return pack_prompt_responses(tokenizer, prompts, responses, max_length, row_length=max_length)
    return encode_prompt_responses(tokenizer, prompts, responses, max_length)


def pair_rewards(
    model, tokenizer, pairs: list[PreferencePair], max_length: int, *, packed: bool = False
) -> tuple[Tensor, Tensor]:
    """Rewards of chosen and rejected responses, in one forward pass; ``packed`` as in :func:`encoded`.
    -> (B,), (B,)."""
    prompts, responses = [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    rewards = batch_rewards(
        model, to_device(encoded(tokenizer, prompts, responses, max_length, packed=packed), model.device)
    )
    return rewards[: len(pairs)], rewards[len(pairs) :]


def preference_accuracy(
    model, tokenizer, pairs: list[PreferencePair], max_length: int, *, packed: bool = False
) -> dict[str, float]:
    """Share of pairs where the reward model agrees with the label, and with the gold ordering
    (pairs with equal gold reward left out); ``packed`` as in :func:`pair_rewards`."""
    with torch.no_grad():
        chosen, rejected = [], []
        for i in range(0, len(pairs), 256):
            c, r = pair_rewards(model, tokenizer, pairs[i : i + 256], max_length, packed=packed)
            chosen.append(c)
            rejected.append(r)
    margin = (torch.cat(chosen) - torch.cat(rejected)).cpu()
    gold_margin = torch.tensor([p.chosen_gold - p.rejected_gold for p in pairs])
    decided = gold_margin != 0
    gold_agree = ((margin > 0) == (gold_margin > 0))[decided].float()
    accuracy = {
        "accuracy": (margin > 0).float().mean().item(),
        "gold_accuracy": gold_agree.mean().item() if decided.any() else float("nan"),
    }
    for level in sorted({p.strength for p in pairs if p.strength}):  # Llama 2 reports accuracy by strength
        at_level = torch.tensor([p.strength == level for p in pairs])
        accuracy[f"accuracy_strength_{level}"] = (margin[at_level] > 0).float().mean().item()
    return accuracy


@dataclass
class RewardResult:
    steps: int
    first_loss: float
    final_loss: float
    val_accuracy: float
    val_gold_accuracy: float
    stopped_early: bool
    val_by_strength: dict[str, float]  # "val_accuracy_strength_<k>": accuracy on pairs labeled with strength k


def train_reward_model(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    train_pairs: list[PreferencePair],
    val_pairs: list[PreferencePair],
    *,
    config: RewardConfig,
    seed: int,
    epoch_size: int | None = None,
    on_metrics: MetricsCallback | None = None,
    checkpointer: Checkpointer | None = None,
) -> RewardResult:
    """Minimize the Bradley-Terry loss over ``config.max_epochs`` passes (each over ``epoch_size`` of the pairs,
    drawn afresh, where given); keep the weights with the best validation accuracy. With a checkpointer it saves
    every ``checkpointer.every`` steps and continues from its latest checkpoint. Under data parallelism each rank
    trains on its share of every batch, and every rank scores the whole validation set, so that all of them take the
    same early-stopping decision."""
    model = engine.module
    schedule = batch_schedule(len(train_pairs), config.batch_size, config.max_epochs, seed, epoch_size=epoch_size)
    packed = config.packing and keeps_packed_sequences_apart(model)
    eval_every = max(1, len(schedule) // config.max_epochs // config.evals_per_epoch)
    best, best_weights, checks_since_best, start, losses = None, None, 0, 0, []
    if checkpointer is not None and (state := checkpointer.restore()):
        engine.load_full_state_dict(state["weights"]["model"])
        engine.load_state_dict(state["engine"])
        start, losses, best, checks_since_best = state["step"], state["losses"], state["best"], state["checks"]
        best_weights = state["weights"].get("best")
    step = start
    for step in range(start + 1, len(schedule) + 1):
        model.train()
        batch = [train_pairs[i] for i in schedule[step - 1].tolist()]
        mine, weight = rank_rows(batch, engine)
        chosen, rejected = pair_rewards(model, tokenizer, mine, config.max_length, packed=packed)
        margin = strength_margins(config, mine)
        loss = bradley_terry_loss(chosen, rejected, None if margin is None else margin.to(chosen.device))
        share = loss * (weight * len(mine) / len(batch))  # the ranks' shares sum to the whole batch's mean loss
        check_finite("reward", step, loss=share.item())
        engine.backward(share)
        engine.step()
        losses.append(engine.sum_across_ranks(share).item())
        if step % eval_every == 0:
            model.eval()
            val = preference_accuracy(model, tokenizer, val_pairs, config.max_length, packed=packed)
            if on_metrics:
                recent = losses[-eval_every:]
                on_metrics({"loss": sum(recent) / len(recent), **{f"val_{k}": v for k, v in val.items()}}, step)
            if best is None or val["accuracy"] > best["accuracy"]:
                best, best_weights, checks_since_best = val, engine.full_state_dict(), 0
            else:
                checks_since_best += 1
            if checks_since_best >= config.patience:
                break
        if checkpoint_due(checkpointer, step, len(schedule)):
            weights = {"model": engine.full_state_dict()} | ({"best": best_weights} if best_weights is not None else {})
            state = {"engine": engine.state_dict(), "losses": losses, "best": best, "checks": checks_since_best}
            checkpointer.save(step, weights, state)
    if best_weights is not None:
        engine.load_full_state_dict(best_weights)
    else:
        best = preference_accuracy(model.eval(), tokenizer, val_pairs, config.max_length)
    model.eval()
    tail = losses[-eval_every:]
    return RewardResult(
        step,
        losses[0],
        sum(tail) / len(tail),
        best["accuracy"],
        best["gold_accuracy"],
        stopped_early=checks_since_best >= config.patience,
        val_by_strength={f"val_{k}": v for k, v in best.items() if k.startswith("accuracy_strength_")},
    )


def normalize_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    *,
    max_length: int,
) -> dict[str, float]:
    """Set the output gain and bias (stored in the model config) so that these responses, samples of
    the current policy, score mean 0 and standard deviation 1; store ``max_length`` beside them, the
    truncation :class:`RewardFunction` re-tokenizes with."""
    model.config.reward_gain, model.config.reward_bias = 1.0, 0.0
    model.config.reward_max_length = max_length
    raw = score_texts(model, tokenizer, prompts, responses, max_length=max_length)
    gain = 1.0 / max(raw.std().item(), 1e-6)
    model.config.reward_gain, model.config.reward_bias = gain, -raw.mean().item() * gain
    return {"reward_gain": model.config.reward_gain, "reward_bias": model.config.reward_bias}


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map text to the same ids, so one's token ids can be fed to the other's model."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


ENSEMBLE_DIR = "ensemble"  # members 2..k of a reward ensemble, as ENSEMBLE_DIR/member-<i>; the first at the root


@dataclass
class RewardFunction:
    """The reward model as PPO and evaluation call it on policy samples. With ``tokenizer`` None it shares the
    policy's vocabulary and reads the sampled token ids; otherwise it is a separate model with its own
    tokenizer, and the decoded prompt and response are re-tokenized for it. Either way it scores what it was
    trained on: the response cut to the model's ``reward_max_length`` and ending in one EOS.
    ``members``: the rest of an ensemble, scored alike and aggregated as the first model's config says."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None = None
    members: list[PreTrainedModel] = field(default_factory=list)

    @torch.no_grad()
    def member_scores(self, samples: Samples) -> Tensor:
        """Normalized reward of each sample under each ensemble member. -> (K, B) on the samples' device."""
        return torch.stack([self.score(model, samples) for model in [self.model, *self.members]])

    @property
    def credits_tokens(self) -> bool:
        """Whether every member sums per-token scores and reads the policy's own tokens, so that a reward can be
        credited token by token (:func:`rlhf_core.modeling.reward_credit`)."""
        summed = all(getattr(m.config, "reward_pooling", "last") == "sum" for m in [self.model, *self.members])
        return summed and self.tokenizer is None

    @torch.no_grad()
    def member_credit(self, samples: Samples) -> Tensor:
        """Each member's normalized reward credited to the response tokens that earned it; summed over the
        response, each member's score (only where :attr:`credits_tokens`). -> (K, B, R)."""
        return torch.stack([reward_credit(model, samples) for model in [self.model, *self.members]])

    def score(self, model: PreTrainedModel, samples: Samples) -> Tensor:
        if self.tokenizer is None:
            return batch_rewards(model, reward_inputs(samples, getattr(model.config, "reward_max_length", None)))
        max_length = getattr(model.config, "reward_max_length", None) or self.tokenizer.model_max_length
        scores = score_texts(model, self.tokenizer, samples.prompts, samples.texts, max_length=max_length)
        return scores.to(samples.query_responses.device)

    def aggregate(self, member_scores: Tensor) -> Tensor:
        """The ensemble's reward from its members' scores, as ``reward.aggregate`` said when it was trained."""
        config = self.model.config
        how = getattr(config, "reward_aggregate", "mean")
        return aggregate_rewards(member_scores, how, getattr(config, "reward_uncertainty_coef", 1.0))

    def __call__(self, samples: Samples) -> Tensor:
        """Normalized (and, for an ensemble, aggregated) reward of each sample. -> (B,) on the samples' device."""
        return self.aggregate(self.member_scores(samples))


def load_reward_function(
    reward_dir: str | Path,
    policy_tokenizer: PreTrainedTokenizerBase,
    trust_remote_code: bool = False,
    *,
    attn_implementation: AttnImplementation = "sdpa",
) -> RewardFunction:
    """A frozen reward model (with the rest of its ensemble, if it has one) and its tokenizer from ``reward_dir``,
    re-tokenizing only when that tokenizer is not the policy's; the models load with ``attn_implementation``."""
    model = load_scorer(reward_dir, trust_remote_code, attn_implementation=attn_implementation)
    model = model.eval().requires_grad_(False)
    members = [
        load_scorer(member, trust_remote_code, attn_implementation=attn_implementation).eval().requires_grad_(False)
        for member in sorted((Path(reward_dir) / ENSEMBLE_DIR).glob("member-*"), key=lambda p: int(p.name[7:]))
    ]
    tokenizer = load_tokenizer(reward_dir, trust_remote_code)
    return RewardFunction(model, None if same_vocabulary(tokenizer, policy_tokenizer) else tokenizer, members)
