"""The DeepSpeed section of the config and the DeepSpeed JSON built from it, in Python (no JSON template to drift),
importable without torch or DeepSpeed."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DeepSpeedConfig(BaseModel):
    """Train every phase with DeepSpeed ZeRO instead of plain torch."""

    model_config = ConfigDict(extra="forbid")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also weights."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO-Offload, stage >= 1).")
    offload_params: bool = Field(False, description="Keep weights in CPU memory between uses (ZeRO-Infinity, stage 3).")
    num_processes: int = Field(
        1,
        ge=1,
        description="Run SFT, the reward model, PPO and DPO as this many data-parallel processes (torchrun, started "
        "by the phase's task).",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision; bf16 and fp16 need hardware that has them (fp16 adds loss scaling)."
    )

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3: only stage 3 shards the weights")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self


def deepspeed_config(config: DeepSpeedConfig, micro_batch_size: int, max_grad_norm: float | None) -> dict[str, Any]:
    """The DeepSpeed JSON config for one engine. The optimizer and schedule are ours (client objects), so the
    config holds only what DeepSpeed itself does: sharding, offload, precision, clipping."""
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if config.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, the same optimizer as the plain-torch path
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def inference_config(config: DeepSpeedConfig) -> dict[str, Any]:
    """The DeepSpeed config of a frozen model: the training config's ZeRO-3 sharding, parameter offload and
    precision; no optimizer state to offload, and a micro batch DeepSpeed requires but inference ignores."""
    frozen = config.model_copy(update={"zero_stage": 3, "offload_optimizer": False})
    return deepspeed_config(frozen, micro_batch_size=1, max_grad_norm=None)
