"""How a training loop updates weights, kept behind one small interface so that a DeepSpeed engine
can stand in for plain torch without the loops changing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn


class Engine(Protocol):
    """The optimizer side of a training loop: ``backward`` then ``step`` once per minibatch.

    Under data parallelism each of ``world_size`` processes (``rank``) holds a share of the batch, and
    ``backward`` takes this rank's share of the batch loss: the shares sum to the loss of the whole batch.
    """

    module: nn.Module
    rank: int
    world_size: int

    def backward(self, loss: Tensor) -> None: ...

    def sum_across_ranks(self, value: Tensor) -> Tensor: ...

    def gather_across_ranks(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        ...

    def step(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def full_state_dict(self) -> dict[str, Tensor]:
        """Every weight of ``module``, whole and detached (gathered, where an engine shards them): what to save
        or to snapshot. No two entries share storage."""
        ...

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None: ...


Row = TypeVar("Row")


def rank_rows(rows: list[Row], engine: Engine) -> tuple[list[Row], float]:
    """This rank's rows of a batch (every ``world_size``-th, from ``rank``) and a weight for its loss share: 0 for a
    rank left without rows by a short last batch, which still takes part in the step with a copy of the first row
    (under ZeRO-3 every rank must run the same forwards and backwards)."""
    mine = rows[engine.rank :: engine.world_size]
    return (mine, 1.0) if mine else (rows[:1], 0.0)


@dataclass(frozen=True)
class Optimization:
    """How a phase optimizes, whatever the engine: AdamW, linear warmup then cosine decay to
    ``min_lr_ratio * lr`` over ``total_steps``, gradient-norm clipping at ``max_grad_norm`` (None: none)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    min_lr_ratio: float = 0.1


def optimizer_and_scheduler(
    module: nn.Module, optimization: Optimization, *, fused: bool = True
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters, with the warmup and decay ``optimization`` names. ``fused``: one
    kernel for all parameters (the same update, several times faster per step) where the parameters allow it."""
    o = optimization
    params = [p for p in module.parameters() if p.requires_grad]
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused or None)

    def lr_lambda(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, o.total_steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


class TorchEngine:
    """AdamW with linear warmup then cosine decay, and gradient-norm clipping, in plain torch."""

    def __init__(self, module: nn.Module, optimization: Optimization) -> None:
        self.module = module
        self.max_grad_norm = optimization.max_grad_norm
        self.optimizer, self.scheduler = optimizer_and_scheduler(module, optimization)

    rank, world_size = 0, 1

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def sum_across_ranks(self, value: Tensor) -> Tensor:
        return value

    def gather_across_ranks(self, value: Any) -> list[Any]:
        return [value]

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

    def full_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)
