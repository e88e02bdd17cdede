"""LoRA policies: PPO trains adapters only, its reference is the policy with them off (no second copy of the
weights), so it holds measurably less memory than full fine-tuning and still raises the gold reward; the
adapters carry over from one iteration to the next and a merged export loads as any causal LM."""

import pytest
import torch
from conftest import TINY_WORLD
from test_flow import TINY
from test_phases import held_out_eos_rate

from flows.config import ConfigError, load_config
from infra.artifacts import PhaseInputs
from rlhf_core import world
from rlhf_core.engine import Optimization, TorchEngine
from rlhf_core.lora import ADAPTER_DIR, AdaptersDisabled, LoRAConfig, add_lora
from rlhf_core.modeling import load_policy, load_scorer, load_tokenizer
from rlhf_core.ppo import PPOConfig, PPOModels, train_ppo
from rlhf_core.reward import RewardFunction
from tasks.data import write_data
from tasks.ppo import load_policy_and_reference, run_ppo


def held_bytes(*modules: torch.nn.Module, optimizers: tuple[torch.optim.Optimizer, ...] = ()) -> int:
    """Bytes of the distinct tensors the models and the optimizers' state hold."""
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    tensors |= {id(t): t for opt in optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_lora_ppo_holds_less_memory_and_learns_its_reward(sft_dir):
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
        engine = TorchEngine(policy, Optimization(lr=config.lr, total_steps=100))
        critic_engine = TorchEngine(load_scorer(sft_dir), Optimization(lr=config.critic_lr, total_steps=100))
        models = PPOModels(engine, critic_engine, reference, RewardFunction(reward_model))
        result = train_ppo(models, tokenizer, prompts, config.model_copy(update={"steps": steps}), seed=0)
        return result.history, held_bytes(policy, reference, optimizers=(engine.optimizer,))

    # one step builds the full fine-tune's optimizer state
    _, full_bytes = ppo(load_policy(sft_dir), load_policy(sft_dir).eval().requires_grad_(False), steps=1)
    lora_policy = add_lora(load_policy(sft_dir), LoRAConfig(r=4))
    lora, lora_bytes = ppo(lora_policy, AdaptersDisabled(lora_policy), steps=config.steps)
    # full: policy + reference + two AdamW moments = 4 copies; LoRA: one copy plus small adapters
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


def test_lora_with_deepspeed_is_refused_by_name():
    with pytest.raises(ConfigError, match="ppo.lora or dpo.lora with deepspeed is not supported yet"):
        load_config(None, ["ppo.lora={r: 4}", "deepspeed={zero_stage: 2}"])
