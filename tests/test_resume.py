"""Resume inside a phase: a loop killed after a checkpoint continues from it and ends where an uninterrupted
run ends; numerical trouble stops a phase and keeps its last good checkpoint; a SIGKILLed PPO phase of the
real pipeline resumes, with MLflow's step history whole."""

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_WORLD
from mlflow.tracking import MlflowClient
from test_flow import RLHF, TINY, summary
from test_phases import ppo_models

from infra.catalog import PPO
from infra.checkpoints import StoreCheckpointer, checkpoint_prefix
from infra.storage import LocalStore
from rlhf_core import world
from rlhf_core.checkpoint import DivergenceError
from rlhf_core.config import PPOConfig, RewardConfig, SFTConfig
from rlhf_core.engine import Optimization, TorchEngine
from rlhf_core.modeling import load_policy, load_scorer, load_tokenizer
from rlhf_core.ppo import train_ppo
from rlhf_core.preferences import PreferencePair
from rlhf_core.reward import split_pairs, train_reward_model
from rlhf_core.sft import train_sft
from tasks.common import PhaseLog, RunContext, checkpointing, should_retry

KEY = "pipelines/test/phase-0123456789ab"


class Crash(Exception):
    """Stands in for the process dying after some steps."""


def recorder(crash_at: int | None = None):
    steps: list[int] = []

    def on_metrics(metrics: dict, step: int) -> None:
        steps.append(step)
        if step == crash_at:
            raise Crash

    return steps, on_metrics


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)


def test_sft_resumes_from_its_last_complete_checkpoint(base_dir, tmp_path):
    tokenizer = load_tokenizer(base_dir)
    demos = world.make_world(0, TINY_WORLD).demonstrations[:320]
    config = SFTConfig(epochs=2, batch_size=32, lr=1e-2, warmup_steps=2, log_every=1)  # 20 steps

    def run(checkpointer, on_metrics):
        model = load_policy(base_dir)
        engine = TorchEngine(model, Optimization(lr=config.lr, total_steps=20, warmup_steps=2))
        return model, train_sft(
            engine, tokenizer, demos, config, seed=0, on_metrics=on_metrics, checkpointer=checkpointer
        )

    clean, clean_result = run(None, None)
    store = LocalStore(tmp_path)
    steps, crashing = recorder(crash_at=11)
    with pytest.raises(Crash):
        run(StoreCheckpointer(store, KEY, every=4), crashing)
    assert steps == list(range(1, 12))
    # an upload cut short after the last good checkpoint: no manifest, so it does not count
    (tmp_path / checkpoint_prefix(KEY) / "step-00000012").mkdir()
    (tmp_path / checkpoint_prefix(KEY) / "step-00000012" / "model.safetensors").write_bytes(b"half")
    resumed_steps, on_metrics = recorder()
    resumed, result = run(StoreCheckpointer(store, KEY, every=4), on_metrics)
    assert resumed_steps == list(range(9, 21))  # from the checkpoint at step 8, no step twice
    assert_same_weights(resumed, clean)
    assert result.final_loss == pytest.approx(clean_result.final_loss, abs=1e-5)
    assert result.first_loss == pytest.approx(clean_result.first_loss)


