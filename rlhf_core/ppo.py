"""PPO with a KL penalty to a frozen reference, following "The N+ Implementation Details of RLHF with
PPO" (Huang et al. 2024) where it applies.

The critic is a separate model initialized from the reward model, not a head on the policy: its job is
to predict reward-model returns, which the reward model's features already encode (Ouyang et al. 2022
initialize it the same way), the value loss cannot disturb the policy's language-model features, and
the policy stays a plain causal LM that saves and loads as one. A reward model with a tokenizer of its own
cannot read the policy's tokens, so there the critic starts from the SFT backbone with a fresh head. Started
from the reward model, it has the normalization (gain and bias) folded into its head, so that its first values are
in the units of the returns. With an optimizer of its own, the value loss carries no weight (``vf_coef``, where
policy and critic share one optimizer): under Adam a constant factor would change only its gradient clipping.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from rlhf_core.alarms import Alarm, check_alarms
from rlhf_core.checkpoint import Checkpointer, DivergenceError, check_finite, checkpoint_due, rng_state, set_rng_state
from rlhf_core.config import PPOConfig
from rlhf_core.engine import Engine, TorchEngine, module_device, rank_rows
from rlhf_core.kl_control import AdaptiveKLController, FixedKLController, KLController
from rlhf_core.losses import (
    aggregate_credit,
    compute_gae,
    explained_variance,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    masked_sum,
    masked_whiten,
    policy_loss,
    value_loss,
)
from rlhf_core.modeling import (
    PackedRollout,
    Samples,
    concat_samples,
    inference_mode_for,
    keeps_packed_sequences_apart,
    length_grouped_batches,
    pack_rollout_rows,
    response_logprobs,
    response_values,
    sample_responses,
    to_device,
    trim_padding,
)
from rlhf_core.reward import RewardFunction
from rlhf_core.threads import side_by_side
from rlhf_core.types import GoldScorer, MetricsCallback

AlarmCallback = Callable[[Alarm], None]


def make_kl_controller(config: PPOConfig) -> KLController:
    if config.adaptive_kl:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)


@dataclass
class PPOModels:
    """The four models of PPO: the two it trains, behind their engines, and the two it only runs."""

    policy: Engine
    critic: Engine
    reference: nn.Module  # the frozen SFT model the KL penalty anchors to
    reward: RewardFunction


def side_by_side_models(models: PPOModels, config: PPOConfig) -> bool:
    """Whether policy and critic train in threads side by side, and reference and critic score a rollout so: with
    ``config.parallel_critic``, on a CPU, under plain torch (a DeepSpeed engine communicates even as one process)."""
    on_cpu = module_device(models.policy.module).type == "cpu"
    plain = all(isinstance(engine, TorchEngine) for engine in (models.policy, models.critic))
    return config.parallel_critic and on_cpu and plain


@dataclass
class Rollout:
    """One batch of experience. Token tensors (B, R) over response positions; scores (B,)."""

    samples: Samples
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    entropy: Tensor
    scores: Tensor
    rm_scores: Tensor
    rm_disagreement: Tensor | None = None  # (B,): the ensemble members' standard deviation, for an ensemble
    credit: Tensor | None = None  # (B, R): rm_scores credited token by token (dense rewards), rows summing to them


@torch.no_grad()
def collect_rollout(
    models: PPOModels, tokenizer: PreTrainedTokenizerBase, prompts: list[str], config: PPOConfig, *, pack: bool = False
) -> Rollout:
    """Sample responses, then score them with every model: reference log-probs, critic values, and the
    reward model's score (less the missing-EOS penalty). The policy's log-probs are those it sampled with:
    the same distribution a recompute would give, up to float rounding, for one forward less. With
    ``config.dense_rewards`` and a summed reward model, the score is also credited token by token. With ``pack``, the
    reference and the critic read the samples packed; they read them side by side where policy and critic train so
    (:func:`side_by_side_models`). As one of several ranks, each samples and scores its share of
    ``prompts``, and every rank gets the whole batch back."""
    policy, critic = models.policy.module, models.critic.module
    ranks = models.policy.world_size
    samples = sample_responses(
        policy,
        tokenizer,
        rank_rows(prompts, models.policy)[0],
        config.max_new_tokens,
        temperature=config.temperature,
        with_logprobs=True,
        synced_gpus=ranks > 1,
    )
    rows = (samples.query_responses, samples.attention_mask, samples.context_length)
    packed = pack_rollout_rows(*rows) if pack else None
    dense = config.dense_rewards and models.reward.credits_tokens
    scorers = [models.reference, critic, models.reward.model, *models.reward.members]
    with inference_mode_for(*scorers):
        with side_by_side(side_by_side_models(models, config)) as run:
            (ref_logprobs, _), values = run(
                partial(response_logprobs, models.reference, *rows, temperature=config.temperature, packed=packed),
                partial(response_values, critic, *rows, packed=packed),
            )
        member_credit = models.reward.member_credit(samples) if dense else None  # on all the intra-op threads again
        member_scores = member_credit.sum(-1) if dense else models.reward.member_scores(samples)
    rm_scores = models.reward.aggregate(member_scores)
    scores = rm_scores - config.missing_eos_penalty * (~samples.has_eos).float()
    disagreement = member_scores.std(0, correction=0) if len(member_scores) > 1 else None
    credit = aggregate_credit(member_credit, rm_scores, samples.response_mask) if dense else None
    share = Rollout(
        samples, samples.logprobs, ref_logprobs, values, samples.entropy, scores, rm_scores, disagreement, credit
    )
    if ranks == 1:
        return share
    shares = models.policy.gather_across_ranks(to_device(share, "cpu"))
    return to_device(concat_rollouts(shares), scores.device)


def concat_rollouts(shares: list[Rollout]) -> Rollout:
    """One rollout from the ranks' shares, in rank order, response-aligned tensors padded to the longest."""
    samples = concat_samples([share.samples for share in shares])
    width = samples.responses.shape[1]

    def responses_of(name: str) -> Tensor:
        return torch.cat([F.pad(t := getattr(s, name), (0, width - t.shape[1])) for s in shares])

    disagreement = None if shares[0].rm_disagreement is None else torch.cat([s.rm_disagreement for s in shares])
    credit = None if shares[0].credit is None else responses_of("credit")
    return Rollout(
        samples,
        samples.logprobs,
        responses_of("ref_logprobs"),
        responses_of("values"),
        samples.entropy,
        torch.cat([s.scores for s in shares]),
        torch.cat([s.rm_scores for s in shares]),
        disagreement,
        credit,
    )


