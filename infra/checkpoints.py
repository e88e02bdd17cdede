"""Resumable checkpoints of a training phase in the object store (rlhf_core's ``Checkpointer``).

A phase whose artifact goes to ``<key>`` keeps its checkpoints under ``<key>.checkpoints/step-<n>/``: one
safetensors file of weights per model and ``state.pt`` (optimizer, scheduler, RNG states, data position), sealed by a
manifest like every artifact, so a checkpoint cut off by a crash is never taken for a complete one. Only the
newest complete checkpoint is kept; the phase deletes them all once its artifact is published.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from infra.storage import ObjectStore, download_dir, is_complete, upload_dir

STATE_FILE = "state.pt"
_STEP = re.compile(r"step-(\d{8})")

ResumeHook = Callable[[int, dict[str, Any]], None]


def checkpoint_prefix(artifact_key: str) -> str:
    return f"{artifact_key}.checkpoints"


class StoreCheckpointer:
    """Saves and restores a loop's checkpoints under ``checkpoint_prefix(artifact_key)``.

    ``metadata`` goes into every checkpoint's manifest (e.g. the MLflow run that logged the steps so far);
    ``on_resume(step, metadata)`` is called with the saved metadata when a checkpoint is restored.
    """

    def __init__(
        self,
        store: ObjectStore,
        artifact_key: str,
        every: int,
        *,
        metadata: dict[str, Any] | None = None,
        on_resume: ResumeHook | None = None,
    ) -> None:
        self.store, self.prefix, self.every = store, checkpoint_prefix(artifact_key), every
        self.metadata, self.on_resume = metadata or {}, on_resume
        self.last_saved: str | None = None

    def _steps(self) -> list[int]:
        """Steps with a checkpoint folder, complete or not."""
        names = {key[len(self.prefix) + 1 :].split("/", 1)[0] for key in self.store.list_keys(self.prefix)}
        return sorted(int(m.group(1)) for name in names if (m := _STEP.fullmatch(name)))

    def _complete_steps(self) -> list[int]:
        return [s for s in self._steps() if is_complete(self.store, self._key(s))]

    def _key(self, step: int) -> str:
        return f"{self.prefix}/step-{step:08d}"

    @property
    def latest_uri(self) -> str | None:
        """Where the newest complete checkpoint is, if any."""
        steps = self._complete_steps()
        return self.store.full_uri(self._key(steps[-1])) if steps else None

    def restore(self) -> dict[str, Any] | None:
        steps = self._complete_steps()
        if not steps:
            return None
        key = self._key(steps[-1])
        with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as tmp:
            metadata = download_dir(self.store, key, Path(tmp))
            weights = {path.stem: load_file(path) for path in Path(tmp).glob("*.safetensors")}
            state = torch.load(Path(tmp) / STATE_FILE, weights_only=True)
        state |= {"step": steps[-1], "weights": weights}
        if self.on_resume is not None:
            self.on_resume(steps[-1], metadata)
        return state

    def save(self, step: int, weights: Mapping[str, dict[str, Tensor]], state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as tmp:
            for name, tensors in weights.items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, Path(tmp) / f"{name}.safetensors")
            torch.save(state, Path(tmp) / STATE_FILE)
            upload_dir(self.store, Path(tmp), self._key(step), {**self.metadata, "step": step})
        for older in self._steps():
            if older < step:
                self.store.delete_prefix(self._key(older))
        self.last_saved = self.store.full_uri(self._key(step))

    def clear(self) -> None:
        """Delete every checkpoint: the phase's artifact is published and they are no longer needed."""
        self.store.delete_prefix(self.prefix)
