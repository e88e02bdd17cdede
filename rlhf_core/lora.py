"""LoRA policies (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through peft.

The policy trains low-rank adapters on frozen base weights, and PPO's frozen reference is the same model with
its adapters switched off, so one copy of the base weights serves both (and the optimizer holds state for the
adapters only). A reward model or a critic can train as adapters too, with its scalar head trained in full.
``peft`` is imported only when a LoRA model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from rlhf_core.config import LoRAConfig

ADAPTER_DIR = "adapter"


def add_lora(model: nn.Module, config: LoRAConfig, *, scorer: bool = False) -> nn.Module:
    """``model`` with fresh adapters (the base weights frozen, dropout off). A ``scorer`` (a sequence-classification
    model: reward model or critic) trains its scalar head ``score`` in full beside the adapters."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=config.target_modules,
        task_type="SEQ_CLS" if scorer else "CAUSAL_LM",
        modules_to_save=["score"] if scorer else None,
    )
    return get_peft_model(model, lora)


def merged(model: nn.Module) -> nn.Module:
    """A model with its adapters folded into its weights, as a plain transformers model (itself without adapters)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def load_lora(base: nn.Module, adapter_dir: Path) -> nn.Module:
    """``base`` with the trainable adapters saved in ``adapter_dir``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)


class AdaptersDisabled(nn.Module):
    """A LoRA policy seen with its adapters off: its base model, shared rather than copied. Holds the policy
    outside its own submodules, so ``eval()`` or ``requires_grad_()`` here never reach the policy."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self._policy = [policy]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self._policy[0]
        with policy.disable_adapter():
            return policy(*args, **kwargs)
