"""Each phase on a tiny real Llama: the weights change and the phase's own objective improves."""

import copy

import pytest
import torch
from conftest import TINY_WORLD

from rlhf_core import world
from rlhf_core.config import PPOConfig, PreferenceConfig, RewardConfig, SFTConfig
from rlhf_core.engine import Optimization, TorchEngine
from rlhf_core.modeling import (
    EncodedPairs,
    batch_rewards,
    encode_prompt_responses,
    load_policy,
    load_scorer,
    load_tokenizer,
    pool_rewards,
    response_logprobs,
    sample_responses,
    token_scores,
    truncate_after_eos,
)
from rlhf_core.ppo import PPOModels, train_ppo
from rlhf_core.preferences import PreferencePair, collect_preferences
from rlhf_core.reward import RewardFunction, normalize_reward_model, score_texts, split_pairs, train_reward_model
from rlhf_core.sft import sft_loss, train_sft

TINY = TINY_WORLD


def weights_changed(before: dict, model: torch.nn.Module) -> bool:
    return any(not torch.equal(before[name], p) for name, p in model.state_dict().items())


def ppo_models(policy, critic, reference, reward_model, config: PPOConfig) -> PPOModels:
    """PPO's four models, the trained two behind plain-torch engines at the config's learning rates."""
    return PPOModels(
        TorchEngine(policy, Optimization(lr=config.lr, total_steps=100)),
        TorchEngine(critic, Optimization(lr=config.critic_lr, total_steps=100)),
        reference,
        RewardFunction(reward_model),
    )


def held_out_eos_rate(model: torch.nn.Module, tokenizer, max_new_tokens: int, n: int = 256) -> float:
    """The share of ``n`` fresh samples on held-out prompts that end with EOS: a learned quantity measured on
    enough samples that its noise (a binomial standard deviation of about 0.03 at 256) is far below the
    effects the tests assert."""
    prompts = world.make_world(0, TINY).eval_prompts
    torch.manual_seed(1234)
    batch = [prompts[i % len(prompts)] for i in range(n)]
    return (
        sample_responses(model.eval(), tokenizer, batch, max_new_tokens, temperature=1.0).has_eos.float().mean().item()
    )


