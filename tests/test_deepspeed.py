"""DeepSpeed ZeRO for every phase, in one process on CPU (gloo): SFT, reward-model and PPO steps under ZeRO-2
and ZeRO-3 give the losses of the plain-torch path on the same seed, and the saved checkpoints (gathered
from the shards) reload through ``Auto*`` with the same weights."""

import io
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_flow import TINY

from flows.config import ConfigError, load_config
from infra.artifacts import PhaseInputs, read_pairs
from infra.catalog import PPO
from infra.checkpoints import CheckpointSpec, checkpoint_prefix
from infra.deepspeed_config import DeepSpeedConfig, deepspeed_config, inference_config
from infra.deepspeed_engine import DeepSpeedEngine, inference_module
from rlhf_core import world
from rlhf_core.alarms import AlarmConfig
from rlhf_core.engine import Optimization
from rlhf_core.modeling import load_policy, load_scorer, load_tokenizer
from tasks.common import PhaseLog
from tasks.data import write_data
from tasks.dpo import run_dpo
from tasks.launch import launch, rank_command, write_spec
from tasks.ppo import run_ppo
from tasks.preferences import run_preferences
from tasks.reward import run_reward
from tasks.sft import run_sft

CONFIG = load_config(None, [*TINY, "sft.log_every=1", "reward.evals_per_epoch=4", "ppo.steps=3"])


@pytest.fixture(scope="module")
def phase_inputs(tmp_path_factory):
    """The toy world, an SFT model and preferences from it, all on the plain-torch path."""
    root = tmp_path_factory.mktemp("zero")
    write_data(root / "data", 0, CONFIG.data)
    run_sft(root / "data" / "base_model", root / "data", root / "sft", config=CONFIG.sft, seed=0)
    run_preferences(
        PhaseInputs(data=root / "data", policy=root / "sft"), root / "preferences", config=CONFIG.preferences, seed=1
    )
    return root


def history(run, **kwargs) -> list[dict[str, float]]:
    logged: list[dict[str, float]] = []
    run(on_metrics=lambda metrics, step: logged.append(metrics), **kwargs)
    return logged


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if name.endswith("embed_tokens.weight"):
            # Adam turns a rounding-sized gradient on the row of a token seen once into a step of about the learning
            # rate (the toy's largest is 1e-3), so one such row may differ by that much; a real mismatch spans rows
            rows = ((x - y).abs() > atol).any(-1)
            assert rows.sum() <= 1 and (x - y).abs().max() <= 1e-3, (name, int(rows.sum()), float((x - y).abs().max()))
            continue
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=name)


def assert_same_history(ours: list[dict], theirs: list[dict], keys: list[str], atol: float) -> None:
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=atol), key


def test_the_zero_config_comes_from_ours():
    config = deepspeed_config(DeepSpeedConfig(zero_stage=3, offload_params=True, precision="bf16"), 16, 1.0)
    assert config["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_clipping"]) == (16, 1.0)
    frozen = inference_config(DeepSpeedConfig(zero_stage=2, offload_optimizer=True, precision="bf16"))
    assert frozen["zero_optimization"] == {"stage": 3} and frozen["bf16"] == {"enabled": True}  # no optimizer offload
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        DeepSpeedConfig(zero_stage=2, offload_params=True)
    with pytest.raises(ConfigError, match="ppo.rollout_batch_size=9 must be a multiple of deepspeed.num_processes=2"):
        load_config(None, ["ppo.rollout_batch_size=9", "deepspeed={num_processes: 2}"])


