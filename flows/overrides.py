"""A config's raw data: a YAML file and ``--set section.key=value`` overrides, before any section is validated.
Kept apart from the config models, which import the algorithms, so that commands needing one section load fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars: 0.05, true, null, [1, 2], or plain strings."""
    return yaml.safe_load(text) if text.strip() else text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict (unknown keys are caught by validation)."""
    for item in overrides:
        path, sep, value = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        *parents, leaf = path.strip().split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parents[: i + 1])} is not a section")
            node = child
        node[leaf] = _parse_value(value)
    return data


def read_config_data(path: Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML file's mapping (empty without one) with the overrides applied; ConfigError names the file or item."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    return apply_overrides(data, overrides or [])


def describe_errors(error: ValidationError, prefix: str = "") -> str:
    """Every problem of a validation error as ``<prefix>section.key: message``, joined."""
    return "; ".join(f"{prefix}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
