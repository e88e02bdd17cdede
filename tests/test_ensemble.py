"""Reward-model ensembles: the aggregation functions, and an ensemble trained, saved, loaded and scored."""

import pytest
import torch
from conftest import TINY_WORLD

from infra.artifacts import PAIRS_FILE
from infra.datasets import write_rows
from rlhf_core import world
from rlhf_core.config import RewardConfig
from rlhf_core.losses import aggregate_credit, aggregate_rewards
from rlhf_core.modeling import load_policy, load_tokenizer, sample_responses
from rlhf_core.preferences import PreferencePair
from rlhf_core.reward import ENSEMBLE_DIR, load_reward_function
from tasks.reward import run_reward


def test_aggregates_on_a_small_ensemble():
    scores = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]])  # (K=2 members, B=3 samples)
    assert aggregate_rewards(scores, "mean").tolist() == [2.0, 0.0, 0.0]
    assert aggregate_rewards(scores, "min").tolist() == [1.0, 0.0, -2.0]
    # population std over members: 1, 0, 2
    assert aggregate_rewards(scores, "mean_minus_std", 0.5).tolist() == [1.5, 0.0, -1.0]
    assert aggregate_rewards(scores[:1], "mean_minus_std").tolist() == scores[0].tolist()  # one member: itself
    with pytest.raises(ValueError, match="'mean', 'min' or 'mean_minus_std'"):
        aggregate_rewards(scores, "max")


@pytest.mark.parametrize("how", ["mean", "min", "mean_minus_std"])
def test_an_ensemble_s_credit_sums_to_its_aggregate_and_is_the_members_mean_before_the_last_token(how):
    credit = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))  # (K, B, T)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    credit = credit * mask
    rewards = aggregate_rewards(credit.sum(-1), how)
    aggregated = aggregate_credit(credit, rewards, mask)
    torch.testing.assert_close(aggregated.sum(1), rewards)
    torch.testing.assert_close(aggregated[0, :4], credit.mean(0)[0, :4])  # the last token alone takes the difference
    assert aggregated[mask == 0].abs().max() == 0


def test_an_ensemble_trains_saves_loads_and_scores_conservatively(sft_dir, tmp_path):
    w = world.make_world(1, TINY_WORLD)
    rows = []
    for i, prompt in enumerate(w.sft_prompts[:96]):
        good, bad = " ".join(world.TOPICS[world.parse_prompt(prompt).topic][:3]), " ".join([world.RUDE[i % 5]] * 2)
        pair = PreferencePair(prompt, good, bad, "ann", world.gold_reward(prompt, good), world.gold_reward(prompt, bad))
        rows.append(pair.__dict__)
    (tmp_path / "preferences").mkdir()
    write_rows(tmp_path / "preferences" / PAIRS_FILE, rows)
    config = RewardConfig(
        ensemble_size=3, bootstrap=True, aggregate="mean_minus_std", uncertainty_coef=2.0, max_epochs=1, batch_size=16
    )
    metrics = run_reward(sft_dir, [tmp_path / "preferences"], tmp_path / "reward", config=config, seed=0)
    assert sorted(p.name for p in (tmp_path / "reward" / ENSEMBLE_DIR).iterdir()) == ["member-1", "member-2"]
    assert 0 <= metrics["ensemble_val_accuracy"] <= 1 and metrics["ensemble_disagreement"] > 0

    tokenizer = load_tokenizer(sft_dir)
    reward = load_reward_function(tmp_path / "reward", tokenizer)
    assert len(reward.members) == 2
    torch.manual_seed(0)
    samples = sample_responses(load_policy(sft_dir).eval(), tokenizer, w.eval_prompts[:16], 8)
    members = reward.member_scores(samples)
    assert members.shape == (3, 16)
    assert not torch.equal(members[0], members[1])  # other seeds and resamples: other reward models
    expected = members.mean(0) - 2.0 * members.std(0, correction=0)
    torch.testing.assert_close(reward(samples), expected)
    assert (reward(samples) <= members.mean(0)).all()


def test_ppo_reports_the_ensembles_disagreement(sft_dir):
    from test_phases import ppo_models

    from rlhf_core.config import PPOConfig
    from rlhf_core.modeling import load_scorer
    from rlhf_core.ppo import train_ppo
    from rlhf_core.reward import RewardFunction

    tokenizer = load_tokenizer(sft_dir)
    torch.manual_seed(0)
    first, second = load_scorer(sft_dir).eval(), load_scorer(sft_dir).eval()  # two fresh heads: two opinions
    config = PPOConfig(steps=2, rollout_batch_size=8, minibatch_size=8, epochs=1, max_new_tokens=6)
    models = ppo_models(load_policy(sft_dir), load_scorer(sft_dir), load_policy(sft_dir).eval(), first, config)
    models.reward = RewardFunction(first, members=[second])
    history = train_ppo(models, tokenizer, world.make_world(0, TINY_WORLD).ppo_prompts[:8], config, seed=0).history
    assert all(row["rm_disagreement"] > 0 for row in history)
    models.reward = RewardFunction(first)
    assert (
        "rm_disagreement"
        not in train_ppo(models, tokenizer, ["explain briefly ocean :"] * 8, config, seed=0).history[0]
    )
