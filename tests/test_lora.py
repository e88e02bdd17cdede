"""LoRA policies: PPO trains adapters only, its reference is the policy with them off (no second copy of the
weights), so it holds measurably less memory than full fine-tuning and still raises the gold reward; the
adapters carry over from one iteration to the next and a merged export loads as any causal LM. Reward models and
critics train as adapters too."""

import math

import pytest
import torch
from conftest import TINY_WORLD
from test_flow import TINY
from test_phases import held_out_eos_rate

from flows.config import ConfigError, load_config
from infra.artifacts import PhaseInputs, read_pairs
from infra.deepspeed_config import DeepSpeedConfig
from rlhf_core import world
from rlhf_core.config import LoRAConfig, PPOConfig
from rlhf_core.engine import Optimization, TorchEngine
from rlhf_core.lora import ADAPTER_DIR, AdaptersDisabled, add_lora
from rlhf_core.losses import bradley_terry_loss
from rlhf_core.modeling import load_policy, load_scorer, load_tokenizer
from rlhf_core.ppo import PPOModels, train_ppo
from rlhf_core.reward import RewardFunction, pair_rewards, preference_accuracy, split_pairs
from tasks.common import make_engine
from tasks.data import write_data
from tasks.dpo import run_dpo
from tasks.ppo import load_policy_and_reference, run_ppo
from tasks.preferences import run_preferences
from tasks.reward import run_reward


