"""Supervised fine-tuning: next-token loss on demonstrations, prompt and padding masked out."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.checkpoint import Checkpointer, check_finite, checkpoint_due
from rlhf_core.config import SFTConfig
from rlhf_core.engine import Engine, rank_rows
from rlhf_core.losses import masked_mean, masked_sum, selective_log_softmax
from rlhf_core.modeling import (
    EncodedPairs,
    batch_schedule,
    encode_prompt_responses,
    keeps_packed_sequences_apart,
    pack_prompt_responses,
    to_device,
)
from rlhf_core.types import MetricsCallback


def num_training_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a loop that makes ``epochs`` passes in batches of ``batch_size``."""
    return epochs * math.ceil(n_examples / batch_size)


def sft_loss(model: PreTrainedModel, batch: EncodedPairs, num_tokens: int | None = None) -> Tensor:
    """Next-token negative log-likelihood over response tokens (EOS included), summed and divided by
    ``num_tokens`` (default: this batch's response tokens, i.e. the mean). -> scalar."""
    logits = model(**batch.model_inputs(), use_cache=False).logits[:, :-1]
    nll = -selective_log_softmax(logits.float(), batch.input_ids[:, 1:])
    if num_tokens is None:
        return masked_mean(nll, batch.response_mask[:, 1:])
    return masked_sum(nll, batch.response_mask[:, 1:]) / num_tokens


@dataclass
class SFTResult:
    steps: int
    first_loss: float
    final_loss: float


def shard_batch(
    tokenizer: PreTrainedTokenizerBase,
    demonstrations: list[tuple[str, str]],
    index: Tensor,
    *,
    config: SFTConfig,
    engine: Engine,
    packed: bool,
) -> tuple[EncodedPairs, int, float]:
    """This rank's rows of a batch (``packed``: several to a row, :func:`pack_prompt_responses`), the response tokens
    of the whole batch (so the ranks' losses sum to the batch's mean) and a weight: 0 for a rank left without rows
    by a short last batch, which still takes part in the step with a copy of the first row."""
    rows = [demonstrations[i] for i in index.tolist()]
    mine, weight = rank_rows(rows, engine)
    prompts, responses = [p for p, _ in mine], [r for _, r in mine]
    device = engine.module.device
    if packed:
        batch = pack_prompt_responses(tokenizer, prompts, responses, config.max_length, row_length=config.max_length)
        batch = to_device(batch, device)
    else:
        batch = encode_prompt_responses(tokenizer, prompts, responses, config.max_length, device=device)
    if engine.world_size == 1:
        return batch, int(batch.response_mask[:, 1:].sum()), weight
    full = encode_prompt_responses(tokenizer, [p for p, _ in rows], [r for _, r in rows], config.max_length)
    return batch, int(full.response_mask[:, 1:].sum()), weight


def train_sft(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    demonstrations: list[tuple[str, str]],
    config: SFTConfig,
    *,
    seed: int,
    on_metrics: MetricsCallback | None = None,
    checkpointer: Checkpointer | None = None,
) -> SFTResult:
    """Fit ``engine.module`` to the demonstrations; returns the first and last logged losses. With a
    checkpointer it saves every ``checkpointer.every`` steps and continues from its latest checkpoint."""
    model = engine.module
    schedule = batch_schedule(len(demonstrations), config.batch_size, config.epochs, seed)
    packed = config.packing and keeps_packed_sequences_apart(model)
    steps_per_epoch = len(schedule) // config.epochs
    start, losses = 0, []
    if checkpointer is not None and (state := checkpointer.restore()):
        engine.load_full_state_dict(state["weights"]["model"])
        engine.load_state_dict(state["engine"])
        start, losses = state["step"], state["losses"]
    model.train()
    for step in range(start + 1, len(schedule) + 1):
        batch, num_tokens, weight = shard_batch(
            tokenizer, demonstrations, schedule[step - 1], config=config, engine=engine, packed=packed
        )
        share = sft_loss(model, batch, num_tokens) * weight
        check_finite("sft", step, loss=share.item())
        engine.backward(share)
        update = engine.step()
        losses.append(engine.sum_across_ranks(share).item())
        if step % config.log_every == 0 and on_metrics:
            on_metrics(
                {
                    "loss": sum(losses[-config.log_every :]) / config.log_every,
                    "epoch": (step - 1) // steps_per_epoch,
                    **update,
                },
                step,
            )
        if checkpoint_due(checkpointer, step, len(schedule)):
            checkpointer.save(
                step, {"model": engine.full_state_dict()}, {"engine": engine.state_dict(), "losses": losses}
            )
    model.eval()
    tail = losses[-config.log_every :]
    return SFTResult(len(schedule), losses[0], sum(tail) / len(tail))
