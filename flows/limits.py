"""Token budgets checked against the models before anything runs: every sampled response fits the policy's
context, and what the reward model (or DPO) later reads of it fits the ``max_length`` it keeps, so nothing is
cut silently hours into a run."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from flows.config import PipelineConfig
from rlhf_core.modeling import prompt_token_ids
from rlhf_core.pretrained_defaults import model_context as read_model_context


def model_context(config: PipelineConfig, model_field: str) -> int | None:
    """Positions the model named by ``model_field`` (``data.base_model`` or ``data.reward_model``) takes; None
    when its config does not say. The built-in world's model when the field is null."""
    name_or_path = getattr(config.data, model_field.removeprefix("data."))
    if name_or_path is None:
        return config.data.world.max_position_embeddings
    try:
        return read_model_context(name_or_path, config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_field}={name_or_path!r}: cannot read its config: {e}") from e


def check_lengths(config: PipelineConfig, prompts: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> None:
    """ValueError naming the config field when a sampled response cannot fit: the longest prompt plus a phase's
    ``max_new_tokens`` past the policy's context; a ``max_length`` past its model's context; or, where the reward
    model reads the policy's tokens, a sampled response cut before the reward model (or DPO) reads it."""
    longest = max((len(prompt_token_ids(tokenizer, p)) for p in prompts), default=0)
    samplers = {"preferences.max_new_tokens": config.preferences.max_new_tokens}
    samplers |= {"evaluation.max_new_tokens": config.evaluation.max_new_tokens}
    if config.algorithm == "ppo":
        samplers |= {"ppo.max_new_tokens": config.ppo.max_new_tokens}
    reader, read_length = (
        ("reward.max_length", config.reward.max_length)
        if config.algorithm == "ppo"
        else ("dpo.max_length", config.dpo.max_length)
    )
    separate_reward_model = config.algorithm == "ppo" and config.data.reward_model is not None

    context = model_context(config, "data.base_model")
    if context is not None:
        base = config.data.base_model
        where = f"max_position_embeddings of {base!r}" if base else "data.world.max_position_embeddings"
        for name, new_tokens in samplers.items():
            if longest + new_tokens > context:
                raise ValueError(
                    f"{name}={new_tokens}: the longest prompt ({longest} tokens) and {new_tokens} new tokens take "
                    f"{longest + new_tokens} positions, past the policy's context of {context} ({where})"
                )
        check_fits_context("sft.max_length", config.sft.max_length, context, where)
        if not separate_reward_model:
            check_fits_context(reader, read_length, context, where)
    if separate_reward_model:  # it counts in tokens of its own: only its own context is the policy's to check
        reward_context = model_context(config, "data.reward_model")
        if reward_context is not None:
            where = f"max_position_embeddings of {config.data.reward_model!r}"
            check_fits_context(reader, read_length, reward_context, where)
        return
    read = samplers if config.algorithm == "ppo" else {"preferences.max_new_tokens": config.preferences.max_new_tokens}
    for name, new_tokens in read.items():  # DPO reads only the preference pairs; the reward model scores all three
        if longest + new_tokens + 1 > read_length:
            raise ValueError(
                f"{reader}={read_length}: responses of {name}={new_tokens} to the longest prompt ({longest} tokens) "
                f"take {longest + new_tokens + 1} tokens with their EOS and would be cut before they are read: "
                f"raise {reader} to {longest + new_tokens + 1} or lower {name}"
            )


def check_fits_context(name: str, length: int, context: int, where: str) -> None:
    if length > context:
        raise ValueError(f"{name}={length}: past the model's context of {context} positions ({where})")
