"""The toy world: deterministic, a gold reward that trades attributes off, labelers near their agreement."""

import random
import statistics

import pytest

from rlhf_core import world
from rlhf_core.labelers import (
    agreement_stats,
    calibrate_noise_scale,
    cohen_kappa,
    default_labelers,
    draw_labels,
    gold_per_word,
    preference_probability,
)


def test_world_is_deterministic_from_its_seed():
    a, b, c = world.make_world(3), world.make_world(3), world.make_world(4)
    assert a == b
    assert a.demonstrations != c.demonstrations


def test_prompt_splits_are_disjoint_and_cover_topics_and_styles():
    w = world.make_world(0)
    splits = [set(w.sft_prompts), set(w.preference_prompts), set(w.ppo_prompts), set(w.eval_prompts)]
    assert sum(map(len, splits)) == len(set().union(*splits))
    assert len(w.eval_prompts) >= 200
    assert len(world.TOPICS) >= 20 and len(set(world.STYLES.values())) >= 3
    assert {world.parse_prompt(p).topic for p in w.eval_prompts} == set(world.TOPICS)


def test_gold_reward_trades_attributes_off():
    prompt = "explain briefly ocean :"  # ideal length 5
    good = world.gold_reward(prompt, "sure water waves salt tide")
    weights = world.GoldRewardConfig()
    assert good == pytest.approx(weights.polite * 0.5 + 4 * weights.on_topic)
    assert world.gold_reward(prompt, "sure water waves salt tide") > world.gold_reward(prompt, "water waves")
    assert world.gold_reward(prompt, "sure water waves salt stupid") < good  # rudeness
    assert world.gold_reward(prompt, "sure water waves salt lava") < good  # off-topic
    assert world.gold_reward(prompt, "sure water water water water") < good  # repetition
    long = "sure water waves salt tide coral fish shore deep , the a and is of with"
    assert world.gold_reward(prompt, long) < world.gold_reward("describe thoroughly ocean :", long)  # length
    polite = [world.gold_reward(prompt, " ".join(world.POLITE[:n])) for n in range(4)]
    gains = [b - a for a, b in zip(polite, polite[1:], strict=False)]
    assert gains[0] > gains[1] > gains[2] > 0  # diminishing returns


def test_gold_components_name_each_attribute_and_sum_to_the_gold_reward():
    prompt = "describe ocean :"  # ideal length 13: six words fall 5 short, beyond the tolerance of 2
    response = "sure water water lava ugh glad"
    weights = world.GoldRewardConfig()
    parts = world.gold_components(prompt, response)
    assert parts == pytest.approx(
        {
            "on_topic": weights.on_topic,
            "off_topic": weights.off_topic,
            "rude": weights.rude,
            "repetition": weights.repetition,
            "polite": weights.polite * 0.75,
            "length": weights.length * 5,
        }
    )
    assert sum(parts.values()) == pytest.approx(world.gold_reward(prompt, response))


def test_unknown_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.gold_reward("hello there", "water")


def test_demonstrations_are_mixed_quality():
    w = world.make_world(0)
    golds = [world.gold_reward(p, r) for p, r in w.demonstrations[:2000]]
    assert statistics.pstdev(golds) > 2.0
    assert min(golds) < 0 < max(golds)


def test_tokenizer_round_trips_and_adds_bos():
    tokenizer = world.build_tokenizer()
    ids = tokenizer("explain briefly ocean :")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "explain briefly ocean :"
    assert {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id} == {0, 1, 2}


def test_labelers_agree_near_target_and_kappa_is_consistent():
    rng = random.Random(0)
    golds = [(rng.gauss(0, 3), rng.gauss(0, 3)) for _ in range(3000)]
    lengths = [(rng.randint(3, 20), rng.randint(3, 20)) for _ in range(3000)]
    labelers = default_labelers()
    scale = calibrate_noise_scale(golds, lengths, labelers, 0.7)
    stats = agreement_stats(draw_labels(golds, lengths, labelers, noise_scale=scale, rng=rng))
    assert stats["labeler_agreement"] == pytest.approx(0.7, abs=0.02)
    assert stats["labeler_kappa"] == pytest.approx(2 * stats["labeler_agreement"] - 1, abs=0.05)


def test_a_labelers_taste_for_length_weighs_the_same_on_any_judges_scale():
    """A judge scoring in [0, 1] on answers of 60 words is the toy world's judge rescaled: the labelers' length bias,
    in gold standard deviations per word-count standard deviation, gives the same preferences on both, where a bias
    in gold units per word would let length outweigh the judge."""
    rng = random.Random(0)
    toy_golds = [(rng.gauss(0, 2), rng.gauss(0, 2)) for _ in range(500)]
    toy_lengths = [(rng.randint(5, 15), rng.randint(5, 15)) for _ in range(500)]
    golds = [(a / 20 + 0.5, b / 20 + 0.5) for a, b in toy_golds]
    lengths = [(6 * a, 6 * b) for a, b in toy_lengths]
    cy = default_labelers()[2]
    assert gold_per_word(golds, lengths) == pytest.approx(gold_per_word(toy_golds, toy_lengths) / 120)
    for args_toy, args in zip(zip(toy_golds, toy_lengths, strict=True), zip(golds, lengths, strict=True), strict=True):
        toy = preference_probability(*args_toy, cy, 1.0, word_value=gold_per_word(toy_golds, toy_lengths))
        assert preference_probability(*args, cy, 1 / 20, word_value=gold_per_word(golds, lengths)) == pytest.approx(toy)
    assert gold_per_word([(1.0, 0.0)], [(10, 10)]) == 0.0  # lengths that do not vary carry no taste


def test_cohen_kappa_by_hand():
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    # observed 0.5, chance 0.5 -> 0
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.0)
