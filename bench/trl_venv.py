"""A separate virtualenv holding TRL 1.12.0 for side-by-side benchmarks; TRL is never a project dependency.

:func:`trl_python` creates the venv on first use under ``$RLHF_CACHE_DIR`` (default ``~/.cache/rlhf``) and returns
its interpreter. torch is installed alone first so pip takes the CPU wheel that lies on disk; the other pins then
resolve against it without pulling a CUDA build. A marker file, written only after both installs succeed and holding
the pin list, makes this idempotent: a half-built venv or one built with other pins is rebuilt from scratch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TRL_VERSION = "1.12.0"
TORCH_PIN = "torch==2.13.0"
TRL_PINS = (
    f"trl=={TRL_VERSION}",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "pyarrow==25.0.1",
)
MARKER = ".rlhf-installed"


def venv_dir() -> Path:
    """Where the TRL venv lives (it may not exist yet)."""
    cache = Path(os.environ.get("RLHF_CACHE_DIR", Path.home() / ".cache" / "rlhf"))
    return cache / f"trl-{TRL_VERSION}-venv"


def trl_python() -> Path:
    """The TRL venv's python executable, creating and filling the venv on first use."""
    root = venv_dir()
    python = root / "bin" / "python"
    marker = root / MARKER
    pins = "\n".join((TORCH_PIN, *TRL_PINS)) + "\n"
    if python.exists() and marker.is_file() and marker.read_text() == pins:
        return python
    print(f"bench: installing TRL {TRL_VERSION} into {root} (first use, about 1-2 minutes)", file=sys.stderr)
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_PIN], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*pip, *TRL_PINS], check=True, stdout=subprocess.DEVNULL)
    marker.write_text(pins)
    return python


if __name__ == "__main__":
    print(trl_python())
