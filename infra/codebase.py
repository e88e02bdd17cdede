"""The project's own modules and which of them each one imports (at module level or inside a function), read from
the source without running it: what the cache key's code digest covers, and what the layout tests check."""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "rlhf_core", "infra", "bench")


def module_path(module: str) -> Path | None:
    """The source file of a project module (``infra.storage``), or None when it is not one."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = PACKAGE_ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def project_imports(module: str) -> frozenset[str]:
    """The project modules ``module`` imports anywhere in its source (``from rlhf_core import world`` names
    ``rlhf_core.world``)."""
    path = module_path(module)
    if path is None:
        return frozenset()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # a submodule where there is one, else a name in the module
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if module_path(submodule) is not None else node.module)
    return frozenset(name for name in found if module_path(name) is not None and name != module)


def import_closure(roots: list[str]) -> dict[str, Path]:
    """Every project module reachable from ``roots`` by imports, with its source file."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen or (path := module_path(module)) is None:
            continue
        seen[module] = path
        todo += project_imports(module)
    return seen


@cache
def source_digest(roots: tuple[str, ...]) -> str:
    """Digest of the source of ``roots`` and of every project module they import, directly or not."""
    sha = hashlib.sha256()
    for module, path in sorted(import_closure(list(roots)).items()):
        sha.update(module.encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def code_version() -> str:
    """Digest of the source the phases run (the task modules and every project module they import, directly or
    not), so a change there invalidates caches and a change elsewhere (the CLI, the stack) does not."""
    return source_digest(tuple(m for m in all_modules() if m.startswith("tasks.")))


def all_modules(root: Path = PACKAGE_ROOT) -> list[str]:
    """Every project module under ``root``, subpackages included (``infra.storage``, ``infra.data.sources``; a
    subpackage's ``__init__`` as the subpackage itself), so neither the code digest nor the layout tests skip one."""
    found = set()
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if len(parts) > 1:  # a top-level package's own __init__ holds no code of ours
                found.add(".".join(parts))
    return sorted(found)


def git_commit() -> str | None:
    """The commit the project's source is checked out at, None outside a git checkout (an installed wheel)."""
    import subprocess

    if not (PACKAGE_ROOT / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None
