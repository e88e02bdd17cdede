"""The pipeline's one parameter: a validated config with a section per phase."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.overrides import ConfigError, describe_errors, read_config_data
from infra.credentials import StorageConfig, refuse_credentials
from infra.deepspeed_config import DeepSpeedConfig
from infra.lineage import check_lineage_name
from rlhf_core.config import ComputeConfig, DPOConfig, EvalConfig, PPOConfig, PreferenceConfig, RewardConfig, SFTConfig
from rlhf_core.data import DataConfig
from rlhf_core.pretrained_defaults import with_pretrained_defaults

DEFAULT_TRACKING_ROOT = Path("./rlhf-mlflow")


class TrackingConfig(BaseModel):
    """Where metrics go."""

    model_config = ConfigDict(extra="forbid")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else a SQLite file ./rlhf-mlflow/mlflow.db.",
    )
    experiment: str = Field(
        "rlhf", description="MLflow experiment name; a run with a lineage logs to '<experiment>/<lineage>'."
    )
    champion_metric: Literal["auto", "win_rate_vs_sft", "human_win_rate_vs_sft", "gold_reward"] = Field(
        "auto",
        description="What an iteration's policy must beat the registered champion on to take the 'champion' alias "
        "(higher is better); auto: the human-judged win rate vs SFT where people judge (evaluation.human_pairs), "
        "else the gold-judged one.",
    )
    system_metrics_interval: float = Field(
        5.0,
        ge=0,
        description="Seconds between samples of CPU, memory, disk, network and GPU use logged to each phase's run "
        "as system/... metrics (MLflow's system metrics); 0: off.",
    )
    copy_weights_max_mb: float = Field(
        256,
        ge=0,
        description="A policy whose weights are at most this many MiB is copied whole into MLflow with its logged "
        "model; a larger one is logged without weights and found by its object-store location (rlhf export reads "
        "it there), rather than stored twice per iteration (a 135M-parameter model in fp32 is 515 MiB).",
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        refuse_credentials(uri, "use MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
        return uri

    def resolved_uri(self, root: Path = DEFAULT_TRACKING_ROOT) -> str:
        """Where this run logs: ``uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store at ``<root>/mlflow.db``
        (made absolute, so it names one file from any working directory)."""
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve()}/mlflow.db"


class PipelineConfig(BaseModel):
    """SFT, then iterations of preference collection, reward modeling and PPO (or DPO), and evaluation."""

    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, description="Seed of the world, every phase's sampling and initialization.")
    iterations: int = Field(
        3, ge=1, le=20, description="RLHF iterations after SFT (InstructGPT-style 3-5); with a lineage, further ones."
    )
    lineage: str | None = Field(
        None,
        description="Continue this named lineage: reuse its data and SFT model, start from its latest policy and "
        "preferences and number the new iterations after its last one (pointer and lock under "
        "<storage.prefix>/lineages/<name>/). Lowercase letters, digits, '-', '_'; null: a standalone run.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Prompts, demonstrations and base model.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning.")
    preferences: PreferenceConfig = Field(default_factory=PreferenceConfig, description="Preference collection.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward-model training.")
    algorithm: Literal["ppo", "dpo"] = Field(
        "ppo",
        description="Each iteration's policy phase: ppo (a reward model, then PPO against it) or dpo (DPO on the "
        "preference pairs; no reward model is trained).",
    )
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO with a KL penalty (algorithm: ppo).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Direct preference optimization (algorithm: dpo).")
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    deepspeed: DeepSpeedConfig | None = Field(
        None,
        description="Train SFT, the reward model and PPO with DeepSpeed ZeRO (e.g. {zero_stage: 3, precision: "
        "bf16}); null: plain torch. Needs the 'scale' extra (pip install -e '.[scale]').",
    )
    compute: ComputeConfig = Field(
        default_factory=ComputeConfig,
        description="How the models run on the hardware: mixed precision under plain torch (autocast), activation "
        "recomputation (gradient_checkpointing) and the attention kernel (attn_implementation).",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object storage.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    trust_remote_code: bool = Field(
        False,
        description="Run code shipped inside model repositories (off: only "
        "architectures transformers knows are loaded).",
    )

    @model_validator(mode="before")
    @classmethod
    def _pretrained_defaults(cls, raw: object) -> object:
        """Fine-tuning defaults in place of the toy world's where data.base_model names a pretrained model."""
        return with_pretrained_defaults(raw) if isinstance(raw, dict) else raw

    @field_validator("lineage")
    @classmethod
    def _safe_lineage(cls, lineage: str | None) -> str | None:
        return None if lineage is None else check_lineage_name(lineage)

    @model_validator(mode="after")
    def _lora_below_zero3(self) -> PipelineConfig:
        fields = {"ppo.lora": self.ppo.lora, "ppo.critic_lora": self.ppo.critic_lora, "dpo.lora": self.dpo.lora}
        lora = [name for name, value in (fields | {"reward.lora": self.reward.lora}).items() if value is not None]
        if self.deepspeed is not None and self.deepspeed.zero_stage == 3 and lora:
            raise ValueError(
                f"{lora[0]} with deepspeed.zero_stage 3 is not supported: LoRA's adapters train under ZeRO 0-2 "
                f"(its frozen base weights are not sharded there); set zero_stage to 2 or {lora[0]} to null"
            )
        return self

    @model_validator(mode="after")
    def _one_precision_setting(self) -> PipelineConfig:
        compute, deepspeed = self.compute, self.deepspeed
        if compute.attn_implementation == "flash_attention_2" and deepspeed is not None:
            raise ValueError(
                "compute.attn_implementation flash_attention_2 with deepspeed is not supported: flash-attn runs in "
                "bf16 or fp16 only, and the phases outside DeepSpeed (preferences, evaluation) get that from "
                "compute.autocast, which deepspeed refuses; use sdpa"
            )
        if compute.attn_implementation == "flash_attention_2" and compute.autocast == "off":
            raise ValueError(
                "compute.attn_implementation flash_attention_2 runs in bf16 or fp16 only: set compute.autocast to "
                "bf16 or fp16"
            )
        if compute.autocast != "off" and deepspeed is not None:
            raise ValueError(
                f"compute.autocast={compute.autocast} with deepspeed is refused: under DeepSpeed the precision is "
                "deepspeed.precision (e.g. deepspeed: {precision: bf16}); set compute.autocast to off"
            )
        return self

    @model_validator(mode="after")
    def _equal_rank_shares(self) -> PipelineConfig:
        ranks = self.deepspeed.num_processes if self.deepspeed is not None else 1
        if self.algorithm == "ppo" and self.ppo.rollout_batch_size % ranks:
            raise ValueError(
                f"ppo.rollout_batch_size={self.ppo.rollout_batch_size} must be a multiple of "
                f"deepspeed.num_processes={ranks}: every rank samples an equal share of each rollout batch"
            )
        return self

    @property
    def max_tokens(self) -> int:
        """The longest prompt + response that training keeps: every user dataset row must fit it."""
        return min(self.sft.max_length, self.reward.max_length)

    @property
    def experiment(self) -> str:
        """The MLflow experiment of this run: one per lineage."""
        return f"{self.tracking.experiment}/{self.lineage}" if self.lineage else self.tracking.experiment


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (optional), apply overrides, validate. ConfigError names every bad key."""
    data = read_config_data(path, overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{f'{path}: ' if path else ''}invalid config: {describe_errors(e)}") from e
