"""A separate virtualenv holding TRL 1.12.0 for side-by-side benchmarks; TRL is never a project dependency.

:func:`trl_python` creates the venv on first use under ``$RLHF_CACHE_DIR`` (default ``~/.cache/rlhf``) and returns
its interpreter. It is installed exactly from ``locks/trl.txt`` (every package pinned, torch alone first so that pip
takes the CPU wheel), and rebuilt when it was built from other pins: see :mod:`infra.pinned_env`.
"""

from __future__ import annotations

from pathlib import Path

from infra.pinned_env import LOCKS, PinnedEnv, cache_dir

TRL_VERSION = "1.12.0"
TORCH_PIN = "torch==2.13.0"


def trl_env() -> PinnedEnv:
    """The TRL venv (it may not exist yet)."""
    return PinnedEnv(cache_dir() / f"trl-{TRL_VERSION}-venv", LOCKS / "trl.txt", first=(TORCH_PIN,))


def trl_python() -> Path:
    """The TRL venv's python executable, creating and filling the venv on first use."""
    return trl_env().ensure()


if __name__ == "__main__":
    print(trl_python())
