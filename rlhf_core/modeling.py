"""Loading models, encoding text, sampling and scoring: the model-facing helpers every phase shares.

Shapes: B = batch, P = prompt length (left padded), R = response length (right padded), V = vocabulary.
"""

from __future__ import annotations

import inspect
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import TypeVar
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_core.config import AttnImplementation, RewardPooling
from rlhf_core.engine import module_device
from rlhf_core.load_report import quiet_head_swap_reports
from rlhf_core.losses import entropy_from_logits, selective_log_softmax


def disable_dropout(model: nn.Module) -> nn.Module:
    """Switch off every dropout, including attention dropout kept as a plain float (RLHF needs the
    log-probs of rollout and update to agree; Huang et al. 2024, detail 6)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (:func:`with_pad_token`)."""
    return with_pad_token(AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code))


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """``tokenizer``, its pad token the EOS token where it has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_device() -> torch.device:
    """The first GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(
    path: str | Path, trust_remote_code: bool = False, *, attn_implementation: AttnImplementation = "sdpa"
) -> PreTrainedModel:
    """A causal LM from safetensors weights only, in fp32 with the ``attn_implementation`` attention kernel
    (``compute.attn_implementation``), dropout off, on :func:`default_device`."""
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        dtype=torch.float32,
        attn_implementation=attn_implementation,
    )
    return disable_dropout(model).to(default_device())


def load_scorer(
    path: str | Path, trust_remote_code: bool = False, *, attn_implementation: AttnImplementation = "sdpa"
) -> PreTrainedModel:
    """A sequence-classification model with one output: a reward model, or a critic started from one, loaded as
    :func:`load_policy` loads. A causal LM checkpoint gets a freshly initialized scalar head (transformers' report of
    that is kept out of the logs: :mod:`rlhf_core.load_report`)."""
    quiet_head_swap_reports()
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path),
        num_labels=1,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        dtype=torch.float32,
        attn_implementation=attn_implementation,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return disable_dropout(model).to(default_device())


