"""Resumable training loops: what a loop hands to a checkpointer, and the numerical checks that stop it.

A loop saves every ``checkpointer.every`` steps named weights (state dicts, from ``Engine.full_state_dict``)
and a ``state`` dict of plain values and tensors (optimizer and scheduler state, RNG states, counters, the
data position), and on start asks for the latest complete checkpoint. Where checkpoints live is the caller's
business (``infra/``); the state must load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


class DivergenceError(RuntimeError):
    """Training went numerically wrong (a NaN or infinite loss, KL past its bound): retrying will not help."""


@runtime_checkable  # so a launcher can validate a call's arguments against the loop's signature
class Checkpointer(Protocol):
    every: int  # save every this many steps; 0 never saves

    def restore(self) -> dict[str, Any] | None:
        """The latest complete checkpoint's state, with ``"step"`` and ``"weights"`` (name -> state dict),
        or None when there is none."""
        ...

    def save(self, step: int, weights: Mapping[str, dict[str, Tensor]], state: dict[str, Any]) -> None: ...


def checkpoint_due(checkpointer: Checkpointer | None, step: int, total: int) -> bool:
    """Whether to save after ``step`` of ``total``: every ``every`` steps, never after the last one."""
    return checkpointer is not None and checkpointer.every > 0 and step % checkpointer.every == 0 and step < total


def check_finite(phase: str, step: int, **values: float) -> None:
    """Raise DivergenceError naming the first NaN or infinite value."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise DivergenceError(f"{phase}: {name} is {value} at step {step}; try a lower learning rate")


def rng_state(generator: torch.Generator | None = None, rng: random.Random | None = None) -> dict[str, Any]:
    """torch's global RNG, and a loop's own generator and ``random.Random`` when it has them."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if generator is not None:
        state["generator"] = generator.get_state()
    if rng is not None:
        version, internal, gauss = rng.getstate()
        state["random"] = [version, list(internal), gauss]
    return state


def set_rng_state(
    state: dict[str, Any], generator: torch.Generator | None = None, rng: random.Random | None = None
) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if generator is not None:
        generator.set_state(state["generator"])
    if rng is not None:
        version, internal, gauss = state["random"]
        rng.setstate((version, tuple(internal), gauss))
