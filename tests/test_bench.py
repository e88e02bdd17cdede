"""The benchmarks wrap the functions a PPO step calls to time its parts: a renamed function must break a test here,
not the next measurement."""

import json
import subprocess
import sys
from pathlib import Path

from test_flow import TINY

from flows.config import load_config
from infra.artifacts import PhaseInputs
from tasks.data import write_data
from tasks.preferences import run_preferences
from tasks.reward import reward_start, run_reward
from tasks.sft import run_sft

ROOT = Path(__file__).resolve().parents[1]


def test_ppo_vs_trl_times_every_part_of_our_step(tmp_path: Path):
    # a reward model TRL reads, as the bench makes it (bench.ppo_vs_trl.TRL_READABLE_SETTINGS; bench is no package)
    config = load_config(None, [*TINY, "reward.pooling=last", "reward.logprob_coef=0"])
    write_data(tmp_path / "data", 0, config.data)
    run_sft(tmp_path / "data" / "base_model", tmp_path / "data", tmp_path / "sft", config=config.sft, seed=0)
    inputs = PhaseInputs(data=tmp_path / "data", policy=tmp_path / "sft")
    run_preferences(inputs, tmp_path / "preferences", config=config.preferences, seed=1)
    start = reward_start(None, tmp_path / "data", tmp_path / "sft", config.reward)
    run_reward(start, [tmp_path / "preferences"], tmp_path / "reward", config=config.reward, seed=1)
    models = {"data": str(tmp_path / "data"), "policy": str(tmp_path / "sft"), "reward": str(tmp_path / "reward")}

    side = ["--side", "ours", "--models", json.dumps(models), "--steps", "2", "--threads", "1"]
    command = [sys.executable, "-m", "bench.ppo_vs_trl", *side, "--out", str(tmp_path / "ours.json")]
    subprocess.run(command, check=True, cwd=ROOT)

    result = json.loads((tmp_path / "ours.json").read_text())
    assert len(result["seconds_per_step"]) == len(result["parts"]) == 2
    expected = {
        "rollout/generate",
        "rollout/policy/reference forward",
        "rollout/critic forward",
        "rollout/reward model",
        "update/backward",
        "update/optimizer step",
    }
    for parts in result["parts"]:
        assert expected <= parts.keys(), expected - parts.keys()
        assert all(parts[name] > 0 for name in expected)
        assert 0 < parts["trained_real"] <= parts["trained_padded"]
