"""Training-health alarms: each raised by a constructed history with its failure, none by a healthy one, and the
PPO loop reporting (or stopping on) them."""

import pytest
from conftest import TINY_WORLD
from test_phases import ppo_models

from rlhf_core import world
from rlhf_core.alarms import ALARMS, AlarmConfig, check_alarms
from rlhf_core.checkpoint import DivergenceError
from rlhf_core.config import PPOConfig
from rlhf_core.modeling import load_policy, load_scorer, load_tokenizer
from rlhf_core.ppo import train_ppo

CONFIG = AlarmConfig(window=3)


def history(n: int = 10, **trends: tuple[float, float]) -> list[dict[str, float]]:
    """``n`` steps of a healthy phase (reward and gold up, entropy and length steady), with some metrics moving
    linearly from a start to an end value instead."""
    healthy = {"reward": (0.0, 1.0), "gold_reward": (-1.0, 0.0), "entropy": (2.0, 1.8), "response_length": (12, 13)}
    rows = []
    for i in range(n):
        rows.append({k: a + (b - a) * i / (n - 1) for k, (a, b) in (healthy | trends).items()})
    return rows


def names(rows: list[dict[str, float]]) -> set[str]:
    return {alarm.name for alarm in check_alarms(rows, CONFIG)}


def test_a_healthy_phase_raises_nothing():
    assert names(history()) == set()
    assert names([{k: v for k, v in row.items() if k != "gold_reward"} for row in history()]) == set()


def test_length_hacking_fires_when_length_grows_without_gold():
    assert names(history(response_length=(10, 25), gold_reward=(-1.0, -1.0))) == {"length_hacking"}
    assert names(history(response_length=(10, 25))) == set()  # longer, and better by gold: not hacking
    without_gold = [{k: v for k, v in row.items() if k != "gold_reward"} for row in history(response_length=(10, 25))]
    assert names(without_gold) == {"length_hacking"}  # no gold judge: growth alone is the signal


def test_entropy_collapse_fires_below_the_floor_or_on_a_steep_fall():
    assert names(history(entropy=(2.0, 0.1))) == {"entropy_collapse"}
    assert names(history(entropy=(0.3, 0.15))) == {"entropy_collapse"}  # below the floor
    assert names(history(entropy=(2.0, 1.2))) == set()  # a fall of 40% is within entropy_drop


def test_reward_exploitation_fires_when_proxy_rises_and_gold_falls():
    [alarm] = check_alarms(history(reward=(0.0, 2.0), gold_reward=(0.5, -0.5)), CONFIG)
    assert alarm.name == "reward_exploitation" and alarm.step == 10 and "gold reward" in alarm.message
    assert names(history(reward=(0.0, 2.0), gold_reward=(0.5, 0.4))) == set()  # gold barely moved


def test_reward_exploitation_fires_when_the_ensemble_disagrees_more_as_its_score_rises():
    assert names(history(rm_disagreement=(0.2, 0.6), gold_reward=(0.0, 0.1))) == {"reward_exploitation"}
    assert names(history(rm_disagreement=(0.2, 0.25))) == set()  # steady disagreement: healthy
    assert names(history(rm_disagreement=(0.2, 0.6), reward=(1.0, 0.5))) == set()  # the score did not rise


def test_alarms_wait_for_two_windows():
    assert check_alarms(history(5, entropy=(2.0, 0.0)), CONFIG) == []
    assert set(ALARMS) == {"length_hacking", "entropy_collapse", "reward_exploitation"}


@pytest.mark.parametrize("stop", [False, True])
def test_ppo_reports_each_alarm_once_or_stops_on_it(sft_dir, stop):
    tokenizer = load_tokenizer(sft_dir)
    policy, reference = load_policy(sft_dir), load_policy(sft_dir).eval()
    reward_model, critic = load_scorer(sft_dir).eval(), load_scorer(sft_dir)
    prompts = world.make_world(0, TINY_WORLD).ppo_prompts[:16]
    # an entropy floor no policy is under: the alarm fires at the first step with two windows
    alarms = AlarmConfig(window=2, entropy_floor=100.0)
    config = PPOConfig(
        steps=6, rollout_batch_size=8, minibatch_size=8, epochs=1, max_new_tokens=6, alarms=alarms, stop_on_alarm=stop
    )
    reported = []
    models = ppo_models(policy, critic, reference, reward_model, config)
    if stop:
        with pytest.raises(DivergenceError, match="alarm entropy_collapse at step 4"):
            train_ppo(models, tokenizer, prompts, config, seed=0, on_alarm=reported.append)
    else:
        result = train_ppo(models, tokenizer, prompts, config, seed=0, on_alarm=reported.append)
        assert [(a.name, a.step) for a in result.alarms] == [("entropy_collapse", 4)]
        assert len(result.history) == 6
    assert [(a.name, a.step) for a in reported] == [("entropy_collapse", 4)]
