"""`data.base_model` and `data.reward_model`: every phase runs on a causal LM that is not the toy Llama (a tiny GPT-2
built here), and the reward model can be a separate model with its own tokenizer."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_flow import TINY
from transformers import GPT2Config, GPT2LMHeadModel

from flows.config import load_config
from infra.artifacts import PhaseInputs, read_prompts, reward_init_dir
from infra.sources import inputs_digest
from rlhf_core import world
from rlhf_core.data import DataConfig
from rlhf_core.modeling import load_policy, load_tokenizer, sample_responses
from rlhf_core.reward import load_reward_function, score_texts
from tasks.data import write_data
from tasks.evaluate import run_baseline, run_evaluation
from tasks.ppo import run_ppo
from tasks.preferences import run_preferences
from tasks.reward import run_reward
from tasks.sft import run_sft


def save_tiny_gpt2(directory, tokenizer):
    """A freshly initialized one-layer GPT-2 over ``tokenizer``, saved with it."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), world.build_tokenizer())


def test_every_phase_runs_on_a_gpt2_base_model(gpt2_dir, tmp_path):
    config = load_config(None, [*TINY, f"data.base_model={gpt2_dir}"])
    data = tmp_path / "data"
    write_data(data, 0, config.data)
    assert json.loads((data / "base_model" / "config.json").read_text())["model_type"] == "gpt2"

    sft = tmp_path / "sft"
    run_sft(data / "base_model", data, sft, config=config.sft, seed=0)
    before = load_file(data / "base_model" / "model.safetensors")
    after = load_file(sft / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    run_preferences(PhaseInputs(data=data, policy=sft), tmp_path / "preferences", config=config.preferences, seed=1)
    rm = run_reward(sft, [tmp_path / "preferences"], tmp_path / "reward", config=config.reward, seed=1)
    assert 0.0 <= rm["val_accuracy"] <= 1.0
    run_ppo(PhaseInputs(data, sft, sft, tmp_path / "reward"), tmp_path / "policy", config=config.ppo, seed=1)
    (tmp_path / "evaluation").mkdir()
    metrics, rows = run_evaluation(
        PhaseInputs(data, tmp_path / "policy", sft, tmp_path / "reward"),
        tmp_path / "evaluation",
        baseline=run_baseline(data, sft, config=config.evaluation, seed=0),
        config=config.evaluation,
        seed=1,
    )
    assert 0.0 <= metrics["win_rate_vs_sft"] <= 1.0 and rows


def test_a_base_model_that_cannot_load_names_the_field(tmp_path):
    config = load_config(None, [*TINY, f"data.base_model={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="data.base_model="):
        write_data(tmp_path / "data", 0, config.data)


def test_editing_a_local_base_model_changes_its_digest(gpt2_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in gpt2_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    first = inputs_digest(DataConfig(base_model=str(copy)))
    assert first == inputs_digest(DataConfig(base_model=str(gpt2_dir)))
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"n_layer": 1', '"n_layer": 1 '))
    assert inputs_digest(DataConfig(base_model=str(copy))) != first
    assert inputs_digest(DataConfig(base_model="some-org/some-hub-model")) is None


@pytest.fixture(scope="module")
def gpt2_reward_dir(tmp_path_factory):
    """A GPT-2 with a tokenizer of its own: the toy words under other ids, so token ids do not carry over."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*reversed(world.vocabulary()), "<s>", "</s>", "[PAD]", "[UNK]"]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2-rm"), tokenizer)


def test_a_separate_reward_model_with_its_own_tokenizer(gpt2_reward_dir, tmp_path):
    config = load_config(None, [*TINY, f"data.reward_model={gpt2_reward_dir}"])
    data, sft = tmp_path / "data", tmp_path / "sft"
    write_data(data, 0, config.data)
    run_sft(data / "base_model", data, sft, config=config.sft, seed=0)
    run_preferences(PhaseInputs(data=data, policy=sft), tmp_path / "preferences", config=config.preferences, seed=1)
    init = reward_init_dir(data, sft)
    assert init == data / "reward_base_model"
    rm = run_reward(init, [tmp_path / "preferences"], tmp_path / "reward", config=config.reward, seed=1)
    assert json.loads((tmp_path / "reward" / "config.json").read_text())["model_type"] == "gpt2"
    assert rm["steps"] > 0

    # PPO and evaluation score policy samples through the reward model's own tokenizer
    policy_tokenizer = load_tokenizer(sft)
    reward_fn = load_reward_function(tmp_path / "reward", policy_tokenizer)
    assert reward_fn.tokenizer is not None and reward_fn.tokenizer.eos_token == "</s>"
    samples = sample_responses(load_policy(sft).eval(), policy_tokenizer, read_prompts(data, "ppo")[:8], 12)
    expected = score_texts(
        reward_fn.model, reward_fn.tokenizer, samples.prompts, samples.texts, max_length=config.reward.max_length
    )
    torch.testing.assert_close(reward_fn(samples), expected)
    assert reward_fn.model.config.reward_max_length == config.reward.max_length
    assert load_reward_function(tmp_path / "reward", reward_fn.tokenizer).tokenizer is None  # same vocabulary: ids

    metrics = run_ppo(PhaseInputs(data, sft, sft, tmp_path / "reward"), tmp_path / "policy", config=config.ppo, seed=1)
    assert math.isfinite(metrics["reward"]) and math.isfinite(metrics["explained_variance"])
    (tmp_path / "evaluation").mkdir()
    evaluation, _ = run_evaluation(
        PhaseInputs(data, tmp_path / "policy", sft, tmp_path / "reward"),
        tmp_path / "evaluation",
        baseline=run_baseline(data, sft, config=config.evaluation, seed=0),
        config=config.evaluation,
        seed=1,
    )
    assert math.isfinite(evaluation["reward"])


def test_a_reward_model_that_cannot_load_names_the_field(tmp_path):
    config = load_config(None, [*TINY, f"data.reward_model={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="data.reward_model="):
        write_data(tmp_path / "data", 0, config.data)
    assert not (tmp_path / "data").exists()