@pytest.mark.parametrize("stage", [2, 3])
def test_every_phase_under_zero_matches_plain_torch(stage, phase_inputs, tmp_path):
    root, zero = phase_inputs, DeepSpeedConfig(zero_stage=stage)
    base, data = root / "data" / "base_model", root / "data"

    def sft(out, deepspeed=None, on_metrics=None):
        run_sft(base, data, out, config=CONFIG.sft, seed=0, on_metrics=on_metrics, deepspeed=deepspeed)

    plain = history(sft, out=tmp_path / "sft-torch")
    ours = history(sft, out=tmp_path / "sft-zero", deepspeed=zero)
    assert torch.distributed.is_initialized()  # DeepSpeed's process group (gloo): the plain path never makes one
    assert_same_history(ours, plain, ["loss", "grad_norm", "lr"], atol=1e-4)
    assert_same_weights(load_policy(tmp_path / "sft-zero"), load_policy(tmp_path / "sft-torch"), atol=1e-4)

    def reward(out, deepspeed=None, on_metrics=None):
        run_reward(
            root / "sft",
            [root / "preferences"],
            out,
            config=CONFIG.reward,
            seed=1,
            on_metrics=on_metrics,
            deepspeed=deepspeed,
        )

    plain = history(reward, out=tmp_path / "rm-torch")
    ours = history(reward, out=tmp_path / "rm-zero", deepspeed=zero)
    assert_same_history(ours, plain, ["loss", "val_accuracy"], atol=1e-4)
    assert_same_weights(load_scorer(tmp_path / "rm-zero"), load_scorer(tmp_path / "rm-torch"), atol=1e-4)

    def ppo(out, deepspeed=None, on_metrics=None):
        rm = tmp_path / "rm-torch"
        inputs = PhaseInputs(data=data, policy=root / "sft", sft=root / "sft", reward=rm)
        run_ppo(inputs, out, config=CONFIG.ppo, seed=1, on_metrics=on_metrics, deepspeed=deepspeed)

    plain = history(ppo, out=tmp_path / "ppo-torch")
    ours = history(ppo, out=tmp_path / "ppo-zero", deepspeed=zero)
    assert_same_history(ours, plain, ["kl", "reward", "policy_loss", "value_loss"], atol=1e-3)
    assert_same_weights(load_policy(tmp_path / "ppo-zero"), load_policy(tmp_path / "ppo-torch"), atol=1e-3)


@pytest.mark.slow
def test_sft_as_two_processes_matches_one(phase_inputs, tmp_path):
    base, data = phase_inputs / "data" / "base_model", phase_inputs / "data"
    single = run_sft(base, data, tmp_path / "one", config=CONFIG.sft, seed=0)
    kwargs = {"base_dir": base, "data_dir": data, "out_dir": tmp_path / "two", "config": CONFIG.sft, "seed": 0}
    kwargs["deepspeed"] = DeepSpeedConfig(zero_stage=2, num_processes=2)
    two = launch("tasks.sft:run_sft", kwargs, num_processes=2)
    for key in ("first_loss", "final_loss", "steps"):
        assert two[key] == pytest.approx(single[key], abs=1e-4), key
    assert_same_weights(load_policy(tmp_path / "two"), load_policy(tmp_path / "one"), atol=1e-4)


@pytest.mark.slow
def test_reward_model_as_two_processes_matches_one(phase_inputs, tmp_path):
    """The same global batches split over two ranks (each the pairs at its parity, loss shares summing to the batch's
    mean): the Bradley-Terry losses, validation accuracy, early stop, normalization and weights of the one-process
    run, to float rounding (measured: metrics within 2e-5, weights within 5e-7)."""
    config = CONFIG.reward.model_copy(update={"ensemble_size": 2})  # every member's engine, two of them
    kwargs = {"init_dir": phase_inputs / "sft", "preference_dirs": [phase_inputs / "preferences"], "seed": 1}
    single = run_reward(**kwargs, out_dir=tmp_path / "one", config=config)
    zero = DeepSpeedConfig(zero_stage=2, num_processes=2)
    two = launch(
        "tasks.reward:run_reward",
        kwargs | {"out_dir": tmp_path / "two", "config": config, "deepspeed": zero},
        num_processes=2,
    )
    assert set(two) == set(single)
    for key, value in single.items():
        assert two[key] == pytest.approx(value, abs=1e-4), key
    for member in ("", "ensemble/member-1"):
        one_rm, two_rm = load_scorer(tmp_path / "one" / member), load_scorer(tmp_path / "two" / member)
        assert_same_weights(two_rm, one_rm, atol=1e-4)
        assert two_rm.config.reward_gain == pytest.approx(one_rm.config.reward_gain, rel=1e-4)


