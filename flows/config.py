"""The pipeline's one parameter: a validated config with a section per phase."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.deepspeed_engine import DeepSpeedConfig
from infra.lineage import check_lineage_name
from rlhf_core.evaluate import EvalConfig
from rlhf_core.ppo import PPOConfig
from rlhf_core.preferences import PreferenceConfig
from rlhf_core.reward import RewardConfig
from rlhf_core.sft import SFTConfig
from tasks.data import DataConfig

_BLOCK_NAME = re.compile(r"[a-z0-9-]+")


def _refuse_credentials(uri: str | None, where: str) -> None:
    """Refuse a URI with user:password in it: the config is stored as Prefect parameters and MLflow params."""
    if uri and "://" in uri:
        parts = urlsplit(uri)
        if parts.username or parts.password:
            raise ValueError(f"credentials in the URI would be stored with the run's parameters; {where}")


class StorageConfig(BaseModel):
    """Where checkpoints and datasets go."""

    model_config = ConfigDict(extra="forbid")
    uri: str = Field(
        default_factory=lambda: os.environ.get("RLHF_STORAGE_URI") or "./rlhf-artifacts",
        description="A local folder, or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL, credentials from the "
        "standard AWS environment); default RLHF_STORAGE_URI, else ./rlhf-artifacts.",
    )
    prefix: str = Field("pipelines/default", description="Key prefix of this pipeline's artifacts in the store.")
    aws_credentials_block: str | None = Field(
        None,
        description="Name of a Prefect AwsCredentials block to build the S3 client from (its keys, region and "
        "aws_client_parameters.endpoint_url, read from the Prefect API); null = the standard AWS environment. "
        "Only the name is stored with the run.",
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        _refuse_credentials(uri, "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        return uri

    @field_validator("aws_credentials_block")
    @classmethod
    def _block_name(cls, name: str | None) -> str | None:
        # Prefect's own rule for block names; it also refuses a pasted key (uppercase, '/', '+')
        if name is not None and not _BLOCK_NAME.fullmatch(name):
            raise ValueError("a Prefect block name: lowercase letters, digits and '-' (the name, never the key)")
        return name


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

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        _refuse_credentials(uri, "use MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
        return uri


class PipelineConfig(BaseModel):
    """SFT, then iterations of preference collection, reward modeling, PPO and evaluation."""

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
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO with a KL penalty.")
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    deepspeed: DeepSpeedConfig | None = Field(
        None,
        description="Train SFT, the reward model and PPO with DeepSpeed ZeRO (e.g. {zero_stage: 3, precision: "
        "bf16}); null: plain torch. Needs the 'scale' extra (pip install -e '.[scale]').",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object storage.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    trust_remote_code: bool = Field(
        False,
        description="Run code shipped inside model repositories (off: only "
        "architectures transformers knows are loaded).",
    )

    @field_validator("lineage")
    @classmethod
    def _safe_lineage(cls, lineage: str | None) -> str | None:
        return None if lineage is None else check_lineage_name(lineage)

    @model_validator(mode="after")
    def _lora_on_torch_only(self) -> PipelineConfig:
        if self.deepspeed is not None and self.ppo.lora is not None:
            raise ValueError("ppo.lora with deepspeed is not supported yet: set one of them to null")
        return self

    @property
    def max_tokens(self) -> int:
        """The longest prompt + response that training keeps: every user dataset row must fit it."""
        return min(self.sft.max_length, self.reward.max_length)

    @property
    def experiment(self) -> str:
        """The MLflow experiment of this run: one per lineage."""
        return f"{self.tracking.experiment}/{self.lineage}" if self.lineage else self.tracking.experiment


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars: 0.05, true, null, [1, 2], or plain strings."""
    return yaml.safe_load(text) if text.strip() else text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict (unknown keys are caught by validation)."""
    for item in overrides:
        path, sep, value = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        *parents, leaf = path.strip().split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parents[: i + 1])} is not a section")
            node = child
        node[leaf] = _parse_value(value)
    return data


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (optional), apply overrides, validate. ConfigError names every bad key."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        source = f"{path}: " if path else ""
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{source}invalid config: {problems}") from e
