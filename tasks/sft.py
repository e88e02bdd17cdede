"""SFT phase: fine-tune the base model on the demonstrations."""

from __future__ import annotations

from pathlib import Path

from infra.artifacts import BASE_MODEL_DIR, read_demonstrations
from infra.catalog import SFT
from infra.deepspeed_config import DeepSpeedConfig
from rlhf_core.checkpoint import Checkpointer
from rlhf_core.config import DEFAULT_COMPUTE, ComputeConfig, SFTConfig
from rlhf_core.engine import without_tied_copies
from rlhf_core.modeling import load_policy, load_tokenizer
from rlhf_core.sft import num_training_steps, train_sft
from rlhf_core.types import MetricsCallback
from tasks.common import (
    PhaseOutput,
    RunContext,
    artifact_key,
    existing_output,
    fetch,
    phase_engine,
    phase_task,
    phase_workspace,
    publish,
    world_size,
)
from tasks.launch import run_entry


def run_sft(
    base_dir: Path,
    data_dir: Path,
    out_dir: Path,
    *,
    config: SFTConfig,
    seed: int,
    on_metrics: MetricsCallback | None = None,
    trust_remote_code: bool = False,
    checkpointer: Checkpointer | None = None,
    deepspeed: DeepSpeedConfig | None = None,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> dict[str, float]:
    """Load the base model, fine-tune it (as ``compute`` says: precision, recomputation, attention kernel), save it
    with its tokenizer to ``out_dir``."""
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    model = load_policy(base_dir, trust_remote_code, attn_implementation=compute.attn_implementation)
    demonstrations = read_demonstrations(data_dir)
    total = num_training_steps(len(demonstrations), config.batch_size, config.epochs)
    engine = phase_engine(model, config, total, deepspeed, compute=compute)
    result = train_sft(
        engine, tokenizer, demonstrations, config, seed=seed, on_metrics=on_metrics, checkpointer=checkpointer
    )
    weights = engine.full_state_dict()  # every rank takes part in gathering; rank 0 writes
    if engine.rank == 0:
        model.save_pretrained(out_dir, state_dict=without_tied_copies(model, weights))
        tokenizer.save_pretrained(out_dir)
    return {"first_loss": result.first_loss, "final_loss": result.final_loss, "steps": result.steps}


@phase_task("sft")
def sft_task(
    context: RunContext,
    *,
    data: PhaseOutput,
    config: SFTConfig,
    seed: int,
    deepspeed: DeepSpeedConfig | None = None,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> PhaseOutput:
    inputs = {"data": data, "config": config, "seed": seed, "deepspeed": deepspeed, "compute": compute}
    key = artifact_key(context, "sft", "policy", inputs)
    if done := existing_output(context, key):
        return done
    data_dir = fetch(context, data)
    with phase_workspace(
        context,
        SFT,
        key,
        params={"sft": config.model_dump(), "seed": seed, "world_size": world_size(deepspeed)},
        total_steps=num_training_steps(len(read_demonstrations(data_dir)), config.batch_size, config.epochs),
        checkpoint_every=config.checkpoint_every,
    ) as work:
        metrics = run_entry(
            run_sft, context, work, base_dir=data_dir / BASE_MODEL_DIR, data_dir=data_dir, out_dir=work.out_dir,
            config=config, seed=seed, deepspeed=deepspeed, compute=compute,
        )  # fmt: skip
        return publish(
            context,
            key,
            work.out_dir,
            mlflow_run_id=work.mlflow_run_id,
            phase="sft",
            config=config,
            seed=seed,
            parents={"data": data.ref.key},
            metrics=SFT.namespaced(metrics),
        )
