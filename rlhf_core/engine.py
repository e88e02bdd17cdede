"""How a training loop updates weights, kept behind one small interface so that a DeepSpeed engine
can stand in for plain torch without the loops changing; and how the models run on the hardware (``ComputeConfig``:
mixed precision, activation recomputation, the attention kernel)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from rlhf_core.config import Autocast

AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(autocast: Autocast, device: torch.device) -> torch.dtype | None:
    """The dtype ``compute.autocast`` runs matmuls in on ``device`` (None: off). ValueError, naming the field, for bf16
    on a CUDA GPU without it."""
    if autocast == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"compute.autocast=bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; set "
            "compute.autocast to fp16"
        )
    return AUTOCAST_DTYPES.get(autocast)


def outputs_in_fp32(output: Any) -> Any:
    """A forward's output with its half-precision tensors (a tensor, or the top-level tensors of a ModelOutput, dict,
    tuple or list: logits, hidden states) cast to fp32, so that log-softmax and losses are taken in fp32. Anything
    else (a KV cache, integers) is left as it is."""

    def fp32(value: Any) -> Any:
        return value.float() if isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16) else value

    if isinstance(output, Tensor):
        return fp32(output)
    if isinstance(output, dict):  # a transformers ModelOutput too: setting an item sets its attribute
        for key, value in list(output.items()):
            output[key] = fp32(value)
        return output
    if isinstance(output, tuple | list):
        return type(output)(fp32(value) for value in output)
    return output


def autocast_forward(module: nn.Module, dtype: torch.dtype, device_type: str) -> None:
    """Wrap ``module.forward`` (on the instance, as a method of it, so that a deep copy calls its own) to run under
    ``torch.autocast(device_type, dtype)`` and return its half-precision outputs in fp32 (:func:`outputs_in_fp32`);
    its signature stays the forward's. A forward already wrapped is wrapped anew at ``dtype``, not nested."""
    forward: Callable[..., Any] = module.forward
    if isinstance(forward, MethodType) and forward.__self__ is module:
        inner = getattr(forward, "autocast_inner", forward.__func__)  # the class's forward, or someone else's wrapper
    else:  # a plain function set on the instance by someone else

        def inner(_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return forward(*args, **kwargs)

    @functools.wraps(inner)
    def run(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            return outputs_in_fp32(inner(self, *args, **kwargs))

    run.autocast_inner = inner  # type: ignore[attr-defined]
    module.forward = MethodType(run, module)  # type: ignore[method-assign]


def autocast_model(model: nn.Module, autocast: Autocast, device: torch.device) -> nn.Module:
    """``model`` with its forward, and that of every transformers model inside it, under ``compute.autocast`` on
    ``device`` (:func:`autocast_forward`): the inner models are entry points too (``generate`` calls the causal LM
    inside a peft model, :func:`rlhf_core.modeling.token_scores` a scorer's ``base_model``); a scorer's head, called
    on its own, stays fp32. Weights are not touched. ``off``: ``model`` as it is. Returns ``model``."""
    dtype = autocast_dtype(autocast, device)
    if dtype is not None:
        for module in [model, *(m for m in model.modules() if isinstance(m, PreTrainedModel) and m is not model)]:
            autocast_forward(module, dtype, device.type)
    return model


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


def without_tied_copies(module: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """``weights`` (a :meth:`Engine.full_state_dict`) less a language-model head tied to the input embeddings: what
    ``save_pretrained`` should write. The copies no longer share storage, so without this the head is written a
    second time (a fifth of a small model's file); loading ties it again. Only that tie, found through the model's own
    accessors: the head is the same parameter as the embeddings."""
    body = getattr(module, "get_output_embeddings", lambda: None)
    head, embeddings = body(), getattr(module, "get_input_embeddings", lambda: None)()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return weights
    name = next(f"{prefix}.weight" for prefix, sub in module.named_modules() if sub is head)
    return {key: value for key, value in weights.items() if key != name}


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


def module_device(module: nn.Module) -> torch.device:
    """Where a module's first parameter lives (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


class TorchEngine:
    """AdamW with linear warmup then cosine decay, and gradient-norm clipping, in plain torch. With ``autocast``
    (``compute.autocast``) the module's forward runs in bf16 or fp16 (:func:`autocast_model`) while its weights,
    gradients and AdamW state stay fp32; fp16 scales the loss (``torch.amp.GradScaler``: a step whose gradients
    overflow is skipped and the scale lowered), its state part of :meth:`state_dict`."""

    def __init__(self, module: nn.Module, optimization: Optimization, *, autocast: Autocast = "off") -> None:
        self.module = module
        self.max_grad_norm = optimization.max_grad_norm
        self.optimizer, self.scheduler = optimizer_and_scheduler(module, optimization)
        device = module_device(module)
        autocast_model(module, autocast, device)
        self.scaler = torch.amp.GradScaler(device.type) if autocast == "fp16" else None

    rank, world_size = 0, 1

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def sum_across_ranks(self, value: Tensor) -> Tensor:
        return value

    def gather_across_ranks(self, value: Any) -> list[Any]:
        return [value]

    def step(self) -> dict[str, float]:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        norm = nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"grad_norm": float(norm), "lr": self.scheduler.get_last_lr()[0]}
        return metrics if self.scaler is None else metrics | {"loss_scale": self.scaler.get_scale()}

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return state if self.scaler is None else state | {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)
