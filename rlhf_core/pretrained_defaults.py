"""The defaults a pretrained base model gets in place of the toy world's.

The toy world's defaults train a 1M-parameter Llama from random weights on 48-token sequences: learning rates of
1e-3 and more, and a summed reward with the backbone's log-probability as a feature. On a pretrained model the same
values wreck it (SFT at 3e-3 takes SmolLM2-135M-Instruct's held-out loss from 1.6 to 19 in four steps) or start the
reward model far from chance (the summed score over a 49k vocabulary starts the Bradley-Terry loss at 10 rather than
0.69), and a chat template's prompt alone fills 48 tokens. So where ``data.base_model`` names a model, every setting
below that the config leaves unset takes the fine-tuning value instead; a value the config sets is kept.
"""

from __future__ import annotations

from contextlib import suppress
from functools import lru_cache
from pathlib import Path
from typing import Any

# section -> field -> the value for a pretrained base model (fine-tuning, chat-length sequences)
PRETRAINED_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"lr": 1e-5, "max_length": 320},
    "reward": {"lr": 1e-5, "max_length": 320, "pooling": "last", "logprob_coef": 0.0},
    "ppo": {"lr": 1e-5, "critic_lr": 1e-5, "max_new_tokens": 128},
    "dpo": {"lr": 1e-6, "max_length": 320},
    "preferences": {"max_new_tokens": 128},
    "evaluation": {"max_new_tokens": 128},
}


def model_context(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """Positions the model takes (``max_position_embeddings`` of its text config, a GGUF file's read from its
    metadata); None when its config does not say. OSError or ValueError when it has no readable config. Read once
    per file version: a config is validated several times a run (the CLI, the flow's parameter, the length checks),
    and a GGUF file's metadata is not free to parse."""
    path = Path(name_or_path).expanduser()
    read = path / "config.json" if path.is_dir() else path  # what the context is read from, whose edit must count
    stamp = read.stat().st_mtime_ns if read.exists() else None
    return _model_context(name_or_path, stamp, trust_remote_code)


@lru_cache(maxsize=16)
def _model_context(name_or_path: str, stamp: int | None, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    from rlhf_core.gguf_models import is_gguf  # torch and transformers: not at a config's import

    if is_gguf(name_or_path):
        file = Path(name_or_path).expanduser()
        model_config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    else:
        model_config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return getattr(model_config.get_text_config(), "max_position_embeddings", None)


def sized_to(defaults: dict[str, Any], context: int | None) -> dict[str, Any]:
    """``defaults`` with their lengths cut to a model's ``context``: a sequence at most the context, a response at
    most half of it (the prompt needs room too)."""
    if context is None:
        return defaults
    caps = {"max_length": context, "max_new_tokens": context // 2}
    return {name: min(value, caps[name]) if name in caps else value for name, value in defaults.items()}


def with_pretrained_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw pipeline config (as read from YAML and overrides) with :data:`PRETRAINED_DEFAULTS` filled in where it
    sets no value, their lengths sized to the model's context where its config can be read, when its
    ``data.base_model`` names a model; else ``raw`` unchanged. A section given as a model object (built in code) is
    taken as complete. A model that cannot be read here (or a hub id) is sized later, by the length checks against
    its context, and named by the data checks."""
    data = raw.get("data")
    base_model = getattr(data, "base_model", None) if not isinstance(data, dict) else data.get("base_model")
    if base_model is None:
        return raw
    context = None
    if Path(base_model).expanduser().exists():  # a hub id is not looked up here: offline, that waits a minute
        with suppress(OSError, ValueError):
            context = model_context(base_model, bool(raw.get("trust_remote_code", False)))
    out = dict(raw)
    for section, defaults in PRETRAINED_DEFAULTS.items():
        given = out.get(section)
        if given is None or isinstance(given, dict):
            out[section] = sized_to(defaults, context) | (given or {})
    return out