def advantages_and_returns(
    rollout: Rollout, config: PPOConfig, *, kl_coef: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token KL penalty, KL-shaped rewards, GAE advantages (whitened over the batch where configured) and
    returns. -> kl, rewards, advantages, returns: (B, R) each."""
    response_mask = rollout.samples.response_mask
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, config.kl_estimator) * response_mask
    if rollout.credit is None:
        rewards = kl_shaped_rewards(rollout.scores, kl, response_mask, kl_coef)
    else:  # the reward model's score where each token earned it; the missing-EOS penalty on the last token
        penalty = rollout.scores - rollout.rm_scores
        rewards = kl_shaped_rewards(penalty, kl, response_mask, kl_coef, token_scores=rollout.credit)
    advantages, returns = compute_gae(rewards, rollout.values, response_mask, gamma=config.gamma, lam=config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, response_mask)
    return kl, rewards, advantages, returns


@dataclass
class Minibatch:
    """Rows of a rollout without the columns that are padding in all of them, and where asked for the same rows
    packed for the forwards. query_responses, attention_mask: (b, P' + R'); the response-aligned tensors: (b, R')."""

    query_responses: Tensor
    attention_mask: Tensor
    context_length: int
    response_mask: Tensor
    logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    packed: PackedRollout | None = None


def rollout_minibatch(
    rollout: Rollout, index: Tensor, *, advantages: Tensor, returns: Tensor, pack: bool = False
) -> Minibatch:
    """The rows ``index`` of a rollout and its advantages and returns, trimmed of padding (an exact saving: padding
    is masked out of every loss, and causal attention never lets it change a real position); with ``pack``, also
    packed, so that the forwards compute no padding at all."""
    samples = rollout.samples
    qr, attention_mask, ctx = trim_padding(
        samples.query_responses[index], samples.attention_mask[index], samples.context_length
    )
    width = qr.shape[1] - ctx
    response_mask, logprobs, values, advantages, returns = (
        t[index, :width] for t in (samples.response_mask, rollout.logprobs, rollout.values, advantages, returns)
    )
    packed = pack_rollout_rows(qr, attention_mask, ctx) if pack else None
    return Minibatch(qr, attention_mask, ctx, response_mask, logprobs, values, advantages, returns, packed)


def policy_minibatch_step(policy: Engine, mb: Minibatch, share: Tensor, config: PPOConfig) -> dict[str, Tensor]:
    """One clipped policy-gradient step on a minibatch, its loss weighted by ``share``: the loss and its stats."""
    qr, attention_mask, ctx = mb.query_responses, mb.attention_mask, mb.context_length
    logprobs, _ = response_logprobs(
        policy.module, qr, attention_mask, ctx, temperature=config.temperature, packed=mb.packed
    )
    pg_loss, pg_stats = policy_loss(
        logprobs, mb.logprobs, mb.advantages, mb.response_mask, clip_range=config.clip_range
    )
    policy.backward(pg_loss * share)
    policy.step()
    return {"policy_loss": pg_loss, **pg_stats}


def critic_minibatch_step(critic: Engine, mb: Minibatch, share: Tensor, config: PPOConfig) -> dict[str, Tensor]:
    """One clipped value-regression step on a minibatch, its loss weighted by ``share``: the loss and its stats."""
    values = response_values(critic.module, mb.query_responses, mb.attention_mask, mb.context_length, packed=mb.packed)
    vf_loss, vf_stats = value_loss(
        values, mb.values, mb.returns, mb.response_mask, clip_range_value=config.clip_range_value
    )
    critic.backward(vf_loss * share)
    critic.step()
    return {"value_loss": vf_loss, **vf_stats}


def ppo_update(
    models: PPOModels,
    rollout: Rollout,
    *,
    advantages: Tensor,
    returns: Tensor,
    config: PPOConfig,
    generator: torch.Generator,
    pack: bool = False,
) -> dict[str, float]:
    """Several epochs of clipped policy and value updates over minibatches of one rollout batch (each packed for the
    forwards with ``pack``), stopped early when the approx-KL to the rollout policy passes ``target_kl``. Policy and
    critic are independent given a minibatch, so their steps may run side by side (:func:`side_by_side_models`). As
    one of several ranks (each holding the whole rollout and drawing the same minibatches), each trains on its share
    of every minibatch, its losses weighted by its share of the minibatch's response tokens; statistics and the stop
    are the minibatch's."""
    lengths = rollout.samples.response_mask.sum(1)
    models.policy.module.train()
    models.critic.module.train()
    stats: dict[str, list[float]] = {}
    stopped = False
    with side_by_side(side_by_side_models(models, config)) as run:
        for _ in range(config.epochs):
            if config.group_by_length:
                minibatches = length_grouped_batches(lengths, config.minibatch_size, generator)
            else:
                minibatches = torch.randperm(len(lengths), generator=generator).split(config.minibatch_size)
            for index in minibatches:
                mine, weight = rank_rows(index.tolist(), models.policy)
                mb = rollout_minibatch(rollout, torch.tensor(mine), advantages=advantages, returns=returns, pack=pack)
                share = weight * mb.response_mask.sum() / rollout.samples.response_mask[index].sum()
                policy_stats, critic_stats = run(
                    partial(policy_minibatch_step, models.policy, mb, share, config),
                    partial(critic_minibatch_step, models.critic, mb, share, config),
                )
                for key, value in (policy_stats | critic_stats).items():
                    stats.setdefault(key, []).append(models.policy.sum_across_ranks(value.detach() * share).item())
                if config.target_kl is not None and stats["approx_kl"][-1] > config.target_kl:
                    stopped = True
                    break
            if stopped:
                break
    models.policy.module.eval()
    models.critic.module.eval()
    return {
        **{key: sum(v) / len(v) for key, v in stats.items()},
        "early_stopped": float(stopped),
        "minibatch_updates": float(len(stats["policy_loss"])),
    }


def rollout_metrics(
    rollout: Rollout, *, kl: Tensor, rewards: Tensor, returns: Tensor, gold: list[float] | None, kl_coef: float
) -> dict[str, float]:
    """What to watch during PPO: KL, reward, entropy and length (Huang et al. 2024, detail 12)."""
    response_mask = rollout.samples.response_mask
    lengths = response_mask.sum(1).float()
    metrics = {
        "kl": masked_sum(kl, response_mask, dim=1).mean().item(),
        "reward": rollout.rm_scores.mean().item(),
        "score": rollout.scores.mean().item(),
        "non_score_reward": masked_sum(rewards, response_mask, dim=1).mean().item() - rollout.scores.mean().item(),
        "entropy": masked_mean(rollout.entropy, response_mask).item(),
        "response_length": lengths.mean().item(),
        "response_length_p95": lengths.quantile(0.95).item(),
        "eos_rate": rollout.samples.has_eos.float().mean().item(),
        "explained_variance": explained_variance(rollout.values, returns, response_mask).item(),
        "kl_coef": kl_coef,
    }
    if gold is not None:
        metrics["gold_reward"] = sum(gold) / len(gold)
    if rollout.rm_disagreement is not None:
        metrics["rm_disagreement"] = rollout.rm_disagreement.mean().item()
    return metrics


@dataclass
class PPOResult:
    steps: int
    history: list[dict[str, float]]
    kl_coef: float
    alarms: list[Alarm]


def check_divergence(metrics: dict[str, float], config: PPOConfig, step: int) -> None:
    """Stop on a NaN or infinite loss, or on a KL to the reference past ``config.max_kl``."""
    check_finite("ppo", step, policy_loss=metrics["policy_loss"], value_loss=metrics["value_loss"], kl=metrics["kl"])
    if config.max_kl is not None and metrics["kl"] > config.max_kl:
        raise DivergenceError(
            f"ppo: KL to the reference is {metrics['kl']:.1f} nats at step {step}, past ppo.max_kl={config.max_kl}; "
            "lower ppo.lr or raise ppo.kl_coef"
        )


@dataclass
class LoopState:
    """What PPO carries from one step to the next, all of it in its checkpoints."""

    step: int
    order: list[str]  # the prompts left in the current pass over them
    history: list[dict[str, float]]
    kl_controller: KLController
    rng: random.Random
    generator: torch.Generator
    alarms: list[Alarm] = field(default_factory=list)  # each alarm once, at the step it first fired

    def next_prompts(self, prompts: list[str], n: int) -> list[str]:
        """The next ``n`` prompts, passing over all of them in a new random order whenever a pass runs out."""
        while len(self.order) < n:
            self.order += self.rng.sample(prompts, len(prompts))
        batch, self.order = self.order[:n], self.order[n:]
        return batch

    def save(self, checkpointer: Checkpointer, models: PPOModels) -> None:
        weights = {"policy": models.policy.full_state_dict(), "critic": models.critic.full_state_dict()}
        state = {
            "policy_engine": models.policy.state_dict(),
            "critic_engine": models.critic.state_dict(),
            "rng": rng_state(self.generator, self.rng),
            "order": self.order,
            "history": self.history,
            "kl_coef": self.kl_controller.value,
            "alarms": [alarm.to_dict() for alarm in self.alarms],
        }
        checkpointer.save(self.step, weights, state)

    def restore(self, checkpointer: Checkpointer, models: PPOModels) -> None:
        """Continue from the checkpointer's latest checkpoint, if it has one."""
        if not (state := checkpointer.restore()):
            return
        models.policy.load_full_state_dict(state["weights"]["policy"])
        models.critic.load_full_state_dict(state["weights"]["critic"])
        models.policy.load_state_dict(state["policy_engine"])
        models.critic.load_state_dict(state["critic_engine"])
        set_rng_state(state["rng"], self.generator, self.rng)
        self.step, self.order, self.history = state["step"], state["order"], state["history"]
        self.kl_controller.value = state["kl_coef"]
        self.alarms = [Alarm(**alarm) for alarm in state.get("alarms", [])]

    def raise_alarms(self, config: PPOConfig, on_alarm: AlarmCallback | None) -> None:
        """Record the alarms the history raises for the first time; stop on one with ``config.stop_on_alarm``."""
        fired = {alarm.name for alarm in self.alarms}
        for alarm in check_alarms(self.history, config.alarms):
            if alarm.name in fired:
                continue
            self.alarms.append(alarm)
            if on_alarm:
                on_alarm(alarm)
            if config.stop_on_alarm:
                raise DivergenceError(
                    f"ppo: alarm {alarm.name} at step {alarm.step}: {alarm.message} (ppo.stop_on_alarm)"
                )


def train_ppo(
    models: PPOModels,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: PPOConfig,
    *,
    seed: int,
    gold_fn: GoldScorer | None = None,
    on_metrics: MetricsCallback | None = None,
    checkpointer: Checkpointer | None = None,
    on_alarm: AlarmCallback | None = None,
) -> PPOResult:
    """Alternate rollouts and PPO updates for ``config.steps`` steps, watching the training-health alarms (each
    reported once to ``on_alarm``). With a checkpointer it saves every ``checkpointer.every`` steps (weights,
    optimizers, RNGs, prompt order, KL controller, alarms) and continues from its latest checkpoint."""
    loop = LoopState(0, [], [], make_kl_controller(config), random.Random(seed), torch.Generator().manual_seed(seed))
    # the reference is the SFT model the policy started from: the policy's architecture
    pack = config.packing and all(keeps_packed_sequences_apart(e.module) for e in (models.policy, models.critic))
    torch.manual_seed(seed + models.policy.rank)  # the ranks sample their shares from streams of their own
    if checkpointer is not None:
        loop.restore(checkpointer, models)
    for step in range(loop.step + 1, config.steps + 1):
        # 1. rollout
        batch_prompts = loop.next_prompts(prompts, config.rollout_batch_size)
        models.policy.module.eval()
        models.critic.module.eval()
        rollout = collect_rollout(models, tokenizer, batch_prompts, config, pack=pack)
        # 2. rewards and advantages
        kl, rewards, advantages, returns = advantages_and_returns(rollout, config, kl_coef=loop.kl_controller.value)
        # 3. update
        update = ppo_update(
            models, rollout, advantages=advantages, returns=returns, config=config, generator=loop.generator, pack=pack
        )
        # 4. adapt the KL coefficient and report
        gold = gold_fn(rollout.samples.prompts, rollout.samples.texts) if gold_fn else None
        metrics = rollout_metrics(
            rollout, kl=kl, rewards=rewards, returns=returns, gold=gold, kl_coef=loop.kl_controller.value
        )
        metrics |= update
        check_divergence(metrics, config, step)
        loop.kl_controller.update(metrics["kl"], config.rollout_batch_size)
        loop.step = step
        loop.history.append(metrics)
        if on_metrics:
            on_metrics(metrics, step)
        loop.raise_alarms(config, on_alarm)
        if checkpoint_due(checkpointer, step, config.steps):
            loop.save(checkpointer, models)
    return PPOResult(config.steps, loop.history, loop.kl_controller.value, loop.alarms)