def held_bytes(*modules: torch.nn.Module, optimizers: tuple[torch.optim.Optimizer, ...] = ()) -> int:
    """Bytes of the distinct tensors the models and the optimizers hold: their parameters (under ZeRO, fp32 master
    partitions of their own) and their state."""
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    for opt in optimizers:
        tensors |= {id(p): p for group in opt.param_groups for p in group["params"]}
        tensors |= {id(t): t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The AdamW behind an engine: DeepSpeed's ZeRO optimizer wraps it around its fp32 partitions."""
    return engine.optimizer if isinstance(engine, TorchEngine) else engine.engine.optimizer.optimizer


@pytest.mark.parametrize("deepspeed", [None, DeepSpeedConfig(zero_stage=2)], ids=["torch", "zero2"])
def test_lora_ppo_holds_less_memory_and_learns_its_reward(sft_dir, deepspeed):
    tokenizer = load_tokenizer(sft_dir)
    reward_model, prompts = load_scorer(sft_dir).eval(), world.make_world(0, TINY_WORLD).ppo_prompts[:32]
    # a reward the policy can find quickly: finish the response
    torch.nn.init.zeros_(reward_model.score.weight)
    config = PPOConfig(
        steps=20, rollout_batch_size=16, minibatch_size=8, epochs=2, lr=1e-2, max_new_tokens=8, kl_coef=0.01,
        missing_eos_penalty=2.0, target_kl=None, adaptive_kl=False,
    )  # fmt: skip

    def ppo(policy, reference, steps):
        torch.manual_seed(0)
        engine = make_engine(policy, Optimization(lr=config.lr, total_steps=100), deepspeed, config.minibatch_size)
        critic = make_engine(
            load_scorer(sft_dir), Optimization(lr=config.critic_lr, total_steps=100), deepspeed, config.minibatch_size
        )
        models = PPOModels(engine, critic, reference, RewardFunction(reward_model))
        result = train_ppo(models, tokenizer, prompts, config.model_copy(update={"steps": steps}), seed=0)
        return result.history, held_bytes(policy, reference, optimizers=(torch_optimizer(engine),))

    # one step builds the full fine-tune's optimizer state
    _, full_bytes = ppo(load_policy(sft_dir), load_policy(sft_dir).eval().requires_grad_(False), steps=1)
    lora_policy = add_lora(load_policy(sft_dir), LoRAConfig(r=4))
    lora, lora_bytes = ppo(lora_policy, AdaptersDisabled(lora_policy), steps=config.steps)
    # full: policy + reference + two AdamW moments (+ ZeRO's fp32 master copy) = 4-5 copies; LoRA: one copy plus
    # small adapters
    assert lora_bytes < 0.4 * full_bytes, (lora_bytes, full_bytes)
    # what this reward pays for: finishing. Measured over seeds 0-7 and 1-2 threads, on 256 held-out samples:
    # 0.35-0.48 end before (adapters off), 0.81-0.96 after, a rise of 0.35-0.57 (noise about 0.04)
    trained = held_out_eos_rate(lora_policy, tokenizer, config.max_new_tokens)
    with lora_policy.disable_adapter():
        reference_rate = held_out_eos_rate(lora_policy, tokenizer, config.max_new_tokens)
    assert trained > reference_rate + 0.2, (trained, reference_rate)
    assert sum(h["kl"] for h in lora[-3:]) > 0  # the reference (adapters off) is not the policy


def test_lora_adapters_carry_over_iterations_and_merge(tmp_path):
    config = load_config(None, [*TINY, "ppo.lora={r: 4}", "ppo.steps=2"])
    data, sft = tmp_path / "data", tmp_path / "data" / "base_model"
    write_data(data, 0, config.data)
    torch.manual_seed(0)
    load_scorer(sft).save_pretrained(tmp_path / "rm")
    load_tokenizer(sft).save_pretrained(tmp_path / "rm")  # a reward artifact holds its tokenizer
    run_ppo(PhaseInputs(data, sft, sft, tmp_path / "rm"), tmp_path / "iter-1", config=config.ppo, seed=1)
    assert (tmp_path / "iter-1" / ADAPTER_DIR / "adapter_model.safetensors").exists()
    # the next iteration continues the same adapters on the SFT weights, the reference still being SFT
    policy, reference = load_policy_and_reference(tmp_path / "iter-1", sft, config.ppo.lora)
    assert isinstance(reference, AdaptersDisabled)
    merged = load_policy(tmp_path / "iter-1")  # the merged export: a plain causal LM
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    torch.testing.assert_close(policy(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(reference(input_ids=ids).logits, load_policy(sft)(input_ids=ids).logits)
    run_ppo(
        PhaseInputs(data, tmp_path / "iter-1", sft, tmp_path / "rm"), tmp_path / "iter-2", config=config.ppo, seed=2
    )
    assert (tmp_path / "iter-2" / ADAPTER_DIR / "adapter_model.safetensors").exists()


def test_lora_with_zero3_is_refused_by_name():
    with pytest.raises(ConfigError, match="dpo.lora with deepspeed.zero_stage 3 is not supported"):
        load_config(None, ["dpo.lora={r: 4}", "deepspeed={zero_stage: 3}"])
    with pytest.raises(ConfigError, match="reward.lora with deepspeed.zero_stage 3 is not supported"):
        load_config(None, ["reward.lora={r: 4}", "deepspeed={zero_stage: 3}"])
    assert load_config(None, ["ppo.lora={r: 4}", "deepspeed={zero_stage: 2}"]).ppo.lora.r == 4


def test_lora_ppo_and_dpo_under_zero2_match_plain_torch(tmp_path):
    """LoRA phases under DeepSpeed ZeRO-2 (the reference: the policy with its adapters off) follow the plain-torch
    LoRA phases step for step and save adapters and merged model alike."""
    config = load_config(None, [*TINY, "ppo.lora={r: 4}", "ppo.steps=3", "dpo.lora={r: 4}", "dpo.epochs=1"])
    config = config.model_copy(update={"dpo": config.dpo.model_copy(update={"batch_size": 8, "log_every": 1})})
    data, sft = tmp_path / "data", tmp_path / "data" / "base_model"
    write_data(data, 0, config.data)
    torch.manual_seed(0)
    load_scorer(sft).save_pretrained(tmp_path / "rm")
    load_tokenizer(sft).save_pretrained(tmp_path / "rm")
    run_preferences(PhaseInputs(data=data, policy=sft), tmp_path / "pairs", config=config.preferences, seed=1)
    pairs = read_pairs(tmp_path / "pairs")
    runs = {}
    for name, deepspeed in (("torch", None), ("zero2", DeepSpeedConfig(zero_stage=2))):
        ppo_log, dpo_log = [], []
        run_ppo(
            PhaseInputs(data, sft, sft, tmp_path / "rm"), tmp_path / name / "ppo", config=config.ppo, seed=1,
            deepspeed=deepspeed, on_metrics=lambda m, _, log=ppo_log: log.append(m),
        )  # fmt: skip
        run_dpo(
            sft, sft, pairs, tmp_path / name / "dpo", sft_dir=sft, config=config.dpo, seed=1, deepspeed=deepspeed,
            on_metrics=lambda m, _, log=dpo_log: log.append(m),
        )  # fmt: skip
        runs[name] = (ppo_log, dpo_log)
    for ours, theirs, keys in zip(
        runs["zero2"], runs["torch"], (["kl", "reward", "policy_loss"], ["loss"]), strict=True
    ):
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            assert all(a[k] == pytest.approx(b[k], abs=1e-3) for k in keys), (a, b)
    for phase in ("ppo", "dpo"):
        assert (tmp_path / "zero2" / phase / ADAPTER_DIR / "adapter_model.safetensors").exists()
        ids = torch.tensor([[1, 5, 9, 12, 3]])
        ours, theirs = load_policy(tmp_path / "zero2" / phase), load_policy(tmp_path / "torch" / phase)
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-3, rtol=0)


@pytest.mark.parametrize("deepspeed", [None, DeepSpeedConfig(zero_stage=2)], ids=["torch", "zero2"])
def test_a_lora_reward_model_trains_adapters_and_its_head_and_exports_merged(tmp_path, deepspeed):
    """A reward model as LoRA (reward.lora) trains low-rank adapters and its scalar head only: it holds less memory
    than one trained in full, its saved model is a plain scorer whose weights differ from the initial ones by a
    rank-r update in every adapted layer, scoring as the trained one did; a LoRA critic (ppo.critic_lora) trains
    in PPO beside it."""
    config = load_config(None, [*TINY, "reward.lora={r: 4}", "ppo.critic_lora={r: 4}", "ppo.steps=2"])
    data, sft = tmp_path / "data", tmp_path / "data" / "base_model"
    write_data(data, 0, config.data)
    run_preferences(PhaseInputs(data=data, policy=sft), tmp_path / "pairs", config=config.preferences, seed=1)
    pairs = read_pairs(tmp_path / "pairs")
    tokenizer = load_tokenizer(sft)

    def one_step(model: torch.nn.Module) -> int:
        engine = make_engine(model, Optimization(lr=1e-3, total_steps=10), deepspeed, micro_batch_size=8)
        engine.backward(bradley_terry_loss(*pair_rewards(engine.module, tokenizer, pairs[:8], 64)))
        engine.step()
        return held_bytes(model, optimizers=(torch_optimizer(engine),))

    full_bytes = one_step(load_scorer(sft))
    lora_bytes = one_step(add_lora(load_scorer(sft), LoRAConfig(r=4), scorer=True))
    # full: weights + two AdamW moments (+ ZeRO's fp32 master copy) = 3-4 copies; LoRA: one copy plus adapters, which
    # at rank 4 are a quarter of this 32-wide model's linear weights (a byte count: 0.45 under torch, 0.37 under ZeRO-2)
    assert lora_bytes < 0.5 * full_bytes, (lora_bytes, full_bytes)

    metrics = run_reward(sft, [tmp_path / "pairs"], tmp_path / "rm", config=config.reward, seed=1, deepspeed=deepspeed)
    assert not list((tmp_path / "rm").rglob("adapter_*"))  # merged: loads as any sequence-classification model
    trained, initial = load_scorer(tmp_path / "rm").eval(), load_scorer(sft)
    for name, weight in trained.model.state_dict().items():
        if name.endswith("proj.weight"):  # every linear layer of the backbone carries an adapter (all-linear)
            update = weight - initial.model.state_dict()[name]
            assert 0 < torch.linalg.matrix_rank(update, atol=1e-6) <= 4, name
        else:  # embeddings and norms stay frozen
            torch.testing.assert_close(weight, initial.model.state_dict()[name], atol=0, rtol=0, msg=name)
    _, val = split_pairs(pairs, config.reward.val_fraction)
    accuracy = preference_accuracy(trained, tokenizer, val, config.reward.max_length)["accuracy"]
    assert accuracy == pytest.approx(metrics["val_accuracy"], abs=1e-9)

    inputs = PhaseInputs(data, sft, sft, tmp_path / "rm")
    history = []
    run_ppo(
        inputs, tmp_path / "ppo", config=config.ppo, seed=1, deepspeed=deepspeed,
        on_metrics=lambda metrics, _: history.append(metrics),
    )  # fmt: skip
    assert len(history) == 2 and all(math.isfinite(h["value_loss"]) for h in history)