@pytest.mark.slow
def test_dpo_as_two_processes_matches_one(phase_inputs, tmp_path):
    """The same global batches of pairs split over two ZeRO-2 ranks (each its rows at its parity, its loss and
    statistics weighted by its share of the batch): the one-process run's metrics and weights, to float rounding."""
    config = load_config(None, [*TINY, "dpo.epochs=1", "dpo.batch_size=5", "dpo.log_every=2"]).dpo  # odd: shares differ
    pairs = read_pairs(phase_inputs / "preferences")
    sft = phase_inputs / "sft"
    kwargs = {"policy_dir": sft, "reference_dir": sft, "pairs": pairs, "sft_dir": sft, "config": config, "seed": 1}
    single = run_dpo(**kwargs, out_dir=tmp_path / "one")
    zero = DeepSpeedConfig(zero_stage=2, num_processes=2)
    two = launch("tasks.dpo:run_dpo", kwargs | {"out_dir": tmp_path / "two", "deepspeed": zero}, num_processes=2)
    assert set(two) == set(single) and single["steps"] > 1
    for key, value in single.items():
        assert two[key] == pytest.approx(value, abs=1e-4), key
    assert_same_weights(load_policy(tmp_path / "two"), load_policy(tmp_path / "one"), atol=1e-4)


@pytest.mark.slow
def test_ppo_update_as_two_processes_matches_one(phase_inputs, tmp_path, monkeypatch):
    """One PPO update of the same rollout batch (sampled once here, 8 rows in minibatches of 3, so the ranks' shares
    of a minibatch differ in rows and tokens) as two ZeRO-2 ranks and as one: the same statistics and weights, to
    float rounding (measured: policy weights within 4e-6 after six Adam steps, critic within 2e-7)."""
    from ppo_ranks import update_saved_rollout

    from rlhf_core.engine import Optimization, TorchEngine
    from rlhf_core.modeling import load_tokenizer
    from rlhf_core.ppo import PPOModels, collect_rollout
    from rlhf_core.reward import RewardFunction

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    sft = phase_inputs / "sft"
    config = CONFIG.ppo.model_copy(update={"rollout_batch_size": 8, "minibatch_size": 3, "epochs": 2, "lr": 1e-3})
    policy, critic = load_policy(sft).eval(), load_scorer(sft).eval()
    torch.manual_seed(0)
    engines = [TorchEngine(m, Optimization(lr=1e-3, total_steps=1)) for m in (policy, critic)]
    models = PPOModels(*engines, reference=load_policy(sft).eval(), reward=RewardFunction(load_scorer(sft).eval()))
    prompts = world.make_world(0, CONFIG.data.world).ppo_prompts[:8]
    torch.save(collect_rollout(models, load_tokenizer(sft), prompts, config), tmp_path / "rollout.pt")
    kwargs = {"sft_dir": sft, "rollout_file": tmp_path / "rollout.pt", "config": config}
    one = update_saved_rollout(**kwargs, out_file=tmp_path / "one.pt", deepspeed=DeepSpeedConfig(zero_stage=2))
    zero = DeepSpeedConfig(zero_stage=2, num_processes=2)
    two = launch(
        "ppo_ranks:update_saved_rollout", kwargs | {"out_file": tmp_path / "two.pt", "deepspeed": zero}, num_processes=2
    )
    assert one["minibatch_updates"] == two["minibatch_updates"] == 6
    assert set(two) == set(one)
    for key in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "early_stopped"):
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
    # value_clipfrac counts clipped > unclipped error, equal at a minibatch's first visit (values = rollout values)
    # and so decided by rounding there: not comparable to 1e-5
    weights_one, weights_two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for model in ("policy", "critic"):
        for name, tensor in weights_one[model].items():
            torch.testing.assert_close(weights_two[model][name], tensor, atol=3e-5, rtol=0, msg=f"{model}.{name}")
    assert any((weights_one["policy"][k] - v).abs().max() > 1e-4 for k, v in load_policy(sft).state_dict().items())


