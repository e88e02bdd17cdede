"""How a training loop updates weights, kept behind one small interface so that a DeepSpeed engine
can stand in for plain torch without the loops changing."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class Engine(Protocol):
    """The optimizer side of a training loop: ``backward`` then ``step`` once per minibatch."""

    module: nn.Module

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TorchEngine:
    """AdamW with linear warmup then cosine decay, and gradient-norm clipping."""

    def __init__(
        self,
        module: nn.Module,
        lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        min_lr_ratio: float = 0.1,
    ) -> None:
        self.module = module
        self.max_grad_norm = max_grad_norm
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

        def lr_lambda(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> dict[str, float]:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": self.scheduler.get_last_lr()[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
