"""Resumable checkpoints of a training phase in the object store (rlhf_core's ``Checkpointer``).

A phase whose artifact goes to ``<key>`` keeps its checkpoints under ``<key>.checkpoints/step-<n>/``: one
safetensors file of weights per model and ``state.pt`` (optimizer, scheduler, RNG states, data position), sealed by a
manifest like every artifact, so a checkpoint cut off by a crash is never taken for a complete one. Only the
newest complete checkpoint is kept; the phase deletes them all once its artifact is published.

Under data parallelism (a phase run as torchrun ranks on one machine) every rank saves and restores together: each
rank's state (its share of ZeRO's sharded optimizer state, its own sampling RNG) goes to ``state.rank<r>.pt``
beside rank 0's ``state.pt``, and rank 0 uploads and seals the step once every rank has written its file.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import Tensor

from infra.credentials import open_configured_store
from infra.storage import ObjectStore, download_dir, is_complete, upload_dir

STATE_FILE = "state.pt"
_STEP = re.compile(r"step-(\d{8})")

ResumeHook = Callable[[int, dict[str, Any]], None]


def checkpoint_prefix(artifact_key: str) -> str:
    return f"{artifact_key}.checkpoints"


def state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"state.rank{rank}.pt"


def _ranks() -> tuple[int, int]:
    """This process's rank and the world size: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects; a barrier too)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CheckpointSpec(BaseModel):
    """Where a phase keeps its checkpoints, as plain data: what the ranks of a phase started by torchrun open
    their checkpointers from."""

    model_config = ConfigDict(extra="forbid")
    store_uri: str
    aws_credentials_block: str | None = None
    artifact_key: str
    every: int
    metadata: dict[str, Any] = {}

    def open(self, on_resume: ResumeHook | None = None) -> StoreCheckpointer:
        store = open_configured_store(self.store_uri, self.aws_credentials_block)
        checkpointer = StoreCheckpointer(
            store, self.artifact_key, self.every, metadata=self.metadata, on_resume=on_resume
        )
        checkpointer.spec = self
        return checkpointer


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
        self.spec: CheckpointSpec | None = None  # set when opened from one (see CheckpointSpec.open)

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
        """The latest complete checkpoint: its weights, this rank's state and ``"step"``; None when there is none.
        Under data parallelism rank 0 downloads it once and every rank reads its own state from that copy."""
        rank, world = _ranks()
        steps = self._complete_steps() if rank == 0 else []
        tmp = tempfile.mkdtemp(prefix="rlhf-ckpt-") if steps else None
        try:
            metadata = download_dir(self.store, self._key(steps[-1]), Path(tmp)) if steps and tmp else None
            if world > 1:
                steps, tmp = _from_rank0((steps, tmp))
            if not steps or tmp is None:
                return None
            saved_by = 1 + len(list(Path(tmp).glob("state.rank*.pt")))
            if saved_by != world:
                raise RuntimeError(
                    f"checkpoint {self.store.full_uri(self._key(steps[-1]))} was saved by {saved_by} ranks and this "
                    f"run has {world}: resume it with deepspeed.num_processes={saved_by}"
                )
            weights = {path.stem: load_file(path) for path in Path(tmp).glob("*.safetensors")}
            state = torch.load(Path(tmp) / state_file(rank), weights_only=True)
            if world > 1:
                _from_rank0(None)  # every rank has read the copy before rank 0 deletes it
        finally:
            if rank == 0 and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        state |= {"step": steps[-1], "weights": weights}
        if self.on_resume is not None and rank == 0 and metadata is not None:
            self.on_resume(steps[-1], metadata)
        return state

    def save(self, step: int, weights: Mapping[str, dict[str, Tensor]], state: dict[str, Any]) -> None:
        """Save a step: called by every rank, each with its own ``state``; ``weights`` are rank 0's."""
        rank, world = _ranks()
        tmp = tempfile.mkdtemp(prefix="rlhf-ckpt-") if rank == 0 else None
        if world > 1:
            tmp = _from_rank0(tmp)
        assert tmp is not None
        try:
            torch.save(state, Path(tmp) / state_file(rank))
            if world > 1:
                _from_rank0(None)  # every rank's state is written
            if rank == 0:
                for name, tensors in weights.items():
                    save_file({k: v.contiguous() for k, v in tensors.items()}, Path(tmp) / f"{name}.safetensors")
                upload_dir(self.store, Path(tmp), self._key(step), {**self.metadata, "step": step})
                for older in self._steps():
                    if older < step:
                        self.store.delete_prefix(self._key(older))
                self.last_saved = self.store.full_uri(self._key(step))
        finally:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        if world > 1:
            _from_rank0(None)  # no rank runs ahead of a save that could still fail

    def clear(self) -> None:
        """Delete every checkpoint: the phase's artifact is published and they are no longer needed."""
        self.store.delete_prefix(self.prefix)