@pytest.fixture(scope="module")
def ppo_inputs(phase_inputs) -> PhaseInputs:
    """PPO's inputs: the SFT model as policy and reference, a reward model with a fresh head (seed 0)."""
    inputs = PhaseInputs(phase_inputs / "data", phase_inputs / "sft", phase_inputs / "sft", phase_inputs / "rm-ranks")
    torch.manual_seed(0)
    load_scorer(phase_inputs / "sft").save_pretrained(inputs.reward)
    load_tokenizer(phase_inputs / "sft").save_pretrained(inputs.reward)
    return inputs


@pytest.mark.slow
def test_ppo_as_two_zero3_processes_trains_and_saves(phase_inputs, ppo_inputs, tmp_path):
    """A whole PPO phase as two ZeRO-3 ranks (policy and critic sharded, reference and reward model sharded inference
    engines, generation kept in step across the ranks): it trains, rank 0's checkpoint reloads, and its reward and
    KL are those of one process within the spread of seeds (one process, seeds 1-6: final reward 0.199-0.211, KL
    -0.023 to 0.005; the ranks sample their own shares, so they match in distribution, not sample for sample)."""
    inputs = ppo_inputs
    zero = DeepSpeedConfig(zero_stage=3, num_processes=2)
    kwargs = {"inputs": inputs, "out_dir": tmp_path / "two", "config": CONFIG.ppo, "seed": 1, "deepspeed": zero}
    two = launch("tasks.ppo:run_ppo", kwargs, num_processes=2)
    one = run_ppo(inputs, tmp_path / "one", config=CONFIG.ppo, seed=1)
    assert two["reward"] == pytest.approx(one["reward"], abs=0.03) and abs(two["kl"] - one["kl"]) < 0.1
    trained, sft = load_policy(tmp_path / "two"), load_policy(phase_inputs / "sft")
    assert any((trained.state_dict()[k] - v).abs().max() > 1e-5 for k, v in sft.state_dict().items())


