"""DeepSpeed ZeRO behind rlhf_core's ``Engine``: the same loops train under plain torch or ZeRO stage 0-3,
with the DeepSpeed config built here, in Python, from the phase's settings (no JSON template to drift).

``deepspeed`` is imported only when an engine is built, so nothing else pays for it (or needs it installed).
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
from typing import Any

import torch
from torch import Tensor, nn

from infra.deepspeed_config import DeepSpeedConfig, deepspeed_config, inference_config
from rlhf_core.engine import Optimization, optimizer_and_scheduler


class _CpuFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


def quiet_unused_deepspeed() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU" notice in a run that does not use DeepSpeed: accelerate's
    ``save_pretrained`` path imports DeepSpeed whenever it is installed, and that import warns on a machine without a
    GPU. The filter sits on the logger DeepSpeed creates at import, so it must be added before that import."""
    logging.getLogger("DeepSpeed").addFilter(_CpuFallbackNotice())


def inference_module(module: nn.Module, config: DeepSpeedConfig | None) -> nn.Module:
    """A frozen model (PPO's reference and reward model) that only runs forward. Under ZeRO-3 its weights are
    sharded over the ranks like the trained models' and gathered module by module in each forward (a DeepSpeed
    engine with no optimizer; its hooks sit on the module returned, so callers use it as a plain model).
    Below stage 3 there is nothing to shard: the module comes back as it is."""
    if config is None or config.zero_stage != 3:
        return module
    import deepspeed

    ensure_process_group_env()
    engine, *_ = deepspeed.initialize(model=module, config=inference_config(config))
    return engine.module.eval()


def _plain(value: Any) -> bool:
    """Whether ``value`` is made of tensors, numbers, strings and containers of them only."""
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(map(_plain, value))
    return value is None or isinstance(value, Tensor) or type(value) in (bool, int, float, str)  # no enums


def ensure_process_group_env() -> None:
    """A single process outside any launcher still needs the rendezvous variables (else DeepSpeed asks for MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class DeepSpeedEngine:
    """``rlhf_core.engine.Engine`` over ``deepspeed.initialize``: AdamW with warmup and cosine decay as in
    TorchEngine, with ZeRO sharding, offload and mixed precision from ``config``."""

    def __init__(
        self,
        module: nn.Module,
        config: DeepSpeedConfig,
        optimization: Optimization,
        micro_batch_size: int = 1,
    ) -> None:
        import deepspeed

        ensure_process_group_env()
        optimizer, scheduler = optimizer_and_scheduler(module, optimization, fused=False)  # ZeRO owns the params
        self.config = config
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(config, micro_batch_size, optimization.max_grad_norm),
        )
        self.module = self.engine.module
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def backward(self, loss: Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the loss is this rank's share of a sum, so scale it back
        self.engine.backward(loss * self.world_size)

    def sum_across_ranks(self, value: Tensor) -> Tensor:
        total = value.detach().clone()
        torch.distributed.all_reduce(total)
        return total

    def gather_across_ranks(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def step(self) -> dict[str, float]:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": self.scheduler.get_last_lr()[0]}

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer and schedule state, for a resumable checkpoint: under ZeRO the rank's own
        partition of the optimizer state and fp32 master weights (each rank saves its own). Only plain values and
        tensors are kept (DeepSpeed's own objects, such as its loss scaler, come from the engine that loads it),
        so the state loads with ``torch.load(weights_only=True)``."""
        saved = self.engine.optimizer.state_dict()
        scaler = saved.get("loss_scaler")
        return {
            "optimizer": {k: v for k, v in saved.items() if _plain(v)},
            "loss_scaler": {k: v for k, v in vars(scaler).items() if _plain(v)} if scaler is not None else {},
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`, into an engine built as the saving one was (same stage, precision and
        number of ranks), after :meth:`load_full_state_dict` has set the weights."""
        optimizer = self.engine.optimizer
        merged = optimizer.state_dict() | state["optimizer"]
        if (scaler := merged.get("loss_scaler")) is not None:
            for name, value in state["loss_scaler"].items():
                setattr(scaler, name, value)
        if "state_dict_list" in inspect.signature(optimizer.load_state_dict).parameters:  # ZeRO's and bf16's
            # every rank's state in rank order, each rank reading its own; the fp32 master weights from it too
            optimizer.load_state_dict([merged] * self.world_size, load_from_fp32_weights=True)
        else:
            optimizer.load_state_dict(merged)
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, Tensor]:
        """Every weight, whole and in fp32 (gathered from the ranks' shards under ZeRO-3), for save_pretrained."""
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.config.zero_stage == 3):
            return {k: v.detach().to(torch.float32).clone() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Set every weight of the module. ZeRO's fp32 master copy is left as is: :meth:`load_state_dict` sets it
        when resuming; otherwise use this after training only."""
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=self.config.zero_stage == 3):
            dtype = next(self.module.parameters()).dtype
            self.module.load_state_dict({k: v.to(dtype) for k, v in state.items()})
