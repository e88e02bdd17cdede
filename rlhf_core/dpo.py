"""Direct preference optimization (Rafailov et al. 2023): the policy fit to preference pairs directly, its implicit
reward beta * log(policy / reference), with no reward model and no RL loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rlhf_core.checkpoint import Checkpointer, check_finite, checkpoint_due
from rlhf_core.config import DPOConfig
from rlhf_core.engine import Engine, rank_rows
from rlhf_core.losses import dpo_loss, masked_sum, selective_log_softmax
from rlhf_core.modeling import EncodedPairs, batch_schedule, encode_prompt_responses, position_ids_from_mask
from rlhf_core.preferences import PreferencePair
from rlhf_core.types import MetricsCallback


def sequence_logprobs(model: nn.Module, batch: EncodedPairs, *, mean: bool = False) -> Tensor:
    """Log-probability of each row's response (EOS included) under ``model``: the sum over its tokens, or with
    ``mean`` the per-token mean. -> (B,)."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask),
        use_cache=False,
    ).logits[:, :-1]
    mask = batch.response_mask[:, 1:]
    total = masked_sum(selective_log_softmax(logits.float(), batch.input_ids[:, 1:]), mask, dim=1)
    return total / mask.sum(1).clamp(min=1) if mean else total


@dataclass
class PairBatch:
    chosen: EncodedPairs
    rejected: EncodedPairs


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], max_length: int, device: torch.device
) -> PairBatch:
    prompts = [p.prompt for p in pairs]
    return PairBatch(
        encode_prompt_responses(tokenizer, prompts, [p.chosen for p in pairs], max_length, device=device),
        encode_prompt_responses(tokenizer, prompts, [p.rejected for p in pairs], max_length, device=device),
    )


@torch.no_grad()
def reference_logprobs(
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[PreferencePair],
    *,
    config: DPOConfig,
    device: torch.device,
) -> Tensor:
    """The frozen reference's log-probs of every pair's chosen and rejected response, computed once (they do not
    change while the policy trains). ``device``: the policy's (a LoRA reference, the policy with its adapters off,
    holds no weights of its own). -> (N, 2): chosen, rejected."""
    mean = config.loss_type == "ipo"
    rows = []
    for i in range(0, len(pairs), config.batch_size):
        batch = encode_pairs(tokenizer, pairs[i : i + config.batch_size], config.max_length, device)
        chosen, rejected = (sequence_logprobs(reference, side, mean=mean) for side in (batch.chosen, batch.rejected))
        rows.append(torch.stack([chosen, rejected], 1))
    return torch.cat(rows)


@dataclass
class DPOResult:
    steps: int
    history: list[dict[str, float]]


def train_dpo(
    engine: Engine,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[PreferencePair],
    *,
    config: DPOConfig,
    seed: int,
    on_metrics: MetricsCallback | None = None,
    checkpointer: Checkpointer | None = None,
) -> DPOResult:
    """Fit ``engine.module`` to the pairs with the DPO (or IPO) loss against the frozen ``reference``. Logged every
    ``config.log_every`` steps: the loss, implicit-reward accuracy and margin, and the log-ratio of the chosen
    response (KL-like: how far the policy moved from the reference on preferred text). Under data parallelism each
    rank trains on its share of every batch, its loss and statistics weighted by that share, so that they sum to
    the batch's."""
    policy = engine.module
    schedule = batch_schedule(len(pairs), config.batch_size, config.epochs, seed)
    start, history, window = 0, [], []
    if checkpointer is not None and (state := checkpointer.restore()):
        engine.load_full_state_dict(state["weights"]["model"])
        engine.load_state_dict(state["engine"])
        start, history = state["step"], state["history"]
    mean = config.loss_type == "ipo"
    ref_logps = reference_logprobs(reference, tokenizer, pairs, config=config, device=policy.device)
    policy.train()
    for step in range(start + 1, len(schedule) + 1):
        index = schedule[step - 1].tolist()
        mine, weight = rank_rows(index, engine)
        batch = encode_pairs(tokenizer, [pairs[i] for i in mine], config.max_length, policy.device)
        chosen_logps = sequence_logprobs(policy, batch.chosen, mean=mean)
        rejected_logps = sequence_logprobs(policy, batch.rejected, mean=mean)
        chosen, rejected = chosen_logps - ref_logps[mine, 0], rejected_logps - ref_logps[mine, 1]
        loss, stats = dpo_loss(
            chosen, rejected, beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing
        )
        check_finite("dpo", step, loss=loss.item())
        share = weight * len(mine) / len(index)  # the ranks' shares sum to the whole batch's means
        engine.backward(loss * share)
        update = engine.step()
        means = {"loss": loss, **stats, "logratio_chosen": chosen.mean(), "logratio_rejected": rejected.mean()}
        means |= {"logps_chosen": chosen_logps.mean(), "logps_rejected": rejected_logps.mean()}
        batch_means = engine.sum_across_ranks(torch.stack([v.detach() for v in means.values()]) * share)
        window.append(dict(zip(means, batch_means.tolist(), strict=True)))
        if step % config.log_every == 0 or step == len(schedule):
            metrics = {k: sum(row[k] for row in window) / len(window) for k in window[0]} | update
            history.append(metrics)
            window = []
            if on_metrics:
                on_metrics(metrics, step)
        if checkpoint_due(checkpointer, step, len(schedule)):
            checkpointer.save(
                step, {"model": engine.full_state_dict()}, {"engine": engine.state_dict(), "history": history}
            )
    policy.eval()
    return DPOResult(len(schedule), history)