def test_sft_masks_prompt_and_padding_and_appends_eos(base_dir):
    tokenizer = load_tokenizer(base_dir)
    batch = encode_prompt_responses(
        tokenizer, ["explain briefly ocean :", "tell me about art :"], ["water waves", "paint"], 32
    )
    first = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert first[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(batch.input_ids[0][batch.response_mask[0].bool()]) == "water waves <eos>"
    assert batch.response_mask[1].sum() == 2  # "paint" + EOS; prompt and padding are masked out
    # padding a batch further does not change the loss
    model = load_policy(base_dir)
    wide = copy.deepcopy(batch)
    extra = torch.full((2, 5), tokenizer.pad_token_id)
    wide.input_ids = torch.cat([batch.input_ids, extra], 1)
    wide.attention_mask = torch.cat([batch.attention_mask, torch.zeros_like(extra)], 1)
    wide.response_mask = torch.cat([batch.response_mask, torch.zeros_like(extra)], 1)
    assert sft_loss(model, batch).item() == pytest.approx(sft_loss(model, wide).item(), abs=1e-5)


def test_sft_lowers_its_loss(base_dir):
    tokenizer, model = load_tokenizer(base_dir), load_policy(base_dir)
    before = copy.deepcopy(model.state_dict())
    config = SFTConfig(epochs=2, batch_size=32, lr=1e-2, warmup_steps=2, log_every=2)
    demos = world.make_world(0, TINY).demonstrations
    engine = TorchEngine(model, Optimization(lr=config.lr, total_steps=40, warmup_steps=2))
    result = train_sft(engine, tokenizer, demos, config, seed=0)
    assert weights_changed(before, model)
    # measured over seeds 0-7 and 1-2 threads: a drop of 0.72-1.02 nats, with batch-to-batch noise of 0.04-0.08
    assert result.final_loss < result.first_loss - 0.4


def test_truncate_after_eos():
    responses = torch.tensor([[5, 2, 7, 8], [5, 6, 7, 8], [2, 9, 9, 9]])
    truncated, mask = truncate_after_eos(responses, eos_token_id=2, pad_token_id=0)
    assert truncated.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_recomputed_logprobs_match_the_sampling_distribution(sft_dir):
    """Left padding, the KV cache and the temperature agree between generate and the training forward pass: the
    log-probs and entropies PPO keeps from sampling are those a recompute gives, up to float rounding."""
    tokenizer, model = load_tokenizer(sft_dir), load_policy(sft_dir).eval()
    torch.manual_seed(0)
    prompts = ["explain briefly ocean :", "give a detailed account of space to an expert :"]
    samples = sample_responses(model, tokenizer, prompts, max_new_tokens=6, temperature=0.7, with_logprobs=True)
    logprobs, entropy = response_logprobs(
        model,
        samples.query_responses,
        samples.attention_mask,
        samples.context_length,
        temperature=0.7,
        with_entropy=True,
    )
    m = samples.response_mask.bool()
    torch.testing.assert_close(samples.logprobs[m], logprobs[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(samples.entropy[m], entropy[m], atol=1e-4, rtol=0)
    hotter = response_logprobs(
        model, samples.query_responses, samples.attention_mask, samples.context_length, temperature=1.0
    )[0]
    assert (hotter[m] - samples.logprobs[m]).abs().max() > 1e-2  # the comparison can tell temperatures apart


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_draws_what_generate_draws_without_forwards_for_finished_rows(sft_dir, temperature):
    """The same tokens as ``generate(do_sample=True)`` from the same seed, the same logits, the random stream left
    where generate leaves it; and rows that sampled their EOS leave the forwards."""
    from transformers import GenerationConfig

    from rlhf_core.modeling import MIN_SAMPLING_ROWS, encode_prompts, sample_tokens

    tokenizer, model = load_tokenizer(sft_dir), load_policy(sft_dir).eval()
    model.generation_config = GenerationConfig()
    prompts = world.make_world(0, TINY).eval_prompts
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [prompts[i % len(prompts)] for i in range(48)])
    torch.manual_seed(0)
    with torch.no_grad():
        reference = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=16,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
    after_generate = torch.rand(3)
    rows_per_forward: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kwargs: rows_per_forward.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    torch.manual_seed(0)
    responses, logits = sample_tokens(
        model,
        prompt_ids,
        prompt_mask,
        max_new_tokens=16,
        temperature=temperature,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        keep_logits=True,
    )
    assert torch.equal(torch.rand(3), after_generate)
    expected, response_mask = truncate_after_eos(
        reference.sequences[:, prompt_ids.shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    assert torch.equal(responses, expected)
    m = response_mask.bool()
    torch.testing.assert_close(logits[m], torch.stack(reference.scores, 1)[m], atol=1e-6, rtol=0)
    assert rows_per_forward[0] == 48 and MIN_SAMPLING_ROWS <= min(rows_per_forward) < 48, rows_per_forward
    assert rows_per_forward == sorted(rows_per_forward, reverse=True)


def test_finished_rows_leave_the_forward_part_by_part():
    """Rows go once a quarter of them are done, each part of the batch keeping its own rows (finished ones where it
    needs them to stay as large as the largest part, or to keep the minimum)."""
    from rlhf_core.modeling import rows_to_keep

    unfinished = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 1, 1]).bool()
    rows = torch.arange(16)
    assert rows_to_keep(unfinished, rows, 1, 4).tolist() == [0, 2, 8, 9, 12, 14, 15]
    assert rows_to_keep(unfinished, rows, 2, 4).tolist() == [0, 1, 2, 3, 4, 8, 9, 12, 14, 15]
    assert rows_to_keep(unfinished, rows, 2, 16) is None  # the minimum is all of them
    assert rows_to_keep(unfinished | (rows < 7), rows, 2, 4) is None  # 1 of 8 done in a part: not worth a copy
    assert rows_to_keep(unfinished, rows[2:], 2, 4).tolist() == [0, 1, 2, 6, 7, 10, 12, 13]  # of those given


def test_sampling_ignores_the_checkpoints_generation_settings(sft_dir, tmp_path):
    """A checkpoint that ships sampling settings (repetition penalty, n-gram blocking, min-p, suppressed tokens, a
    minimum length, a second EOS id) still samples from the plain distribution that PPO's recompute scores."""
    from transformers import GenerationConfig

    tokenizer, model = load_tokenizer(sft_dir), load_policy(sft_dir).eval()
    suppressed = tokenizer.convert_tokens_to_ids(["the", "and"])
    shipped = GenerationConfig(
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
        repetition_penalty=3.0,
        no_repeat_ngram_size=1,
        min_p=0.3,
        top_k=3,
        suppress_tokens=suppressed,
        min_new_tokens=4,
        eos_token_id=[tokenizer.eos_token_id, suppressed[0]],
    )
    model.generation_config = shipped
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_policy(tmp_path).eval()
    assert model.generation_config.repetition_penalty == 3.0
    torch.manual_seed(0)
    prompts = ["explain briefly ocean :", "give a detailed account of space to an expert :", "tell me about art :"]
    samples = sample_responses(model, tokenizer, prompts * 4, max_new_tokens=12, with_logprobs=True)
    logprobs = response_logprobs(model, samples.query_responses, samples.attention_mask, samples.context_length)[0]
    m = samples.response_mask.bool()
    torch.testing.assert_close(samples.logprobs[m], logprobs[m], atol=1e-4, rtol=0)
    assert model.generation_config.repetition_penalty == 3.0  # the checkpoint's own settings are left as they were


def test_trimmed_minibatch_scores_as_the_padded_one(sft_dir):
    """Dropping the columns that are padding in every row changes no log-prob or value on a real token."""
    from rlhf_core.modeling import token_scores, trim_padding

    tokenizer, model = load_tokenizer(sft_dir), load_policy(sft_dir).eval()
    torch.manual_seed(0)
    prompts = ["explain briefly ocean :", "give a detailed account of space to an expert :", "tell me about art :"]
    samples = sample_responses(model, tokenizer, prompts, max_new_tokens=12)
    rows = torch.tensor([0, 2])  # the longest prompt is left out: leading columns are padding in both rows
    qr, mask, ctx = samples.query_responses[rows], samples.attention_mask[rows], samples.context_length
    trimmed_qr, trimmed_mask, trimmed_ctx = trim_padding(qr, mask, ctx)
    width = trimmed_qr.shape[1] - trimmed_ctx
    assert trimmed_ctx < ctx and width == samples.response_mask[rows].sum(1).max()
    response_mask = samples.response_mask[rows, :width].bool()
    full = response_logprobs(model, qr, mask, ctx)[0][:, :width]
    trimmed = response_logprobs(model, trimmed_qr, trimmed_mask, trimmed_ctx)[0]
    torch.testing.assert_close(trimmed[response_mask], full[response_mask], atol=1e-5, rtol=0)
    critic = load_scorer(sft_dir)
    full_values = token_scores(critic, qr, mask)[:, ctx - 1 : ctx - 1 + width]
    trimmed_values = token_scores(critic, trimmed_qr, trimmed_mask)[:, trimmed_ctx - 1 : -1]
    torch.testing.assert_close(trimmed_values[response_mask], full_values[response_mask], atol=1e-5, rtol=0)


def test_length_grouped_minibatches_cover_every_row_once_and_group_by_length():
    from rlhf_core.modeling import length_grouped_batches

    lengths = torch.tensor([5, 30, 6, 29, 7, 31, 4, 28, 8, 27, 3, 32])
    minibatches = length_grouped_batches(lengths, 4, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(minibatches).tolist()) == list(range(12))
    groups = sorted(sorted(lengths[index].tolist()) for index in minibatches)
    assert groups == [[3, 4, 5, 6], [7, 8, 27, 28], [29, 30, 31, 32]]
    orders = {
        tuple(tuple(i.tolist()) for i in length_grouped_batches(lengths, 4, torch.Generator().manual_seed(s)))
        for s in range(8)
    }
    assert len(orders) > 1  # the order of the minibatches is random


def test_preferences_labels_and_agreement(sft_dir):
    tokenizer, model = load_tokenizer(sft_dir), load_policy(sft_dir).eval()
    prompts = world.make_world(0, TINY).preference_prompts[:16]
    pairs, stats = collect_preferences(
        model, tokenizer, prompts, world.gold_rewards, config=PreferenceConfig(n_pairs=800, max_new_tokens=16), seed=0
    )
    assert len(pairs) + stats["dropped_identical"] == 800
    assert all(p.chosen != p.rejected for p in pairs)
    # measured over seeds 0-7: agreement 0.686-0.705 (200 pairs gave 0.672-0.746), gold accuracy 0.77-0.80
    assert stats["labeler_agreement"] == pytest.approx(0.7, abs=0.07)
    assert stats["label_gold_accuracy"] > 0.6
    assert {p.labeler for p in pairs} == {lab.name for lab in PreferenceConfig().labelers}


def coarse_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """1 or 0 (word count a multiple of 5): a judge that scores most pairs alike, as a pass/fail checker does."""
    return [float(len(r.split()) % 5 == 0) for r in responses]


def test_a_judge_that_mostly_ties_still_gets_labelers_at_the_target_agreement(sft_dir):
    """Labelers agree on a tie half the time at any noise, so with two pairs in three tied no noise reaches 0.7 over
    all pairs: the noise is calibrated on the pairs the judge decides; dropping the ties leaves labels that agree
    0.7."""
    tokenizer, model = load_tokenizer(sft_dir), load_policy(sft_dir).eval()
    prompts = world.make_world(0, TINY).preference_prompts[:16]
    for ties in ("label", "drop"):
        config = PreferenceConfig(n_pairs=800, max_new_tokens=16, gold_ties=ties)
        pairs, stats = collect_preferences(model, tokenizer, prompts, coarse_judge, config=config, seed=0)
        assert stats["gold_tie_rate"] > 0.6 and stats["noise_at_limit"] == 0.0, stats
        sampled = len(pairs) + stats["dropped_gold_ties"] + stats["dropped_identical"]
        assert sampled == 800
    assert all(p.chosen_gold != p.rejected_gold for p in pairs) and stats["dropped_gold_ties"] > 400
    assert stats["labeler_agreement"] == pytest.approx(0.7, abs=0.07)  # as for the toy judge above


def test_validation_pairs_are_the_same_comparisons_in_every_iteration_whoever_labeled_them():
    def pair(i: int, labeler: str = "ann", flip: bool = False) -> PreferencePair:
        a, b = f"response {i} a", f"response {i} b"
        return PreferencePair(f"prompt {i}", *((b, a) if flip else (a, b)), labeler, 0.0, 0.0)

    first = [pair(i) for i in range(200)]
    train, val = split_pairs(first, 0.1)
    assert 10 < len(val) < 30 and len(train) + len(val) == 200
    relabeled = [pair(i, "bo", flip=i % 2 == 0) for i in range(200)]  # the same comparisons, other labels
    more = first + relabeled + [pair(i) for i in range(200, 400)]  # and the next iteration's pairs
    _, val_later = split_pairs(more, 0.1)

    def comparison(p: PreferencePair) -> tuple[str, ...]:
        return (p.prompt, *sorted((p.chosen, p.rejected)))

    later = {comparison(p) for p in val_later}
    assert {comparison(p) for p in val} < later  # validation pairs stay validation pairs
    assert all((comparison(p) in later) == (p in val_later) for p in more)  # every label of a comparison alike
    assert [len(side) for side in split_pairs(first[:2], 0.01)] == [1, 1]


def test_reward_model_learns_preferences_and_normalizes(sft_dir):
    tokenizer, model = load_tokenizer(sft_dir), load_scorer(sft_dir)
    before = copy.deepcopy(model.state_dict())
    # clean, learnable preferences: on-topic words beat rude ones
    w = world.make_world(1, TINY)
    pairs = []
    for i, prompt in enumerate(w.sft_prompts[:120]):
        topic_words = world.TOPICS[world.parse_prompt(prompt).topic]
        good, bad = " ".join(topic_words[:3]), " ".join([world.RUDE[i % 5]] * 2 + ["the"])
        pairs.append(
            PreferencePair(prompt, good, bad, "ann", world.gold_reward(prompt, good), world.gold_reward(prompt, bad))
        )
    train, val = split_pairs(pairs, 0.2)
    config = RewardConfig(max_epochs=3, batch_size=16, lr=2e-3, warmup_steps=2, patience=3)
    engine = TorchEngine(model, Optimization(lr=config.lr, total_steps=30, warmup_steps=2))
    result = train_reward_model(engine, tokenizer, train, val, config=config, seed=0)
    assert weights_changed(before, model)
    assert result.final_loss < result.first_loss
    assert result.val_accuracy >= 0.9 and result.val_gold_accuracy >= 0.9
    prompts, responses = [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    normalize_reward_model(model, tokenizer, prompts, responses, max_length=config.max_length)
    scores = score_texts(model, tokenizer, prompts, responses, max_length=config.max_length)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-3)


def test_pooled_rewards_are_the_last_response_token_s_score_or_the_sum_over_the_response():
    """pool_rewards against the naive reading, row by row, over padded rows and over two sequences packed in one."""
    scores = torch.randn(3, 7, dtype=torch.float64)
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 1, 0]])
    padded = torch.arange(3)[:, None].expand(3, 7)
    last = pool_rewards(scores, response_mask, padded, pooling="last")
    torch.testing.assert_close(last[:2], torch.stack([scores[0, 4], scores[1, 6]]))
    summed = pool_rewards(scores, response_mask, padded, pooling="sum")
    torch.testing.assert_close(summed[:2], torch.stack([scores[0, 2:5].sum(), scores[1, 1:].sum()]))
    # row 2 packs two sequences: the second starts (its prompt) at column 3, and column 6 is padding
    packed = torch.tensor([[0] * 7, [1] * 7, [2, 2, 2, 3, 3, 3, 0]])
    torch.testing.assert_close(pool_rewards(scores, response_mask, packed, pooling="last")[2:], scores[2, [2, 5]])
    expected = torch.stack([scores[2, 1:3].sum(), scores[2, 5]])
    torch.testing.assert_close(pool_rewards(scores, response_mask, packed, pooling="sum")[2:], expected)