def inside_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (its adapters in place); any other model as it is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """``compute.gradient_checkpointing``: each decoder layer of ``model`` (a transformers model, or a peft model
    around one) keeps only its inputs in the forward pass and recomputes its activations in the backward, non-reentrant
    (so frozen embeddings under LoRA need no gradient of their own). Only in training mode: ``generate`` in eval mode
    keeps its KV cache. Returns ``model``."""
    inside_peft(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def fold_reward_normalization(scorer: PreTrainedModel) -> PreTrainedModel:
    """Fold a reward model's output normalization (``gain * r + bias``, in its config) into its scalar head and its
    log-probability feature (``reward_logprob_coef``), so that a critic started from it predicts in the normalized
    units of the returns it learns; the config's gain and bias become 1 and 0. A model without a normalization is
    returned as it is. A reward model that sums per-token scores (``reward_pooling: sum``) has no value to fold in:
    its head judges single tokens, not what is still to come, so the critic's head (and feature) start at zero, the
    normalized reward's mean."""
    config = scorer.config
    gain, bias = getattr(config, "reward_gain", None), getattr(config, "reward_bias", None)
    if gain is None or bias is None:
        return scorer
    if getattr(config, "reward_pooling", "last") == "sum":
        gain, bias = 0.0, 0.0
    config.reward_logprob_coef = gain * getattr(config, "reward_logprob_coef", 0.0)
    head = scorer.score
    folded = nn.Linear(
        head.in_features, head.out_features, bias=True, device=head.weight.device, dtype=head.weight.dtype
    )
    with torch.no_grad():
        folded.weight.copy_(gain * head.weight)
        folded.bias.copy_(bias + (gain * head.bias if head.bias is not None else 0.0))
    scorer.score, config.reward_gain, config.reward_bias = folded, 1.0, 0.0
    return scorer


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` computes them. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


_ENCODED: WeakKeyDictionary[PreTrainedTokenizerBase, dict[tuple[str, bool], list[int]]] = WeakKeyDictionary()
ENCODED_TEXTS_KEPT = 1 << 16  # a tokenizer's texts remembered by token_ids: a default run's several times over


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=...)["input_ids"]``, each list the caller's own, remembered by tokenizer
    and text: a run encodes the same prompts and responses again and again (every PPO step its prompts, every reward
    model epoch and validation check its pairs), and a text's ids do not depend on the batch it comes in. Up to
    :data:`ENCODED_TEXTS_KEPT` texts a tokenizer, then it starts afresh."""
    known = _ENCODED.setdefault(tokenizer, {})
    new = [text for text in dict.fromkeys(texts) if (text, add_special_tokens) not in known]
    if new:
        if len(known) + len(new) > ENCODED_TEXTS_KEPT:
            known.clear()
        ids = tokenizer(new, add_special_tokens=add_special_tokens)["input_ids"]
        known.update(zip([(text, add_special_tokens) for text in new], ids, strict=True))
    return [list(known[text, add_special_tokens]) for text in texts]


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """A prompt's token ids, the tokenizer's special tokens added unless the text already starts with its BOS (a
    prompt formatted by a chat template carries its own): every phase tokenizes prompts through here."""
    bos = tokenizer.bos_token
    return token_ids(tokenizer, [prompt], add_special_tokens=not (bos and prompt.startswith(bos)))[0]


def padded_ids(
    rows: list[list[int]], pad_token_id: int, *, left: bool = False, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Token id lists as one tensor, padded on the right (or the ``left``) to the longest, and its attention mask:
    (B, L) each, on ``device``."""
    width = max(map(len, rows))
    padding = [[pad_token_id] * (width - len(ids)) for ids in rows]
    input_ids = torch.tensor(
        [p + ids if left else ids + p for ids, p in zip(rows, padding, strict=True)], device=device
    )
    lengths = torch.tensor([len(ids) for ids in rows], device=device)[:, None]
    columns = torch.arange(width, device=device)
    return input_ids, (columns >= width - lengths if left else columns < lengths).long()


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and attention mask, (B, P) each, on ``device``."""
    return padded_ids(
        [prompt_token_ids(tokenizer, p) for p in prompts], tokenizer.pad_token_id, left=True, device=device
    )


@dataclass
class EncodedPairs:
    """Prompt + response + EOS, right padded: ids and attention mask (B, L), and a mask over the response tokens
    (EOS included) for next-token losses. Packed (:func:`pack_prompt_responses`): several sequences a row, no
    attention mask, and ``position_ids`` (B, L) restarting at each sequence."""

    input_ids: Tensor
    attention_mask: Tensor | None
    response_mask: Tensor
    position_ids: Tensor | None = None
    sequence_index: Tensor | None = None  # packed: (B, L) which input sequence each position belongs to

    def sequences(self) -> Tensor:
        """(B, L): the input sequence each position belongs to (a padded row holds one: its row's)."""
        if self.sequence_index is not None:
            return self.sequence_index
        rows = torch.arange(len(self.input_ids), device=self.input_ids.device)
        return rows[:, None].expand_as(self.input_ids)

    def model_inputs(self) -> dict[str, Tensor]:
        """The forward's ids and positions, with the attention mask where the rows are padded (packed rows have none:
        the model keeps their sequences apart by where the positions restart)."""
        if self.position_ids is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        mask = self.attention_mask
        return {"input_ids": self.input_ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}


def prompt_response_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> list[tuple[list[int], int]]:
    """Each prompt's and response's tokens joined, EOS appended, the response cut so the whole fits in
    ``max_length``; with the prompt's length."""
    prompt_ids = {prompt: prompt_token_ids(tokenizer, prompt) for prompt in set(prompts)}
    all_response_ids = token_ids(tokenizer, responses, add_special_tokens=False)
    rows = []
    for prompt, response_ids in zip(prompts, all_response_ids, strict=True):
        ids = prompt_ids[prompt]
        response_ids = response_ids[: max(0, max_length - len(ids) - 1)] + [tokenizer.eos_token_id]
        rows.append((ids + response_ids, len(ids)))
    return rows


def encode_prompt_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    *,
    device: torch.device | str = "cpu",
) -> EncodedPairs:
    """Tokenize prompt and response separately and join them with EOS appended, truncating the response
    so the whole fits in ``max_length``; a row each, right padded; the tensors on ``device``."""
    rows = prompt_response_ids(tokenizer, prompts, responses, max_length)
    input_ids, attention_mask = padded_ids([ids for ids, _ in rows], tokenizer.pad_token_id, device=device)
    prompt_lengths = torch.tensor([prompt_length for _, prompt_length in rows], device=device)[:, None]
    after_prompt = torch.arange(input_ids.shape[1], device=device) >= prompt_lengths
    return EncodedPairs(input_ids, attention_mask, attention_mask * after_prompt)


def first_fit_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """Sequences of these lengths packed into rows of ``row_length`` (longer ones alone in a row of their own), first
    fit, longest first: each row's sequences, by index."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(max(row_length, lengths[index]))
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


@dataclass
class Packing:
    """Where the real tokens of padded rows go when their sequences are packed several to a row, first fit, longest
    first (:func:`first_fit_rows`): each sequence's tokens side by side, its positions restarting at 0; the room left
    at a row's end is padding, positioned as a sequence of its own. ``places`` (B, L): each real token's flat index
    into the packed rows (-1 at padding); ``position_ids`` (rows, W)."""

    places: Tensor
    position_ids: Tensor

    @classmethod
    def of(cls, attention_mask: Tensor, row_length: int) -> Packing:
        """The packing of rows whose real tokens ``attention_mask`` (B, L) marks, each sequence's contiguous, into
        rows of ``row_length``."""
        lengths = attention_mask.sum(1).tolist()
        rows = first_fit_rows(lengths, row_length)
        width = max(sum(lengths[i] for i in row) for row in rows)
        starts, fills = [0] * len(lengths), []
        for r, row in enumerate(rows):
            fill = 0
            for i in row:
                starts[i], fill = r * width + fill, fill + lengths[i]
            fills.append(fill)
        device = attention_mask.device
        real = attention_mask.bool()
        offsets = position_ids_from_mask(attention_mask)  # each real token's place in its sequence
        places = (torch.tensor(starts, device=device)[:, None] + offsets).masked_fill(~real, -1)
        position_ids = torch.arange(width, device=device) - torch.tensor(fills, device=device)[:, None]
        position_ids.view(-1)[places[real]] = offsets[real]
        return cls(places, position_ids)

    def pack(self, values: Tensor, fill: int) -> Tensor:
        """Values at the padded rows' real tokens, packed: (B, L) -> (rows, W), ``fill`` at the padding."""
        packed = values.new_full(self.position_ids.shape, fill)
        real = self.places >= 0
        packed.view(-1)[self.places[real]] = values[real]
        return packed


@dataclass
class PackedRollout:
    """Rollout rows (left-padded prompt, right-padded response) packed several to a row (:func:`pack_rollout_rows`):
    the forward's ``input_ids`` and ``position_ids`` (rows, W), and ``predict_at`` (B, R), for each response token the
    flat index of the packed position whose output predicts it (0 past a response's end)."""

    input_ids: Tensor
    position_ids: Tensor
    predict_at: Tensor

    def read(self, outputs: Tensor) -> Tensor:
        """Outputs of the packed forward, (rows, W, ...), where each response token is predicted: (B, R, ...)."""
        return outputs.flatten(0, 1)[self.predict_at]


def pack_rollout_rows(query_responses: Tensor, attention_mask: Tensor, context_length: int) -> PackedRollout:
    """Rollout rows packed into rows as long as the longest sequence (:class:`Packing`), each sequence's real tokens
    (its prompt and its response) side by side: a forward over them computes no padding but the room a row leaves.
    Only for a model that keeps packed sequences apart (:func:`keeps_packed_sequences_apart`). query_responses,
    attention_mask: (B, P + R)."""
    packing = Packing.of(attention_mask, int(attention_mask.sum(1).max()))
    predict_at = (packing.places[:, context_length:] - 1).clamp(min=0)  # the token before; -1 - 1 past the end
    return PackedRollout(packing.pack(query_responses, 0), packing.position_ids, predict_at)


def pack_prompt_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    *,
    row_length: int,
    device: torch.device | str = "cpu",
) -> EncodedPairs:
    """The sequences of :func:`encode_prompt_responses` packed into rows of at most ``row_length`` tokens
    (:class:`Packing`), so that little compute goes to padding, with which sequence each position belongs to; the
    tensors on ``device``. Only for a model that keeps packed sequences apart (:func:`keeps_packed_sequences_apart`).
    A prediction across two sequences lands on a prompt token, which the response mask leaves out."""
    padded = encode_prompt_responses(tokenizer, prompts, responses, max_length, device=device)
    packing = Packing.of(padded.attention_mask, row_length)
    return EncodedPairs(
        packing.pack(padded.input_ids, tokenizer.pad_token_id),
        None,
        packing.pack(padded.response_mask, 0),
        packing.position_ids,
        packing.pack(padded.sequences(), 0),
    )


def transformer_body(model: nn.Module) -> nn.Module:
    """The transformer under a model's language-model or scalar head (a peft model's through the model inside it)."""
    return inside_peft(model).base_model


@torch.no_grad()
def keeps_packed_sequences_apart(model: nn.Module, *, tolerance: float = 0.02) -> bool:
    """Whether ``model`` (a causal LM or a scorer) keeps sequences packed in one row apart (transformers does, from
    where the positions restart, for the architectures whose masks it builds with ``create_causal_mask``): two short
    sequences packed give the hidden states they give alone, within ``tolerance`` of the largest (room for
    half-precision rounding; a sequence that sees its neighbour moves far more)."""
    body, device = transformer_body(model), module_device(model)
    vocab = model.get_input_embeddings().num_embeddings
    first, second = (torch.arange(n, device=device) * 7 % vocab + 1 for n in (5, 4))

    def hidden(ids: Tensor, positions: Tensor | None = None) -> Tensor:
        return body(input_ids=ids[None], position_ids=positions, use_cache=False).last_hidden_state[0].float()

    alone = torch.cat([hidden(first), hidden(second)])
    positions = torch.cat([torch.arange(5), torch.arange(4)]).to(device)[None]
    packed = hidden(torch.cat([first, second]), positions)
    return bool((packed - alone).abs().max() <= tolerance * alone.abs().max())


def truncate_after_eos(responses: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Replace everything after the first EOS with padding. (B, R) -> responses (B, R), and
    response_mask (B, R): 1 up to and including the first EOS."""
    is_eos = responses == eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return responses.masked_fill(after_eos, pad_token_id), (~after_eos).long()


@dataclass
class Samples:
    """Sampled responses to left-padded prompts. query_responses: (B, P + R); responses and
    response_mask: (B, R); has_eos: (B,) bool; the EOS and padding ids they were cut with; where asked for,
    the log-probs of the sampled tokens and the entropy of the distributions they were drawn from, (B, R) each."""

    prompts: list[str]
    query_responses: Tensor
    attention_mask: Tensor
    context_length: int
    responses: Tensor
    response_mask: Tensor
    has_eos: Tensor
    texts: list[str]
    eos_token_id: int
    pad_token_id: int
    logprobs: Tensor | None = None
    entropy: Tensor | None = None


def inference_mode_for(*models: nn.Module) -> AbstractContextManager:
    """``torch.inference_mode`` for forwards of ``models`` that no gradient flows through (sampling, scoring): the
    results of ``no_grad`` for less work per kernel (the toy world's rollouts sample 5-7% faster). Off where a model's
    parameters are sharded by DeepSpeed ZeRO-3 (they carry ``ds_id``): it gathers them in forward hooks, and keeps
    small ones gathered, which made in inference mode would be tensors autograd cannot save once training resumes."""
    sharded = any(hasattr(p, "ds_id") for model in models for p in model.parameters())
    return nullcontext() if sharded else torch.inference_mode()  # inference_mode(False) would turn gradients on


MIN_SAMPLING_ROWS = 16  # fewer rows in a CPU matrix product take other MKL kernels, which round differently


def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether a model's forward takes the argument ``name`` (a peft model's: the model inside it)."""
    return name in inspect.signature(inside_peft(model).forward).parameters


def rows_to_keep(unfinished: Tensor, rows: Tensor, parts: int, min_rows: int) -> Tensor | None:
    """Which of the forward's ``rows`` to keep, as indices into them, once enough have finished to be worth dropping
    (a quarter of them); None to keep them all. The rows are taken in ``parts`` equal consecutive parts, each
    keeping its own rows (finished ones where it needs them to stay as large as the largest part, or to keep
    ``min_rows`` in all): on a CPU, PyTorch's attention kernel rounds a row differently on different intra-op
    threads, and splits the batch among them that way, so each row stays with the thread that started it and comes
    out bit for bit as in the whole batch (measured, torch 2.13). unfinished: (B,) bool, rows: (N,) -> (N',)."""
    if len(rows) % parts:
        return None
    keep = unfinished[rows].view(parts, -1)
    size = max(int(keep.sum(1).max()), math.ceil(min_rows / parts))
    if size > 0.75 * keep.shape[1]:
        return None
    kept = torch.argsort(~keep, dim=1, stable=True)[:, :size].sort(1).values  # its unfinished rows first, in order
    return (kept + torch.arange(parts, device=rows.device)[:, None] * keep.shape[1]).flatten()


def any_rank_sampling(sampling: bool, synced_gpus: bool, device: torch.device) -> bool:
    """Whether this rank, or with ``synced_gpus`` any rank, still has a sequence to finish."""
    if not synced_gpus:
        return sampling
    flag = torch.tensor(float(sampling), device=device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item())


@torch.no_grad()
def sample_tokens(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    keep_logits: bool = False,
    synced_gpus: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Ancestral sampling from the full distribution at ``temperature``, with the KV cache, until every row has
    sampled its EOS or ``max_new_tokens``: what ``generate(do_sample=True, top_k=0)`` draws (to the bit, checked on
    CPU: the same forwards, and ``torch.multinomial``'s draw, ``argmax(probs / q)`` with ``q ~ Exp(1)`` drawn for
    every row of the batch), but rows that have finished leave the forwards (:func:`rows_to_keep`) instead of being
    fed padding to the end. ``synced_gpus``: one of several ranks whose weights are sharded (ZeRO-3), which keeps
    running forwards until every rank is done. prompt_ids, prompt_mask: (B, P) left padded -> responses (B, R),
    padding after EOS, and with ``keep_logits`` each step's logits divided by the temperature, (B, R, V) (0 where a
    row was done)."""
    batch, device = len(prompt_ids), prompt_ids.device
    parts = torch.get_num_threads() if device.type == "cpu" else 1
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    takes_positions = forward_accepts(model, "position_ids")  # generate passes these where the forward takes them
    last_logits_only = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
    rows = torch.arange(batch, device=device)  # the rows in the forward
    inputs, mask, positions = prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    tokens, kept_logits = [], []
    for _ in range(max_new_tokens):
        out = model(
            input_ids=inputs,
            attention_mask=mask,
            **({"position_ids": positions} if takes_positions else {}),
            cache=cache,
            use_cache=True,
            **last_logits_only,
        )
        step_tokens = torch.full((batch,), pad_token_id, device=device)
        if unfinished.any():  # else a rank done before the others, running forwards alongside them
            logits = out.logits[:, -1].float() / temperature
            q = torch.empty((batch, logits.shape[-1]), device=device).exponential_(1)
            step_tokens[rows] = (F.softmax(logits, dim=-1) / q[rows]).argmax(-1)
            step_tokens = step_tokens.where(unfinished, pad_token_id)
            tokens.append(step_tokens)
            if keep_logits:
                kept_logits.append(logits.new_zeros(batch, logits.shape[-1]).index_copy_(0, rows, logits))
            unfinished &= step_tokens != eos_token_id
        if not any_rank_sampling(bool(unfinished.any()), synced_gpus, device):
            break
        if (kept := rows_to_keep(unfinished, rows, parts, min(MIN_SAMPLING_ROWS, batch))) is not None:
            cache.batch_select_indices(kept)
            rows, mask, positions = rows[kept], mask[kept], positions[kept]
        inputs, positions = step_tokens[rows, None], positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
    responses = torch.stack(tokens, 1) if tokens else prompt_ids.new_zeros(batch, 0)
    return responses, torch.stack(kept_logits, 1) if keep_logits and kept_logits else None


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    with_logprobs: bool = False,
    synced_gpus: bool = False,
) -> Samples:
    """Batched sampling of responses to left-padded prompts (:func:`sample_tokens`), from the full distribution: the
    log-probs PPO recomputes must be those of the distribution sampled from, so no setting a checkpoint ships in its
    ``generation_config`` (a repetition penalty, ``min_p``, suppressed tokens, extra EOS ids...) applies.
    ``with_logprobs`` keeps the samples' log-probs and entropy at the sampling temperature. ``synced_gpus``: one of
    several ranks whose weights are sharded (ZeRO-3)."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, model.device)
    with inference_mode_for(model):
        responses, logits = sample_tokens(
            model,
            prompt_ids,
            prompt_mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            keep_logits=with_logprobs,
            synced_gpus=synced_gpus,
        )
    context_length = prompt_ids.shape[1]
    responses, response_mask = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    has_eos = (responses == tokenizer.eos_token_id).any(-1)
    query_responses = torch.cat([prompt_ids, responses], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    samples = Samples(
        prompts,
        query_responses,
        attention_mask,
        context_length,
        responses,
        response_mask,
        has_eos,
        texts,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if logits is not None:  # kept with with_logprobs, for at least one step
        samples.logprobs, samples.entropy = selective_log_softmax(logits, responses), entropy_from_logits(logits)
    return samples


def concat_samples(shares: list[Samples]) -> Samples:
    """One batch from several (the ranks' shares, in order): prompts left padded to the widest, responses right
    padded to the longest."""
    if len(shares) == 1:
        return shares[0]
    first, context_length = shares[0], max(s.context_length for s in shares)
    width = max(s.responses.shape[1] for s in shares)

    def prompts_of(name: str, value: int) -> Tensor:
        return torch.cat(
            [
                F.pad(getattr(s, name)[:, : s.context_length], (context_length - s.context_length, 0), value=value)
                for s in shares
            ]
        )

    def responses_of(name: str, value: float) -> Tensor | None:
        if getattr(first, name) is None:
            return None
        return torch.cat([F.pad(getattr(s, name), (0, width - s.responses.shape[1]), value=value) for s in shares])

    responses, response_mask = responses_of("responses", first.pad_token_id), responses_of("response_mask", 0)
    return Samples(
        [p for s in shares for p in s.prompts],
        torch.cat([prompts_of("query_responses", first.pad_token_id), responses], 1),
        torch.cat([prompts_of("attention_mask", 0), response_mask], 1),
        context_length,
        responses,
        response_mask,
        torch.cat([s.has_eos for s in shares]),
        [t for s in shares for t in s.texts],
        eos_token_id=first.eos_token_id,
        pad_token_id=first.pad_token_id,
        logprobs=responses_of("logprobs", 0.0),
        entropy=responses_of("entropy", 0.0),
    )


Batch = TypeVar("Batch")


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """A dataclass of tensors (nested ones too) with every tensor moved to ``device``."""
    changes = {}
    for f in fields(batch):  # type: ignore[arg-type]
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = value.to(device)
        elif is_dataclass(value):
            changes[f.name] = to_device(value, device)
    return replace(batch, **changes)  # type: ignore[type-var]


def reward_inputs(samples: Samples, max_length: int | None) -> EncodedPairs:
    """The samples as a reward model is trained on them (:func:`encode_prompt_responses`): the response without
    its EOS, cut so that prompt + response + EOS fit in ``max_length`` (None: not cut), then one EOS. The prompt
    stays left padded, the response right padded: (B, P + R + 1) tensors."""
    context_length, device = samples.context_length, samples.responses.device
    prompt_mask = samples.attention_mask[:, :context_length]
    kept = samples.response_mask.sum(1) - samples.has_eos.long()  # (B,) response tokens before the EOS
    if max_length is not None:
        kept = torch.minimum(kept, (max_length - prompt_mask.sum(1) - 1).clamp(min=0))
    positions = torch.arange(samples.responses.shape[1] + 1, device=device)[None]  # one more column for an EOS
    responses = torch.cat([samples.responses, samples.responses[:, :1]], 1)
    responses = responses.masked_fill(positions >= kept[:, None], samples.pad_token_id)
    responses = responses.masked_fill(positions == kept[:, None], samples.eos_token_id)
    input_ids = torch.cat([samples.query_responses[:, :context_length], responses], 1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask), (positions <= kept[:, None]).long()], 1)
    return EncodedPairs(input_ids, torch.cat([prompt_mask, response_mask[:, context_length:]], 1), response_mask)


def response_logprobs(
    model: PreTrainedModel,
    query_responses: Tensor,
    attention_mask: Tensor,
    context_length: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    packed: PackedRollout | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the response tokens under ``model`` at the sampling temperature, and optionally the
    per-token entropy; the forward over the rows as they are, or over ``packed``, the same rows packed
    (:func:`pack_rollout_rows`). query_responses, attention_mask: (B, P + R) -> (B, R), (B, R) | None."""
    if packed is None:
        logits = model(
            input_ids=query_responses,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).logits[:, context_length - 1 : -1]
    else:
        outputs = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
        logits = packed.read(outputs.logits)
    logits = logits.float() / temperature
    logprobs = selective_log_softmax(logits, query_responses[:, context_length:])
    return logprobs, entropy_from_logits(logits) if with_entropy else None


def trim_padding(query_responses: Tensor, attention_mask: Tensor, context_length: int) -> tuple[Tensor, Tensor, int]:
    """Drop the columns that are padding in every row: left of the longest prompt, right of the longest
    response. (B, P + R) -> (B, P' + R') twice, and the new context length P'. The response columns kept
    are the first R' of the old ones: slice response-aligned (B, R) tensors with ``[:, :R']``."""
    columns = attention_mask.any(0).nonzero().squeeze(1)
    start, end = int(columns[0]), int(columns[-1]) + 1
    return query_responses[:, start:end], attention_mask[:, start:end], context_length - start


def token_scores(
    scorer: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    position_ids: Tensor | None = None,
) -> Tensor:
    """The scalar head of a sequence-classification model applied at every position, (B, L) -> (B, L).
    Pooled over a response it is a reward (:func:`pool_rewards`); read along a response it is a critic's values. A
    LoRA scorer (a peft model) is read through the transformers model inside it, adapters and trained head included.
    Packed rows: no attention mask, and their ``position_ids``."""
    scorer = inside_peft(scorer)
    position_ids = position_ids if position_ids is not None else position_ids_from_mask(attention_mask)
    hidden = scorer.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    scores = scorer.score(hidden).squeeze(-1).float()
    if coef := getattr(scorer.config, "reward_logprob_coef", 0.0):
        embed = scorer.get_input_embeddings()
        embeddings = embed.weight
        if embeddings.shape != (embed.num_embeddings, embed.embedding_dim):  # sharded (ZeRO-3): a call gathers it
            embeddings = embed(torch.arange(embed.num_embeddings, device=input_ids.device))
        scores = scores + coef * embedding_logprobs(hidden, embeddings, input_ids, position_ids)
    return scores


def embedding_logprobs(hidden: Tensor, embeddings: Tensor, input_ids: Tensor, position_ids: Tensor) -> Tensor:
    """Each token's log-probability given the tokens before it, under an output layer made of the input
    embeddings (a tied model's language-model head): ``log_softmax(hidden[t - 1] @ embeddings.T)[input_ids[t]]``;
    0 where a sequence starts (``position_ids`` 0), whose prediction would read the end of another sequence in a
    packed row. hidden: (B, L, H), embeddings: (V, H), input_ids, position_ids: (B, L) -> (B, L)."""
    logprobs = selective_log_softmax(hidden[:, :-1] @ embeddings.T, input_ids[:, 1:]).float()
    return F.pad(logprobs, (1, 0)) * (position_ids > 0)


def response_values(
    critic: PreTrainedModel,
    query_responses: Tensor,
    attention_mask: Tensor,
    context_length: int,
    *,
    packed: PackedRollout | None = None,
) -> Tensor:
    """A critic's value of the state before each response token: its head where that token is predicted, over the
    rows as they are or ``packed`` (:func:`pack_rollout_rows`). (B, P + R) -> (B, R)."""
    if packed is None:
        return token_scores(critic, query_responses, attention_mask)[:, context_length - 1 : -1]
    return packed.read(token_scores(critic, packed.input_ids, position_ids=packed.position_ids))


def normalized(reward_model: PreTrainedModel, raw: Tensor) -> Tensor:
    """A reward model's raw scores in its normalized units, ``gain * r + bias`` (from its config). (N,) -> (N,)."""
    config = reward_model.config
    return getattr(config, "reward_gain", 1.0) * raw + getattr(config, "reward_bias", 0.0)


def pool_rewards(scores: Tensor, response_mask: Tensor, sequences: Tensor, *, pooling: RewardPooling) -> Tensor:
    """One reward per sequence from a scalar head's score at every position: the score at the last token of its
    response, the EOS, which attends to all of it (``last``); or the sum of the scores over its response tokens, EOS
    included (``sum``: a reward made of per-token contributions). Each sequence has at least its EOS. scores,
    response_mask, sequences (which sequence each position belongs to, 0..N-1): (B, L) -> (N,)."""
    weights = response_mask.to(scores.dtype)
    if pooling == "last":
        weights = weights * (1 - F.pad(weights[:, 1:], (0, 1)))  # a response token that no response token follows
    n = int(sequences.max()) + 1
    return scores.new_zeros(n).index_add(0, sequences.flatten(), (scores * weights).flatten())


def batch_rewards(reward_model: PreTrainedModel, batch: EncodedPairs) -> Tensor:
    """Normalized reward of each sequence of a padded or packed batch, pooled as the model was trained
    (``reward_pooling`` in its config; ``last`` for a model without one). -> (N,)."""
    scores = token_scores(reward_model, **batch.model_inputs())
    pooling = getattr(reward_model.config, "reward_pooling", "last")
    return normalized(reward_model, pool_rewards(scores, batch.response_mask, batch.sequences(), pooling=pooling))


def reward_credit(reward_model: PreTrainedModel, samples: Samples) -> Tensor:
    """A summed reward model's normalized reward of each sample (``reward_pooling: sum``, read on the policy's own
    tokens as it was trained, :func:`reward_inputs`), credited to the response tokens that earned it: each token's
    score where it was read, and the score of the EOS (the sample's own, or appended) and the normalization's bias
    on the response's last token. Rows sum to the sample's reward. -> (B, R)."""
    batch = reward_inputs(samples, getattr(reward_model.config, "reward_max_length", None))
    scores = token_scores(reward_model, **batch.model_inputs())
    read = (scores * batch.response_mask)[:, samples.context_length :]  # (B, R + 1): one more column for an EOS
    last = (samples.response_mask.sum(1) - 1).clamp(min=0)[:, None]
    columns = torch.minimum(torch.arange(read.shape[1], device=read.device)[None], last)
    credit = read.new_zeros(samples.responses.shape).scatter_add(1, columns, read)
    config = reward_model.config
    gain, bias = getattr(config, "reward_gain", 1.0), getattr(config, "reward_bias", 0.0)
    return (gain * credit).scatter_add(1, last, torch.full_like(read[:, :1], bias))


def shuffled_batches(
    n: int, batch_size: int, generator: torch.Generator, *, epoch_size: int | None = None
) -> list[Tensor]:
    """Index batches covering ``range(n)`` once in a random order, or ``epoch_size`` of its indices drawn without
    replacement (the last batch may be short)."""
    return list(torch.randperm(n, generator=generator)[:epoch_size].split(batch_size))


def length_grouped_batches(lengths: Tensor, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Index batches of rows of similar length, in random order: a random permutation, stably sorted by length,
    cut into batches, which are then shuffled; so a batch carries little padding. lengths: (N,) -> index tensors
    covering range(N)."""
    order = torch.randperm(len(lengths), generator=generator)
    batches = order[lengths[order].argsort(stable=True)].split(batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def batch_schedule(n: int, batch_size: int, epochs: int, seed: int, *, epoch_size: int | None = None) -> list[Tensor]:
    """Every batch of ``epochs`` shuffled passes over ``range(n)`` (each pass ``epoch_size`` of the indices, drawn
    afresh, where given), in order: step ``k`` trains on ``schedule[k - 1]``, so the step number alone is a loop's
    data position when it resumes."""
    generator = torch.Generator().manual_seed(seed)
    passes = range(epochs)
    return [index for _ in passes for index in shuffled_batches(n, batch_size, generator, epoch_size=epoch_size)]
