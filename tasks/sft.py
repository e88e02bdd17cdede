"""SFT phase: fine-tune the base model on the demonstrations."""

from __future__ import annotations

import tempfile
from pathlib import Path

from infra.deepspeed_engine import DeepSpeedConfig
from rlhf_core.checkpoint import Checkpointer
from rlhf_core.modeling import load_policy, load_tokenizer
from rlhf_core.sft import SFTConfig, num_training_steps, train_sft
from tasks.common import (
    MetricsCallback,
    PhaseOutput,
    RunContext,
    artifact_key,
    checkpoint_every,
    checkpointing,
    existing_output,
    fetch,
    phase_engine,
    phase_task,
    publish,
    tracked,
)
from tasks.data import read_demonstrations
from tasks.launch import launch_sft


def run_sft(
    base_dir: Path,
    data_dir: Path,
    out_dir: Path,
    config: SFTConfig,
    seed: int,
    on_metrics: MetricsCallback | None = None,
    trust_remote_code: bool = False,
    checkpointer: Checkpointer | None = None,
    deepspeed: DeepSpeedConfig | None = None,
) -> dict[str, float]:
    """Load the base model, fine-tune it, save it with its tokenizer to ``out_dir``."""
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    model = load_policy(base_dir, trust_remote_code)
    demonstrations = read_demonstrations(data_dir)
    total = num_training_steps(len(demonstrations), config.batch_size, config.epochs)
    engine = phase_engine(model, config, total, deepspeed)
    result = train_sft(engine, tokenizer, demonstrations, config, seed, on_metrics, checkpointer)
    weights = engine.full_state_dict()  # every rank takes part in gathering; rank 0 writes
    if engine.rank == 0:
        model.save_pretrained(out_dir, state_dict=weights)
        tokenizer.save_pretrained(out_dir)
    return {"sft/first_loss": result.first_loss, "sft/final_loss": result.final_loss, "sft/steps": result.steps}


@phase_task("sft")
def sft_task(
    context: RunContext, data: PhaseOutput, config: SFTConfig, seed: int, deepspeed: DeepSpeedConfig | None = None
) -> PhaseOutput:
    inputs = {"data": data, "config": config, "seed": seed, "deepspeed": deepspeed}
    key = artifact_key(context, "sft", "policy", inputs)
    if done := existing_output(context, key):
        return done
    data_dir = fetch(context, data)
    n_steps = num_training_steps(len(read_demonstrations(data_dir)), config.batch_size, config.epochs)
    with (
        tracked(context, "sft", {"sft": config.model_dump(), "seed": seed}, n_steps) as log,
        checkpointing(context, key, log, checkpoint_every(config.checkpoint_every, deepspeed)) as checkpointer,
        tempfile.TemporaryDirectory(prefix="rlhf-sft-") as tmp,
    ):
        base_dir = data_dir / "base_model"
        if deepspeed is not None and deepspeed.num_processes > 1:
            metrics = launch_sft(base_dir, data_dir, Path(tmp), config, seed, deepspeed, log, context.trust_remote_code)
        else:
            metrics = run_sft(
                base_dir, data_dir, Path(tmp), config, seed, log, context.trust_remote_code, checkpointer, deepspeed
            )
        return publish(
            context,
            key,
            Path(tmp),
            {"phase": "sft", "parents": {"data": data.ref.uri}, "config": config.model_dump(), "seed": seed},
            metrics,
        )
