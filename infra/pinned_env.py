"""A virtualenv installed exactly from a lock file, for the programs the project runs beside itself (Label Studio
for labeling, TRL for side-by-side benchmarks).

Why: a program installed by name resolves its dependencies anew on every machine, so a new release of any of them
can break a fresh machine while every machine that already has the venv stays green (sentry-sdk 3.0 broke Label
Studio 1.23.2 this way). A lock lists every package at an exact version; pip installs it with ``--no-deps``, so
nothing is resolved; ``pip check`` proves the lock complete; and a marker holding the lock's digest makes a venv built
from other pins (or half built) get rebuilt rather than reused.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.codebase import PACKAGE_ROOT

LOCKS = PACKAGE_ROOT / "locks"
MARKER = ".rlhf-pins"
_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.!+_-]+$")


def cache_dir() -> Path:
    """Where the project keeps what it installs or makes once per machine: ``$RLHF_CACHE_DIR``, else
    ``~/.cache/rlhf``."""
    return Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf")


class PinnedEnvError(RuntimeError):
    """A pinned virtualenv could not be installed; the message names the venv, the lock and pip's complaint."""


def read_lock(lock: Path) -> list[str]:
    """The ``name==version`` lines of a lock file (comments and blank lines dropped); any other line is an error
    naming the file and line."""
    if not lock.is_file():
        raise PinnedEnvError(f"lock file {lock} does not exist")
    pins = []
    for number, raw in enumerate(lock.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line and not _PIN.match(line):
            raise PinnedEnvError(f"{lock}, line {number}: {raw.strip()!r} is not an exact pin (name==version)")
        if line:
            pins.append(line)
    return pins


@dataclass(frozen=True)
class PinnedEnv:
    """A virtualenv at ``root`` holding exactly the packages of ``lock``; ``first`` are installed alone before the
    rest (torch, so that pip takes the CPU wheel)."""

    root: Path
    lock: Path
    first: tuple[str, ...] = ()

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def digest(self) -> str:
        """What the venv must have been built from: the lock's content, what goes first, and the Python version."""
        text = "\n".join([*read_lock(self.lock), "first:", *self.first, f"python {platform.python_version()}"])
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> str:
        """The venv and its pins, for error messages."""
        return f"venv {self.root}, pinned by {self.lock} (sha256 {self.digest()[:12]})"

    def is_current(self) -> bool:
        marker = self.root / MARKER
        return self.python.exists() and marker.is_file() and marker.read_text().strip() == self.digest()

    def ensure(self) -> Path:
        """The venv's python, after (re)building the venv unless it was built from exactly these pins."""
        if self.is_current():
            return self.python
        why = "built from other pins" if (self.root / MARKER).exists() else "not built from a lock yet"
        state = why if self.python.exists() else "first use"
        print(f"installing {self.root} from {self.lock} ({state}; a minute or more)", file=sys.stderr)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        (self.root / MARKER).unlink(missing_ok=True)
        self._run([sys.executable, "-m", "venv", "--clear", str(self.root)], "creating the venv")
        pip = [str(self.python), "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check"]
        if self.first:
            self._run([*pip, *self.first], f"installing {' '.join(self.first)}")
        self._run([*pip, "-r", str(self.lock)], "installing the lock")
        self._run([str(self.python), "-m", "pip", "check"], "pip check (is the lock complete?)")
        (self.root / MARKER).write_text(self.digest() + "\n")
        return self.python

    def _run(self, cmd: list[str], step: str) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            output = "\n".join(line for line in (done.stdout + done.stderr).splitlines() if "is ignored" not in line)
            raise PinnedEnvError(f"{step} failed for {self.describe()}:\n{output[-3000:]}")
