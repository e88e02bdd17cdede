"""Data preparation: the prompt splits, the demonstrations and the base model, as one artifact."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from infra.datasets import read_rows, write_rows
from infra.storage import folder_digest
from rlhf_core import world
from rlhf_core.modeling import load_policy, load_tokenizer
from rlhf_core.world import WorldConfig
from tasks.common import PhaseOutput, RunContext, artifact_key, existing_output, phase_task, publish

SPLITS = ("sft", "preference", "ppo", "eval")


class DataConfig(BaseModel):
    """Where prompts, demonstrations and the base model come from (default: the built-in toy world)."""

    model_config = ConfigDict(extra="forbid")
    world: WorldConfig = Field(
        default_factory=WorldConfig, description="Size of the generated toy world and of its tiny Llama."
    )
    base_model: str | None = Field(
        None,
        description="Start from this causal LM (hub id or local save_pretrained folder, any architecture) instead "
        "of the toy world's tiny Llama; its own tokenizer is used. Null: build the tiny Llama.",
    )


def save_base_model(directory: Path, seed: int, config: WorldConfig) -> Path:
    """The untrained toy tokenizer and tiny Llama as a ``save_pretrained`` folder, loadable with Auto*."""
    tokenizer = world.build_tokenizer()
    world.build_model(tokenizer, config, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def copy_base_model(directory: Path, name_or_path: str, trust_remote_code: bool = False) -> Path:
    """Any causal LM and its tokenizer, re-saved as a safetensors ``save_pretrained`` folder."""
    try:
        tokenizer = load_tokenizer(name_or_path, trust_remote_code)
        model = load_policy(name_or_path, trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"data.base_model={name_or_path!r}: cannot load a causal LM and tokenizer from it: {e}") from e
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_world(out_dir: Path, seed: int, config: DataConfig, trust_remote_code: bool = False) -> dict[str, float]:
    """Generate the toy world into ``out_dir``: base_model/, prompts.parquet, demonstrations.parquet."""
    generated = world.make_world(seed, config.world)
    if config.base_model is None:
        save_base_model(out_dir / "base_model", seed, config.world)
    else:
        copy_base_model(out_dir / "base_model", config.base_model, trust_remote_code)
    splits = zip(
        SPLITS,
        (generated.sft_prompts, generated.preference_prompts, generated.ppo_prompts, generated.eval_prompts),
        strict=True,
    )
    write_rows(out_dir / "prompts.parquet", [{"split": s, "prompt": p} for s, prompts in splits for p in prompts])
    write_rows(out_dir / "demonstrations.parquet", [{"prompt": p, "response": r} for p, r in generated.demonstrations])
    return {"data/demonstrations": len(generated.demonstrations), "data/eval_prompts": len(generated.eval_prompts)}


def read_prompts(data_dir: Path, split: str) -> list[str]:
    return [row["prompt"] for row in read_rows(data_dir / "prompts.parquet") if row["split"] == split]


def read_demonstrations(data_dir: Path) -> list[tuple[str, str]]:
    return [(row["prompt"], row["response"]) for row in read_rows(data_dir / "demonstrations.parquet")]


def local_model_digest(name_or_path: str | None) -> str | None:
    """Content digest of a local base-model folder, so editing it in place invalidates the cache."""
    if name_or_path is None or not Path(name_or_path).is_dir():
        return None
    return folder_digest(Path(name_or_path))


@phase_task("prepare-data")
def prepare_data(
    context: RunContext, config: DataConfig, seed: int, base_model_digest: str | None = None
) -> PhaseOutput:
    """``base_model_digest`` (see :func:`local_model_digest`) puts a local base model's content in the cache key."""
    inputs = {"config": config, "seed": seed, "base_model_digest": base_model_digest}
    key = artifact_key(context, "data", "world", inputs)
    if done := existing_output(context, key):
        return done
    with tempfile.TemporaryDirectory(prefix="rlhf-data-") as tmp:
        metrics = write_world(Path(tmp), seed, config, context.trust_remote_code)
        return publish(
            context, key, Path(tmp), {"phase": "prepare-data", "config": config.model_dump(), "seed": seed}, metrics
        )
