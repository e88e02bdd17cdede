"""Packed rows (SFT's demonstrations, the reward model's responses), several sequences to a row kept apart by their
restarting positions, give the losses and gradients of one padded row each, in fewer positions."""

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_WORLD
from torch import nn

from rlhf_core import modeling, world
from rlhf_core.losses import bradley_terry_loss
from rlhf_core.modeling import (
    encode_prompt_responses,
    keeps_packed_sequences_apart,
    load_policy,
    load_scorer,
    load_tokenizer,
    pack_prompt_responses,
    token_ids,
)
from rlhf_core.preferences import PreferencePair
from rlhf_core.reward import pair_rewards
from rlhf_core.sft import sft_loss


def gradients(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_remembered_token_ids_are_the_tokenizers_own_and_the_callers_to_keep(monkeypatch):
    tokenizer, other = world.build_tokenizer(), world.build_tokenizer()
    other.add_tokens(["good day"])  # another tokenizer: another encoding of the same text
    texts = [r for _, r in world.make_world(0, TINY_WORLD).demonstrations[:12]] + ["good day"]
    texts += texts[:3]  # repeated in a batch

    def own(tok, add_special_tokens):
        return [tok(text, add_special_tokens=add_special_tokens)["input_ids"] for text in texts]

    for _ in range(2):  # encoded, then remembered
        for add_special_tokens in (False, True):
            ids = token_ids(tokenizer, texts, add_special_tokens=add_special_tokens)
            assert ids == own(tokenizer, add_special_tokens)
            assert token_ids(other, texts, add_special_tokens=add_special_tokens) == own(other, add_special_tokens)
            ids[0].append(-1)  # the caller's list, not the remembered one
    assert own(tokenizer, True)[-4] != own(other, True)[-4]

    monkeypatch.setattr(modeling, "ENCODED_TEXTS_KEPT", 5)
    for word in world.vocabulary()[10:20]:  # texts not seen before, past the limit
        assert token_ids(tokenizer, [word], add_special_tokens=False) == [
            tokenizer(word, add_special_tokens=False)["input_ids"]
        ]
        assert len(modeling._ENCODED[tokenizer]) <= 5


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


@pytest.mark.parametrize(("pooling", "logprob_coef"), [("last", 0.0), ("sum", 0.0), ("sum", 0.7)])
def test_packed_pairs_give_the_rewards_and_gradients_of_padded_ones(sft_dir, pooling, logprob_coef):
    tokenizer, scorer = load_tokenizer(sft_dir), load_scorer(sft_dir)
    scorer.config.reward_gain, scorer.config.reward_bias, scorer.config.reward_pooling = 2.0, -0.5, pooling
    scorer.config.reward_logprob_coef = logprob_coef
    pairs = [
        PreferencePair(p, r, r.split(" ", 1)[-1], "ann", 0.0, 0.0)
        for p, r in world.make_world(0, TINY_WORLD).demonstrations[:20]
    ]
    padded, packed = pair_rewards(scorer, tokenizer, pairs, 32), pair_rewards(scorer, tokenizer, pairs, 32, packed=True)
    for a, b in zip(padded, packed, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)  # each reward pooled over its own sequence
    grads = [gradients(scorer, bradley_terry_loss(*rewards)) for rewards in (padded, packed)]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


class SeesEverythingBefore(nn.Module):
    """A causal model that ignores positions: each token's hidden state is the sum of the embeddings up to it, so
    packed sequences see each other."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)

    @property
    def base_model(self) -> nn.Module:
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.embed(input_ids).cumsum(1))


def test_only_a_model_that_keeps_packed_sequences_apart_is_packed(base_dir, sft_dir):
    assert keeps_packed_sequences_apart(load_policy(base_dir)) and keeps_packed_sequences_apart(load_scorer(sft_dir))
    assert not keeps_packed_sequences_apart(SeesEverythingBefore())


def test_frozen_forwards_run_in_inference_mode_unless_zero3_shards_a_model(sft_dir):
    from rlhf_core.modeling import inference_mode_for, sample_responses

    tokenizer, policy, scorer = load_tokenizer(sft_dir), load_policy(sft_dir).eval(), load_scorer(sft_dir).eval()
    with inference_mode_for(policy, scorer):
        assert torch.is_inference_mode_enabled()
    modes = []
    policy.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    samples = sample_responses(policy, tokenizer, ["tell me about art :"], 4, with_logprobs=True)
    assert modes and all(modes) and not samples.logprobs.is_inference()  # sampled so; tensors autograd may use
    next(scorer.parameters()).ds_id = 0  # how DeepSpeed ZeRO-3 marks a parameter it shards
    with torch.no_grad(), inference_mode_for(policy, scorer):
        assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()  # no_grad left as it was


def test_packed_rollout_rows_give_the_log_probs_and_values_of_padded_ones(sft_dir):
    from rlhf_core.modeling import pack_rollout_rows, response_logprobs, response_values, sample_responses

    tokenizer, policy, critic = load_tokenizer(sft_dir), load_policy(sft_dir).eval(), load_scorer(sft_dir).eval()
    torch.manual_seed(0)
    prompts = ["explain briefly ocean :", "give a detailed account of space to an expert :", "tell me about art :"]
    samples = sample_responses(policy, tokenizer, prompts * 5, 12)  # left-padded prompts, right-padded responses
    qr, mask, ctx = samples.query_responses, samples.attention_mask, samples.context_length
    packed = pack_rollout_rows(qr, mask, ctx)
    assert packed.input_ids.numel() < qr.numel() and packed.input_ids.shape[1] >= int(mask.sum(1).max())
    assert int((packed.input_ids != 0).sum()) == int(mask.sum())  # every real token once (none of them is id 0)
    padded_logprobs, padded_entropy = response_logprobs(policy, qr, mask, ctx, with_entropy=True, temperature=0.7)
    packed_logprobs, packed_entropy = response_logprobs(
        policy, qr, mask, ctx, with_entropy=True, temperature=0.7, packed=packed
    )
    real = samples.response_mask.bool()
    torch.testing.assert_close(packed_logprobs[real], padded_logprobs[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_entropy[real], padded_entropy[real], atol=1e-5, rtol=0)
    packed_values = response_values(critic, qr, mask, ctx, packed=packed)
    torch.testing.assert_close(packed_values[real], response_values(critic, qr, mask, ctx)[real], atol=1e-5, rtol=0)


def test_a_packed_ppo_update_is_the_padded_one(sft_dir):
    import copy

    from test_phases import ppo_models

    from rlhf_core.config import PPOConfig
    from rlhf_core.ppo import advantages_and_returns, collect_rollout, ppo_update

    tokenizer = load_tokenizer(sft_dir)
    config = PPOConfig(rollout_batch_size=16, minibatch_size=8, epochs=2, lr=1e-3, max_new_tokens=8, target_kl=None)

    def fresh():
        torch.manual_seed(0)  # the critic's fresh head
        return ppo_models(
            load_policy(sft_dir), load_scorer(sft_dir), load_policy(sft_dir).eval(), load_scorer(sft_dir).eval(), config
        )

    models = fresh()
    before = copy.deepcopy(models.policy.module.state_dict())
    rollout = collect_rollout(models, tokenizer, world.make_world(0, TINY_WORLD).ppo_prompts[:16], config)
    _, _, advantages, returns = advantages_and_returns(rollout, config, kl_coef=0.1)
    weights, stats = {}, {}
    for pack in (False, True):
        models = fresh()
        generator = torch.Generator().manual_seed(0)
        stats[pack] = ppo_update(
            models, rollout, advantages=advantages, returns=returns, config=config, generator=generator, pack=pack
        )
        weights[pack] = models.policy.module.state_dict()
    assert max((weights[False][k] - before[k]).abs().max().item() for k in before) > 1e-4  # it trained
    assert max((weights[False][k] - weights[True][k]).abs().max().item() for k in before) < 1e-5
    for key, value in stats[False].items():  # a clip fraction may count one value at the boundary differently
        assert value == pytest.approx(stats[True][key], abs=0.01 if "clipfrac" in key else 1e-5), key


def test_a_rollout_scored_packed_is_the_one_scored_padded(sft_dir):
    from test_phases import ppo_models

    from rlhf_core.config import PPOConfig
    from rlhf_core.ppo import collect_rollout

    tokenizer, config = load_tokenizer(sft_dir), PPOConfig(rollout_batch_size=16, max_new_tokens=10)
    torch.manual_seed(0)
    models = ppo_models(
        load_policy(sft_dir), load_scorer(sft_dir), load_policy(sft_dir).eval(), load_scorer(sft_dir).eval(), config
    )
    rollouts = {}
    for pack in (False, True):
        torch.manual_seed(1)  # the same samples
        rollouts[pack] = collect_rollout(
            models, tokenizer, world.make_world(0, TINY_WORLD).ppo_prompts[:16], config, pack=pack
        )
    real = rollouts[False].samples.response_mask.bool()
    for name in ("ref_logprobs", "values"):
        torch.testing.assert_close(
            getattr(rollouts[True], name)[real], getattr(rollouts[False], name)[real], atol=1e-5, rtol=0
        )