def test_reward_training_resumes_with_its_best_model(sft_dir, tmp_path):
    tokenizer = load_tokenizer(sft_dir)
    w = world.make_world(1, TINY_WORLD)
    pairs = []
    for i, prompt in enumerate(w.sft_prompts[:160]):
        good, bad = " ".join(world.TOPICS[world.parse_prompt(prompt).topic][:3]), f"{world.RUDE[i % 5]} the"
        pairs.append(
            PreferencePair(prompt, good, bad, "ann", world.gold_reward(prompt, good), world.gold_reward(prompt, bad))
        )
    train, val = split_pairs(pairs, 0.2)
    config = RewardConfig(max_epochs=3, batch_size=16, lr=2e-3, warmup_steps=2, patience=10, evals_per_epoch=2)

    def run(checkpointer, on_metrics):
        torch.manual_seed(0)  # the fresh scalar head
        model = load_scorer(sft_dir)
        engine = TorchEngine(model, Optimization(lr=config.lr, total_steps=24, warmup_steps=2))
        return model, train_reward_model(
            engine, tokenizer, train, val, config=config, seed=0, on_metrics=on_metrics, checkpointer=checkpointer
        )

    clean, clean_result = run(None, None)
    with pytest.raises(Crash):
        run(StoreCheckpointer(LocalStore(tmp_path), KEY, every=5), recorder(crash_at=16)[1])
    steps, on_metrics = recorder()
    resumed, result = run(StoreCheckpointer(LocalStore(tmp_path), KEY, every=5), on_metrics)
    assert steps == [16, 20, 24]  # validation every 4 steps, resumed from step 15
    assert_same_weights(resumed, clean)  # the best model restored from the checkpoint too
    assert (result.val_accuracy, result.steps) == (clean_result.val_accuracy, clean_result.steps)


def ppo_setup(sft_dir):
    tokenizer = load_tokenizer(sft_dir)
    reference, reward_model = load_policy(sft_dir).eval(), load_scorer(sft_dir).eval()
    prompts = world.make_world(0, TINY_WORLD).ppo_prompts[:32]
    config = PPOConfig(
        steps=8, rollout_batch_size=8, minibatch_size=4, epochs=2, lr=2e-3, max_new_tokens=10, kl_coef=0.05
    )

    def run(checkpointer, on_metrics, config=config):
        torch.manual_seed(0)  # the critic's fresh scalar head
        policy, critic = load_policy(sft_dir), load_scorer(sft_dir)
        result = train_ppo(
            ppo_models(policy, critic, reference, reward_model, config),
            tokenizer,
            prompts,
            config,
            seed=0,
            gold_fn=world.gold_rewards,
            on_metrics=on_metrics,
            checkpointer=checkpointer,
        )
        return policy, result

    return run


def test_ppo_resumes_with_rngs_prompt_order_and_kl_controller(sft_dir, tmp_path):
    run = ppo_setup(sft_dir)
    clean, clean_result = run(None, None)
    with pytest.raises(Crash):
        run(StoreCheckpointer(LocalStore(tmp_path), KEY, every=3), recorder(crash_at=5)[1])
    steps, on_metrics = recorder()
    resumed, result = run(StoreCheckpointer(LocalStore(tmp_path), KEY, every=3), on_metrics)
    assert steps == [4, 5, 6, 7, 8]
    assert_same_weights(resumed, clean)
    assert result.kl_coef == pytest.approx(clean_result.kl_coef)
    assert len(result.history) == 8
    for ours, theirs in zip(result.history, clean_result.history, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-4)


def test_a_kl_blow_up_stops_ppo_and_keeps_the_last_good_checkpoint(sft_dir, tmp_path):
    run = ppo_setup(sft_dir)
    context = RunContext(store_uri=str(tmp_path), prefix="pipelines/test")
    # no KL penalty and a high learning rate: the KL to the reference runs away from the first update on
    config = PPOConfig(
        steps=8, rollout_batch_size=8, minibatch_size=4, epochs=2, lr=1e-2, max_new_tokens=10, kl_coef=0.0
    )
    clean = run(None, None, config)[1].history
    # a bound the clean run passes only after step 2, where the first checkpoint (every 2 steps) is. Measured over
    # seeds 0-7: the largest KL of steps 3-8 lies 1.2-3.0 nats above the largest of steps 1-2, so 0.5 above it is
    # passed in every run
    bound = max(h["kl"] for h in clean[:2]) + 0.5
    first_past = next(i for i, h in enumerate(clean, start=1) if h["kl"] > bound)
    config = config.model_copy(update={"max_kl": bound})
    last_good = (first_past - 1) // 2 * 2
    diverged = rf"ppo: KL to the reference is .* at step {first_past}, past ppo.max_kl"
    with (
        pytest.raises(DivergenceError, match=diverged),
        checkpointing(context, KEY, PhaseLog(PPO, None, 8), every=2) as checkpointer,
    ):
        run(checkpointer, None, config)
    assert (tmp_path / checkpoint_prefix(KEY) / f"step-{last_good:08d}" / "MANIFEST.json").exists()
    try:
        with checkpointing(context, KEY + "x", PhaseLog(PPO, None, 8), every=2) as checkpointer:
            run(checkpointer, None, config)
    except DivergenceError as e:
        assert "the last good checkpoint is kept: " in str(e) and str(e).endswith(f"step-{last_good:08d}")
        assert not should_retry(None, None, type("State", (), {"data": e})())  # retrying would diverge again


