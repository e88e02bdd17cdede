"""Data preparation: the prompt splits, the demonstrations, any human preferences, the gold judge's name and the
base model, checked (``infra/user_data.py``) and written as one artifact (``infra/artifacts.py``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from infra.artifacts import (
    AS_WRITTEN,
    BASE_MODEL_DIR,
    DEMONSTRATIONS_FILE,
    JUDGE_FILE,
    PAIRS_FILE,
    PROMPTS_FILE,
    REWARD_BASE_DIR,
    SOURCES_FILE,
    SPLITS,
)
from infra.catalog import DATA
from infra.credentials import open_configured_store
from infra.datasets import write_rows
from infra.sources import StoreOpener, aws_env_store
from infra.user_data import check_data
from rlhf_core import world
from rlhf_core.data import DataConfig
from rlhf_core.gguf_models import is_gguf, load_gguf_model, load_gguf_tokenizer
from rlhf_core.modeling import load_policy, load_tokenizer, with_pad_token
from rlhf_core.world import WorldConfig
from tasks.common import PhaseOutput, RunContext, artifact_key, existing_output, phase_task, publish


def save_base_model(directory: Path, seed: int, config: WorldConfig) -> Path:
    """The untrained toy tokenizer and tiny Llama as a ``save_pretrained`` folder, loadable with Auto*."""
    tokenizer = world.build_tokenizer()
    world.build_model(tokenizer, config, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def copy_base_model(
    directory: Path, name_or_path: str, trust_remote_code: bool = False, field: str = "data.base_model"
) -> Path:
    """Any causal LM and its tokenizer (a GGUF file dequantized), re-saved as a safetensors ``save_pretrained``
    folder; errors name ``field``."""
    try:
        if is_gguf(name_or_path):
            tokenizer = with_pad_token(load_gguf_tokenizer(name_or_path, field))
            model = load_gguf_model(name_or_path, field)
        else:
            tokenizer = load_tokenizer(name_or_path, trust_remote_code)
            model = load_policy(name_or_path, trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}={name_or_path!r}: cannot load a causal LM and tokenizer from it: {e}") from e
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_data(
    out_dir: Path,
    seed: int,
    config: DataConfig,
    *,
    trust_remote_code: bool = False,
    max_tokens: int | None = None,
    open_store: StoreOpener = aws_env_store,
) -> dict[str, float]:
    """Check, then write the data artifact's files into ``out_dir`` (with ``sources.json``: where each of the user's
    datasets was read, a hub dataset's commit pinned); returns its counts (bare names)."""
    dataset = check_data(config, seed, trust_remote_code, max_tokens, open_store=open_store)
    if config.base_model is None:
        save_base_model(out_dir / BASE_MODEL_DIR, seed, config.world)
    else:
        copy_base_model(out_dir / BASE_MODEL_DIR, config.base_model, trust_remote_code)
    if config.reward_model is not None:
        copy_base_model(out_dir / REWARD_BASE_DIR, config.reward_model, trust_remote_code, "data.reward_model")
    prompt_rows = [{"split": s, "prompt": p} for s in SPLITS for p in dataset.prompts[s]]
    if dataset.as_written:  # the chat template changed the prompts: keep the user's text for the gold judge
        prompt_rows = [{**row, AS_WRITTEN: dataset.as_written.get(row["prompt"], row["prompt"])} for row in prompt_rows]
    write_rows(out_dir / PROMPTS_FILE, prompt_rows)
    write_rows(out_dir / DEMONSTRATIONS_FILE, [{"prompt": p, "response": r} for p, r in dataset.demonstrations])
    if dataset.preferences:
        write_rows(out_dir / PAIRS_FILE, dataset.preferences)
    (out_dir / JUDGE_FILE).write_text(json.dumps({"gold_reward": config.gold_reward}))
    if dataset.sources:
        (out_dir / SOURCES_FILE).write_text(json.dumps(dataset.sources, indent=1))
    return {
        "demonstrations": len(dataset.demonstrations),
        "eval_prompts": len(dataset.prompts["eval"]),
        "human_preferences": len(dataset.preferences),
    }


@phase_task("prepare-data")
def prepare_data(
    context: RunContext,
    config: DataConfig,
    seed: int,
    *,
    inputs_digest: str | None = None,
    max_tokens: int | None = None,
) -> PhaseOutput:
    """``inputs_digest`` (see :func:`infra.user_data.inputs_digest`) puts the identity of what the data is read from
    in the cache key; ``max_tokens`` is the longest prompt + response training keeps, which every user row must fit."""
    inputs = {"config": config, "seed": seed, "inputs_digest": inputs_digest, "max_tokens": max_tokens}
    key = artifact_key(context, "data", "world", inputs)
    if done := existing_output(context, key):
        return done
    with tempfile.TemporaryDirectory(prefix="rlhf-data-") as tmp:
        counts = write_data(
            Path(tmp),
            seed,
            config,
            trust_remote_code=context.trust_remote_code,
            max_tokens=max_tokens,
            open_store=lambda uri: open_configured_store(uri, context.aws_credentials_block),
        )
        sources = Path(tmp) / SOURCES_FILE
        return publish(
            context,
            key,
            Path(tmp),
            phase="prepare-data",
            config=config,
            seed=seed,
            metrics=DATA.namespaced(counts),
            parents=json.loads(sources.read_text()) if sources.exists() else None,
        )
