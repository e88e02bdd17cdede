"""Lineages: iterative re-training that continues across pipeline runs (a nightly schedule, say).

A lineage is a name under the pipeline's storage prefix, holding two small objects:

    <prefix>/lineages/<name>/latest.json   where the lineage stands: the data and SFT artifacts, the latest policy,
                                           every preference dataset so far and the last completed iteration
    <prefix>/lineages/<name>/lock          present while a run advances the lineage: holder, flow run, created time

A run of a lineage takes the lock (create-if-absent, so of two concurrent runs exactly one gets it), reads
``latest.json``, trains further iterations and only then rewrites ``latest.json`` (one PUT or one rename: readers
see the old pointer or the new one, never a mix); the lock is released whatever happened. A lock left by a run
that was killed is broken with ``rlhf lineage unlock NAME``.

Storage level only: no Prefect, no MLflow. Artifact references are kept as the plain dicts the phase tasks
return (``PhaseOutput.model_dump()``), so this module does not depend on the task layer.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from infra.storage import ArtifactRef, ObjectNotFoundError, ObjectStore, StorageError, is_complete

__all__ = [
    "LINEAGE_NAME",
    "Lineage",
    "LineageError",
    "LineageLockedError",
    "LineagePointer",
    "LockInfo",
    "check_lineage_name",
]

LINEAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
POINTER = "latest.json"
LOCK = "lock"


class LineageError(StorageError):
    """A lineage that cannot be used as it is; the message names it and what to do."""


class LineageLockedError(LineageError):
    """Another run holds the lineage's lock."""


def check_lineage_name(name: str) -> str:
    """The name itself if it is safe as a storage key segment and an MLflow experiment suffix, else ValueError."""
    if not LINEAGE_NAME.match(name):
        raise ValueError(
            f"invalid lineage name {name!r}: 1-63 characters of lowercase letters, digits, '-' and '_', "
            f"starting with a letter or digit"
        )
    return name


