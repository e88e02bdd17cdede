"""SFT's packed rows: several demonstrations to a row, kept apart by their restarting positions, give the loss and
gradients of one padded row each, in fewer positions."""

from types import SimpleNamespace

import torch
from conftest import TINY_WORLD
from torch import nn

from rlhf_core import world
from rlhf_core.modeling import (
    encode_prompt_responses,
    keeps_packed_sequences_apart,
    load_policy,
    load_tokenizer,
    pack_prompt_responses,
)
from rlhf_core.sft import sft_loss


def gradients(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_rows_give_the_loss_and_gradients_of_padded_ones_in_fewer_positions(base_dir):
    tokenizer, model = load_tokenizer(base_dir), load_policy(base_dir)
    demos = world.make_world(0, TINY_WORLD).demonstrations[:24]
    prompts, responses = [p for p, _ in demos], [r for _, r in demos]
    padded = encode_prompt_responses(tokenizer, prompts, responses, 32)
    packed = pack_prompt_responses(tokenizer, prompts, responses, 32, row_length=32)
    tokens = int(padded.response_mask[:, 1:].sum())
    assert int(packed.response_mask[:, 1:].sum()) == tokens  # every response token, once
    assert packed.input_ids.shape[1] <= 32 and packed.input_ids.numel() < 0.8 * padded.input_ids.numel()
    ids = sorted(packed.input_ids[packed.input_ids != tokenizer.pad_token_id].tolist())
    assert ids == sorted(padded.input_ids[padded.attention_mask.bool()].tolist())  # no token lost or doubled

    loss_padded, loss_packed = sft_loss(model, padded, tokens), sft_loss(model, packed, tokens)
    assert abs(loss_padded.item() - loss_packed.item()) < 1e-5
    grads_padded, grads_packed = gradients(model, loss_padded), gradients(model, loss_packed)
    assert grads_padded.keys() == grads_packed.keys()
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


class SeesEverythingBefore(nn.Module):
    """A causal model that ignores positions: each token's logits come from the sum of the embeddings up to it, so
    packed sequences see each other."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.embed(input_ids).cumsum(1)))


def test_only_a_model_that_keeps_packed_sequences_apart_is_packed(base_dir):
    assert keeps_packed_sequences_apart(load_policy(base_dir))
    assert not keeps_packed_sequences_apart(SeesEverythingBefore())