@pytest.mark.slow
def test_a_sigkilled_two_rank_ppo_phase_resumes_to_the_same_artifact(ppo_inputs, tmp_path, caplog):
    """Two ZeRO-2 ranks checkpoint every 2 steps (weights, each rank's optimizer shard and sampling RNG). SIGKILLed
    after a checkpoint, the phase started again resumes from it and saves, byte for byte, the policy an uninterrupted
    run saves;
    rank 0 reports the resume and an alarm (one set to fire at the last step) as the phase's own process would."""
    alarms = AlarmConfig(window=4, entropy_floor=100.0)
    config = CONFIG.ppo.model_copy(update={"steps": 8, "alarms": alarms})
    zero = DeepSpeedConfig(zero_stage=2, num_processes=2)
    kwargs = {"inputs": ppo_inputs, "config": config, "seed": 1, "deepspeed": zero}
    whole = launch("tasks.ppo:run_ppo", kwargs | {"out_dir": tmp_path / "whole"}, num_processes=2)

    key = "pipelines/test/policy-0123456789ab"
    checkpoint = CheckpointSpec(store_uri=str(tmp_path / "store"), artifact_key=key, every=2)
    spec = write_spec(tmp_path, "tasks.ppo:run_ppo", kwargs | {"out_dir": tmp_path / "killed"}, checkpoint=checkpoint)
    proc = subprocess.Popen(
        rank_command(spec, 2),
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not list((tmp_path / "store").glob(f"{checkpoint_prefix(key)}/step-*/MANIFEST.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the ranks ended"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, with no chance to clean up
    proc.wait()
    assert not (tmp_path / "killed").exists()

    with caplog.at_level(logging.INFO, logger="rlhf"):
        resumed = launch(
            "tasks.ppo:run_ppo",
            kwargs | {"out_dir": tmp_path / "resumed"},
            num_processes=2,
            log=PhaseLog(PPO, 1, config.steps),
            checkpoint=checkpoint,
        )
    assert "iteration-1/ppo: resuming from checkpoint step" in caplog.text
    assert "iteration-1/ppo: alarm entropy_collapse at step 8" in caplog.text
    assert resumed == whole and resumed["alarm/entropy_collapse"] == 8
    # the same artifact: the saved policy is byte for byte the uninterrupted run's
    saved = sorted(path.name for path in (tmp_path / "whole").iterdir())
    assert saved == sorted(path.name for path in (tmp_path / "resumed").iterdir()) and "model.safetensors" in saved
    for name in saved:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.slow
def test_a_failing_rank_fails_the_phase_with_its_output(phase_inputs, tmp_path):
    base = phase_inputs / "data" / "base_model"
    zero = DeepSpeedConfig(zero_stage=2, num_processes=2)
    with pytest.raises(
        RuntimeError, match=r"sft: a rank of 2 failed \(torchrun exit 1\): .*Error: .*demonstrations.parquet"
    ):
        kwargs = {"base_dir": base, "data_dir": tmp_path / "no-data", "out_dir": tmp_path / "out"}
        launch("tasks.sft:run_sft", kwargs | {"config": CONFIG.sft, "seed": 0, "deepspeed": zero}, num_processes=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_an_engine_resumes_from_its_state_bit_for_bit(stage, precision):
    """An engine's weights and state (ZeRO's optimizer partition and fp32 master weights, the schedule), saved as
    a resumable checkpoint saves them (``torch.load(weights_only=True)``), continue training exactly where the saved
    engine continues; without the state they would not (0.45 off after three steps, measured)."""
    inputs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def engine() -> DeepSpeedEngine:
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        zero = DeepSpeedConfig(zero_stage=stage, precision=precision)
        return DeepSpeedEngine(module, zero, Optimization(lr=0.1, total_steps=10, warmup_steps=2), micro_batch_size=2)

    def train(engine: DeepSpeedEngine, batch: torch.Tensor) -> None:
        dtype = next(engine.module.parameters()).dtype
        engine.backward(engine.module(batch.to(dtype)).float().pow(2).mean())
        engine.step()

    saved = engine()
    train(saved, inputs[0])
    checkpoint = io.BytesIO()
    torch.save({"weights": saved.full_state_dict(), "state": saved.state_dict()}, checkpoint)
    for batch in inputs[1:]:
        train(saved, batch)
    resumed = engine()
    checkpoint.seek(0)
    restored = torch.load(checkpoint, weights_only=True)
    resumed.load_full_state_dict(restored["weights"])
    resumed.load_state_dict(restored["state"])
    for batch in inputs[1:]:
        train(resumed, batch)
    for name, weight in saved.full_state_dict().items():
        torch.testing.assert_close(resumed.full_state_dict()[name], weight, atol=0, rtol=0, msg=name)


def test_frozen_models_are_sharded_for_inference_under_zero3(phase_inputs):
    sft = phase_inputs / "sft"
    plain = load_policy(sft).eval()
    assert inference_module(plain, DeepSpeedConfig(zero_stage=2)) is plain  # nothing to shard below stage 3
    sharded = inference_module(load_policy(sft), DeepSpeedConfig(zero_stage=3))
    assert all(hasattr(p, "ds_id") for p in sharded.parameters())  # ZeRO-3 owns every weight
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        torch.testing.assert_close(sharded(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=0)