def test_a_nan_loss_stops_sft_with_the_step(base_dir):
    tokenizer, model = load_tokenizer(base_dir), load_policy(base_dir)
    torch.nn.init.constant_(model.model.norm.weight, math.nan)
    config = SFTConfig(epochs=1, batch_size=32)
    with pytest.raises(DivergenceError, match=r"sft: loss is nan at step 1; try a lower learning rate"):
        engine = TorchEngine(model, Optimization(lr=1e-3, total_steps=10))
        train_sft(engine, tokenizer, world.make_world(0, TINY_WORLD).demonstrations, config, seed=0)


@pytest.mark.slow
def test_a_sigkilled_ppo_phase_resumes_in_the_real_pipeline(pipeline_env, tmp_path):
    overrides = [*TINY, "iterations=1", "ppo.steps=40", "ppo.checkpoint_every=4"]

    def command(cwd: Path) -> list[str]:
        args = [RLHF, "run", "--json", str(cwd / "summary.json")]
        for item in [*overrides, f"tracking.uri=sqlite:///{cwd}/mlflow.db"]:
            args += ["--set", item]
        return args

    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen(
        command(killed),
        cwd=killed,
        env=pipeline_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pattern = "rlhf-artifacts/pipelines/default/iteration-001/policy-*.checkpoints/step-*/MANIFEST.json"
    deadline = time.monotonic() + 600
    while not list(killed.glob(pattern)):
        assert proc.poll() is None and time.monotonic() < deadline, "no PPO checkpoint before the run ended"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert not (killed / "summary.json").exists()

    resumed = subprocess.run(command(killed), cwd=killed, env=pipeline_env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "iteration-1/ppo: resuming from checkpoint step" in resumed.stdout + resumed.stderr
    result = summary(killed)
    assert result["phases"]["iteration-1/ppo"] == "Completed" and result["phases"]["sft"] == "Cached"
    assert not list(killed.glob("rlhf-artifacts/**/*.checkpoints"))  # cleared once the phase finished

    # MLflow: the resumed phase's run holds every step once, the steps before the checkpoint carried over
    client = MlflowClient(f"sqlite:///{killed}/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name("rlhf").experiment_id], "attributes.run_name = 'iteration-1/ppo'"
    )
    done = next(r for r in runs if r.info.status == "FINISHED")
    assert int(done.data.tags["rlhf.resumed_from_step"]) % 4 == 0
    assert sorted(m.step for m in client.get_metric_history(done.info.run_id, "ppo/kl")) == list(range(1, 41))
    assert {r.info.status for r in runs} == {"FINISHED", "KILLED"}

    # a whole save_pretrained folder, like every other policy artifact (the loops' own tests check that a
    # resumed run ends with the weights an uninterrupted one has)
    def manifest(pattern: str) -> dict:
        return json.loads(next(killed.glob(f"rlhf-artifacts/pipelines/default/{pattern}/MANIFEST.json")).read_text())

    assert manifest("iteration-001/policy-*")["files"].keys() == manifest("sft/policy-*")["files"].keys()