class LineagePointer(BaseModel):
    """``latest.json``: the last completed state of a lineage."""

    model_config = ConfigDict(extra="forbid")
    lineage: str
    iteration: int = Field(ge=1, description="The last completed iteration; the next run starts at iteration + 1.")
    data: dict[str, Any] = Field(description="The data phase's output (PhaseOutput dump).")
    sft: dict[str, Any] = Field(description="The SFT model: the KL reference and reward-model initialization.")
    policy: dict[str, Any] = Field(description="The latest policy, where the next iteration starts from.")
    preferences: list[dict[str, Any]] = Field(description="Every preference dataset so far, oldest first.")
    reward: dict[str, Any] | None = Field(
        None, description="The latest reward model, where the next one starts from with reward.warm_start."
    )
    flow_run_id: str = Field("", description="The Prefect flow run that wrote this pointer.")
    mlflow_run_id: str = Field("", description="The MLflow run of that pipeline run.")
    updated_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @field_validator("data", "sft", "policy", "reward")
    @classmethod
    def _has_artifact(cls, output: dict[str, Any] | None) -> dict[str, Any] | None:
        if output is None:
            return None
        try:
            ArtifactRef.from_dict(output["artifact"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a phase output with an artifact reference (uri, key, digest): {e!r}") from e
        return output

    @field_validator("preferences")
    @classmethod
    def _have_artifacts(cls, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [cls._has_artifact(output) for output in outputs]

    def artifacts(self) -> list[ArtifactRef]:
        """Every artifact the lineage depends on."""
        outputs = (self.data, self.sft, self.policy, *self.preferences, *([self.reward] if self.reward else []))
        return [ArtifactRef.from_dict(o["artifact"]) for o in outputs]


class LockInfo(BaseModel):
    """The lock object's content."""

    model_config = ConfigDict(extra="ignore")
    holder: str = Field(description="Unique id of the acquiring process: host:pid:random.")
    flow_run_id: str = Field("", description="The Prefect flow run holding the lock, if any.")
    created_at: str = Field(description="When the lock was taken (UTC, ISO 8601).")


def new_holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lineage:
    """One lineage's pointer and lock in an object store."""

    def __init__(self, store: ObjectStore, prefix: str, name: str) -> None:
        self.store = store
        self.name = check_lineage_name(name)
        self.key = "/".join(p for p in (prefix.strip("/"), "lineages", name) if p)

    @property
    def pointer_key(self) -> str:
        return f"{self.key}/{POINTER}"

    @property
    def lock_key(self) -> str:
        return f"{self.key}/{LOCK}"

    def __repr__(self) -> str:
        return f"Lineage({self.store.full_uri(self.key)!r})"

    # ------------------------------------------------------------------------------------------- pointer

    def read(self) -> LineagePointer | None:
        """The pointer, or None for a lineage that has not completed a run yet. LineageError when the pointer is
        malformed or names an artifact that is no longer complete in the store."""
        uri = self.store.full_uri(self.pointer_key)
        try:
            raw = self.store.get_bytes(self.pointer_key)
        except ObjectNotFoundError:
            return None
        try:
            pointer = LineagePointer.model_validate_json(raw)
        except ValidationError as e:
            raise LineageError(
                f"lineage {self.name!r}: {uri} is not a valid pointer ({e.error_count()} problem(s), first: "
                f"{e.errors()[0]['msg']}); restore it or delete it to start the lineage over"
            ) from e
        if pointer.lineage != self.name:
            raise LineageError(f"lineage {self.name!r}: {uri} belongs to lineage {pointer.lineage!r}")
        missing = [ref.uri for ref in pointer.artifacts() if not is_complete(self.store, ref.key)]
        if missing:
            raise LineageError(
                f"lineage {self.name!r}: {uri} refers to artifacts that are missing or incomplete: "
                f"{', '.join(missing)}; restore them or delete {uri} to start the lineage over"
            )
        return pointer

    def advance(self, pointer: LineagePointer) -> None:
        """Replace the pointer (one atomic write). Call only while holding the lock."""
        if pointer.lineage != self.name:
            raise ValueError(f"pointer of lineage {pointer.lineage!r} given to lineage {self.name!r}")
        self.store.put_bytes(self.pointer_key, pointer.model_dump_json(indent=1).encode())

    # ---------------------------------------------------------------------------------------------- lock

    def holder(self) -> LockInfo | None:
        """Who holds the lock now, None when nobody does."""
        try:
            raw = self.store.get_bytes(self.lock_key)
        except ObjectNotFoundError:
            return None
        try:
            return LockInfo.model_validate_json(raw)
        except ValidationError:
            return LockInfo(holder=f"unreadable lock object ({len(raw)} bytes)", created_at="?")

    def acquire(self, flow_run_id: str = "") -> LockInfo:
        """Take the lock or raise LineageLockedError naming the holder and how to break a stale lock.

        Create-if-absent, then read back: the holder id must be ours (this also covers an S3 service that
        does not support conditional writes, where the fallback is check-then-put)."""
        info = LockInfo(
            holder=new_holder_id(),
            flow_run_id=flow_run_id,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.store.put_if_absent(self.lock_key, info.model_dump_json().encode())
        current = self.holder()
        if current is not None and current.holder == info.holder:
            return info
        raise LineageLockedError(self._locked_message(current))

    def _locked_message(self, current: LockInfo | None) -> str:
        uri = self.store.full_uri(self.lock_key)
        if current is None:  # released between our attempt and the read-back
            return f"lineage {self.name!r}: lost the race for its lock {uri} to another run; try again"
        run = f", flow run {current.flow_run_id}" if current.flow_run_id else ""
        return (
            f"lineage {self.name!r} is locked by {current.holder}{run} since {current.created_at} ({uri}): "
            f"another run of this lineage is in progress. If that run is no longer running (crashed or killed), "
            f"break the stale lock with `rlhf lineage unlock {self.name}` (with the run's --config/--set storage "
            f"options)"
        )

    def release(self, info: LockInfo) -> bool:
        """Delete the lock if ``info`` still holds it; False when someone broke it meanwhile (left alone)."""
        current = self.holder()
        if current is None or current.holder != info.holder:
            return False
        self.store.delete_prefix(self.lock_key)
        return True

    def unlock(self) -> LockInfo | None:
        """Break the lock whoever holds it (for a run that died holding it); returns the former holder."""
        current = self.holder()
        self.store.delete_prefix(self.lock_key)
        return current

    @contextmanager
    def locked(self, flow_run_id: str = "") -> Iterator[LockInfo]:
        """Hold the lock for the duration of the block; released on success, failure or cancellation."""
        info = self.acquire(flow_run_id)
        try:
            yield info
        finally:
            self.release(info)

    def describe(self) -> dict[str, Any]:
        """The pointer and the lock as plain data (for ``rlhf lineage show``)."""
        try:
            raw = self.store.get_bytes(self.pointer_key)
            pointer: Any = json.loads(raw)
        except ObjectNotFoundError:
            pointer = None
        holder = self.holder()
        return {
            "lineage": self.name,
            "pointer": self.store.full_uri(self.pointer_key),
            "latest": pointer,
            "lock": holder.model_dump() if holder else None,
        }