@pytest.mark.parametrize("pooling", ["last", "sum"])
def test_reward_is_the_same_whatever_the_padding(sft_dir, pooling):
    tokenizer, model = load_tokenizer(sft_dir), load_scorer(sft_dir).eval()
    model.config.reward_pooling = pooling
    enc = encode_prompt_responses(tokenizer, ["explain briefly ocean :", "tell me about art :"], ["water", "paint"], 32)
    right = batch_rewards(model, enc)
    shift = 3  # the same rows, left padded instead

    def left(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
        return torch.cat([torch.full((2, shift), fill), t], 1)

    left_padded = EncodedPairs(
        left(enc.input_ids, tokenizer.pad_token_id), left(enc.attention_mask), left(enc.response_mask)
    )
    torch.testing.assert_close(batch_rewards(model, left_padded), right, atol=1e-5, rtol=0)


def test_critic_started_from_the_reward_model_predicts_in_its_normalized_units(sft_dir, tmp_path):
    """Folding the reward model's gain and bias into the critic's head: its value at the last real token is the
    normalized reward, so returns and values start in the same units; the fold survives a state-dict round trip."""
    from rlhf_core.modeling import fold_reward_normalization

    tokenizer, reward_model = load_tokenizer(sft_dir), load_scorer(sft_dir).eval()
    reward_model.config.reward_gain, reward_model.config.reward_bias = 3.5, -2.0
    reward_model.config.reward_logprob_coef = 0.4  # the log-probability feature is scaled with the head
    reward_model.save_pretrained(tmp_path)
    enc = encode_prompt_responses(tokenizer, ["explain briefly ocean :", "tell me about art :"], ["water", "paint"], 32)
    reward = batch_rewards(reward_model, enc)
    raw_critic = load_scorer(tmp_path).eval()
    critic = fold_reward_normalization(load_scorer(tmp_path).eval())
    last = (enc.attention_mask.sum(1) - 1)[:, None]  # right padded
    values = token_scores(critic, enc.input_ids, enc.attention_mask).gather(1, last).squeeze(1)
    torch.testing.assert_close(values, reward, atol=1e-5, rtol=0)
    raw = token_scores(raw_critic, enc.input_ids, enc.attention_mask).gather(1, last).squeeze(1)
    assert (raw - reward).abs().min() > 0.5  # unfolded, the critic would start off by the gain and bias
    assert batch_rewards(critic, enc).tolist() == values.tolist()  # not applied twice
    again = fold_reward_normalization(load_scorer(tmp_path).eval())
    again.load_state_dict(critic.state_dict())
    torch.testing.assert_close(
        token_scores(again, enc.input_ids, enc.attention_mask), token_scores(critic, enc.input_ids, enc.attention_mask)
    )


def test_a_summed_reward_model_starts_a_critic_at_zero(sft_dir, tmp_path):
    """A head that scores single tokens predicts no value: the critic's head starts at zero, the normalized mean."""
    from rlhf_core.modeling import fold_reward_normalization

    reward_model = load_scorer(sft_dir).eval()
    reward_model.config.reward_gain, reward_model.config.reward_bias = 3.5, -2.0
    reward_model.config.reward_pooling, reward_model.config.reward_logprob_coef = "sum", 0.4
    reward_model.save_pretrained(tmp_path)
    critic = fold_reward_normalization(load_scorer(tmp_path).eval())
    enc = encode_prompt_responses(load_tokenizer(sft_dir), ["tell me about art :"], ["paint brush"], 32)
    assert token_scores(critic, enc.input_ids, enc.attention_mask).abs().max().item() == 0.0


def test_the_log_probability_feature_is_the_tied_language_model_s_own(sft_dir):
    """With ``reward_logprob_coef``, each token's score gains that multiple of the log-probability the causal LM with
    the same weights gives it (its head is the tied input embeddings); a sequence's first token, packed after another,
    gains nothing."""
    from rlhf_core.modeling import load_policy

    tokenizer, scorer, lm = load_tokenizer(sft_dir), load_scorer(sft_dir).eval(), load_policy(sft_dir).eval()
    enc = encode_prompt_responses(tokenizer, ["explain briefly ocean :", "tell me about art :"], ["water", "a"], 32)
    with torch.no_grad():
        head_only = token_scores(scorer, enc.input_ids, enc.attention_mask)
        scorer.config.reward_logprob_coef = 0.5
        with_feature = token_scores(scorer, enc.input_ids, enc.attention_mask)
        logits = lm(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    naive = logits[:, :-1].log_softmax(-1).gather(-1, enc.input_ids[:, 1:, None]).squeeze(-1)
    real = enc.attention_mask.bool()
    expected = head_only[:, 1:] + 0.5 * naive
    torch.testing.assert_close(with_feature[:, 1:][real[:, 1:]], expected[real[:, 1:]], atol=1e-5, rtol=0)
    packed_ids = enc.input_ids[real][None]  # both sequences in one row, positions restarting at the second
    first = int(real[0].sum())
    positions = torch.cat([torch.arange(first), torch.arange(packed_ids.shape[1] - first)])[None]
    with torch.no_grad():
        packed = token_scores(scorer, packed_ids, position_ids=positions)
        scorer.config.reward_logprob_coef = 0.0
        packed_head_only = token_scores(scorer, packed_ids, position_ids=positions)
    assert packed[0, first].item() == packed_head_only[0, first].item()  # no prediction across two sequences
    assert (packed[0, first + 1 :] - packed_head_only[0, first + 1 :]).abs().min() > 0


@pytest.mark.parametrize("pooling", ["last", "sum"])
def test_both_reward_paths_score_samples_as_the_reward_model_was_trained(sft_dir, pooling):
    """Sampled ids read directly (same vocabulary) and decoded text re-tokenized (a tokenizer of its own) give the
    same scores: each response cut to the reward model's max_length and ending in one EOS, with or without one."""
    tokenizer, reward_model = load_tokenizer(sft_dir), load_scorer(sft_dir).eval()
    reward_model.config.reward_pooling = pooling
    policy = load_policy(sft_dir).eval()
    torch.manual_seed(0)
    prompts = ["explain briefly ocean :", "give a detailed account of space to an expert :", "tell me about art :"]
    samples = sample_responses(policy, tokenizer, prompts * 4, max_new_tokens=10)
    assert not samples.has_eos.all() and samples.has_eos.any()
    for max_length in (12, 64):  # cutting most responses, and none
        reward_model.config.reward_max_length = max_length
        direct = RewardFunction(reward_model)(samples)
        retokenized = RewardFunction(reward_model, tokenizer)(samples)
        torch.testing.assert_close(direct, retokenized, atol=1e-5, rtol=0)
        expected = score_texts(reward_model, tokenizer, samples.prompts, samples.texts, max_length=max_length)
        torch.testing.assert_close(direct, expected, atol=1e-5, rtol=0)


def test_a_summed_reward_is_credited_to_the_tokens_that_earned_it(sft_dir):
    """reward_credit: each response token gets the head's score at it (times the gain), the last one the EOS's and
    the bias too; rows sum to the sample's reward, whether the response ended, was cut or ran out of tokens."""
    from rlhf_core.modeling import reward_credit, reward_inputs

    tokenizer, reward_model = load_tokenizer(sft_dir), load_scorer(sft_dir).eval()
    reward_model.config.reward_pooling, reward_model.config.reward_gain, reward_model.config.reward_bias = "sum", 2, -1
    torch.manual_seed(0)
    prompts = ["explain briefly ocean :", "give a detailed account of space to an expert :", "tell me about art :"]
    samples = sample_responses(load_policy(sft_dir).eval(), tokenizer, prompts * 4, max_new_tokens=10)
    for max_length in (12, 64):
        reward_model.config.reward_max_length = max_length
        credit = reward_credit(reward_model, samples)
        torch.testing.assert_close(credit.sum(1), RewardFunction(reward_model)(samples), atol=1e-5, rtol=0)
        batch = reward_inputs(samples, max_length)
        scores = token_scores(reward_model, **batch.model_inputs())[:, samples.context_length :]
        for row in range(len(prompts) * 4):
            read = int(batch.response_mask[row].sum())  # response tokens read, its EOS included
            last = int(samples.response_mask[row].sum()) - 1
            naive = torch.zeros(samples.responses.shape[1])
            naive[: read - 1] = 2 * scores[row, : read - 1]
            naive[min(read - 1, last)] += 2 * scores[row, read - 1]
            naive[last] -= 1
            torch.testing.assert_close(credit[row], naive, atol=1e-5, rtol=0)
    assert RewardFunction(reward_model).credits_tokens
    assert not RewardFunction(reward_model, tokenizer).credits_tokens  # re-tokenized: no token of the policy's
    reward_model.config.reward_pooling = "last"
    assert not RewardFunction(reward_model).credits_tokens


def test_a_warm_started_reward_model_trains_as_many_steps_as_the_latest_pairs_ask(sft_dir, tmp_path):
    """reward.epoch_size: latest makes each pass as long as the newest preference set, drawn from all of them."""
    from infra.artifacts import PAIRS_FILE
    from infra.datasets import write_rows
    from rlhf_core.modeling import batch_schedule
    from tasks.reward import run_reward

    schedule = batch_schedule(50, 8, 3, seed=0, epoch_size=20)
    passes = [torch.cat(schedule[i * 3 : i * 3 + 3]) for i in range(3)]
    assert [len(b) for b in schedule] == [8, 8, 4] * 3 and all(len(set(p.tolist())) == 20 for p in passes)
    assert len({tuple(p.tolist()) for p in passes}) == 3  # each pass draws afresh
    w = world.make_world(1, TINY)
    for i, prompts in enumerate((w.sft_prompts[:64], w.sft_prompts[64:96])):
        rows = [PreferencePair(p, "sure " + p.split()[-2], "ugh", "ann", 1.0, -3.0).__dict__ for p in prompts]
        (tmp_path / f"preferences-{i}").mkdir()
        write_rows(tmp_path / f"preferences-{i}" / PAIRS_FILE, rows)
    dirs = [tmp_path / "preferences-0", tmp_path / "preferences-1"]
    steps = {}
    for epoch_size in ("all", "latest"):
        config = RewardConfig(max_epochs=2, batch_size=8, patience=100, val_fraction=0.25, epoch_size=epoch_size)
        steps[epoch_size] = run_reward(sft_dir, dirs, tmp_path / epoch_size, config=config, seed=0)["steps"]
    train_pairs = 96 - round(96 * 0.25)  # about a quarter held out for validation
    assert steps["all"] == pytest.approx(2 * train_pairs / 8, abs=2)
    assert steps["latest"] == pytest.approx(2 * train_pairs / 3 / 8, abs=2)  # the latest set is a third of all


def test_ppo_raises_the_reward_it_optimizes(sft_dir):
    tokenizer = load_tokenizer(sft_dir)
    policy, reference = load_policy(sft_dir), load_policy(sft_dir).eval()
    reward_model, critic = load_scorer(sft_dir).eval(), load_scorer(sft_dir)
    # a reward the policy can find quickly: shorter responses score higher
    torch.nn.init.zeros_(reward_model.score.weight)
    reward_model.config.reward_bias = 0.0
    before = copy.deepcopy(policy.state_dict())
    prompts = world.make_world(0, TINY).ppo_prompts[:32]
    config = PPOConfig(
        steps=12,
        rollout_batch_size=16,
        minibatch_size=8,
        epochs=2,
        lr=2e-3,
        max_new_tokens=8,
        kl_coef=0.01,
        missing_eos_penalty=2.0,
        target_kl=None,
    )
    models = ppo_models(policy, critic, reference, reward_model, config)
    result = train_ppo(models, tokenizer, prompts, config, seed=0)
    history = result.history
    assert weights_changed(before, policy)
    # the only reward is avoiding the missing-EOS penalty, so the policy learns to finish. Measured over seeds 0-7
    # and 1-2 threads: 0.32-0.45 of held-out samples end before, 0.98-1.0 after (a rise of 0.53-0.68)
    assert held_out_eos_rate(policy, tokenizer, 8) > held_out_eos_rate(reference, tokenizer, 8) + 0.2
    first = history[0]
    assert sum(h["kl"] for h in history[-3:]) > 0
    expected = {
        "kl",
        "reward",
        "entropy",
        "response_length",
        "response_length_p95",
        "eos_rate",
        "clipfrac",
        "approx_kl",
        "value_loss",
        "policy_loss",
        "explained_variance",
        "kl_coef",
    }
    assert expected <= set(first)


def test_ppo_raises_a_summed_reward_credited_token_by_token(sft_dir):
    tokenizer = load_tokenizer(sft_dir)
    policy, reference = load_policy(sft_dir), load_policy(sft_dir).eval()
    reward_model, critic = load_scorer(sft_dir).eval(), load_scorer(sft_dir)
    torch.manual_seed(100)
    torch.nn.init.normal_(reward_model.score.weight)  # a random judge of each token in its context, summed
    reward_model.config.reward_pooling = "sum"
    config = PPOConfig(
        steps=12, rollout_batch_size=16, minibatch_size=8, epochs=2, lr=2e-3, max_new_tokens=8, kl_coef=0.01,
        missing_eos_penalty=0.0, target_kl=None, dense_rewards=True,
    )  # fmt: skip
    models = ppo_models(policy, critic, reference, reward_model, config)
    history = train_ppo(models, tokenizer, world.make_world(0, TINY).ppo_prompts[:32], config, seed=0).history
    first, last = (sum(h["reward"] for h in part) / 3 for part in (history[:3], history[-3:]))
    # measured for six random heads (torch seeds 100-105): a rise of 28-86 in these units, 17-62 with the whole
    # score on the last token instead
    assert last > first + 10


def test_target_kl_stops_an_update_early(sft_dir):
    tokenizer = load_tokenizer(sft_dir)
    policy, reference = load_policy(sft_dir), load_policy(sft_dir).eval()
    reward_model, critic = load_scorer(sft_dir).eval(), load_scorer(sft_dir)
    config = PPOConfig(
        steps=1, rollout_batch_size=16, minibatch_size=4, epochs=4, lr=5e-2, max_new_tokens=8, target_kl=1e-4
    )
    models = ppo_models(policy, critic, reference, reward_model, config)
    result = train_ppo(models, tokenizer, world.make_world(0, TINY).ppo_prompts[:16], config, seed=0)
    metrics = result.history[0]
    assert metrics["early_stopped"] == 1.0
    assert metrics["minibatch_updates"] < 16


def test_a_tied_head_is_saved_once(base_dir, tmp_path):
    """The toy Llama's head is its input embeddings: a full state dict holds it twice (as copies), the saved file
    once, and the model loads with the head tied again."""
    from safetensors.torch import load_file

    from rlhf_core.engine import without_tied_copies

    model = load_policy(base_dir)
    weights = TorchEngine(model, Optimization(lr=1e-3, total_steps=1)).full_state_dict()
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(weights)
    model.save_pretrained(tmp_path, state_dict=without_tied_copies(model, weights))
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    again = load_policy(tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
