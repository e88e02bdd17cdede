"""Every environment the project installs is pinned whole: the project's .venv by locks/project.txt, Label Studio's
and TRL's venvs by their own locks, installed exactly (a real venv, a real pip) and rebuilt when the lock changes."""

import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.trl_venv import TORCH_PIN, TRL_VERSION, trl_env
from infra.codebase import PACKAGE_ROOT
from infra.pinned_env import LOCKS, PinnedEnv, PinnedEnvError, read_lock
from infra.stack import LABEL_STUDIO, label_studio_env


def pins(lock: Path) -> dict[str, str]:
    return {canonicalize_name(line.split("==")[0]): line.split("==")[1] for line in read_lock(lock)}


def installed_closure(project: str, extras: set[str]) -> set[str]:
    """The canonical names of ``project`` and every distribution it needs, with ``extras``, as installed here."""
    todo, seen = [(project, extras)], set()
    while todo:
        name, wanted = todo.pop()
        if canonicalize_name(name) in seen:
            continue
        seen.add(canonicalize_name(name))
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            active = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in active):
                todo.append((req.name, set(req.extras)))
    return seen


def test_every_lock_is_exact_and_names_the_program_it_holds():
    assert sorted(p.name for p in LOCKS.glob("*.txt")) == ["label-studio.txt", "project.txt", "trl.txt"]
    assert f"label-studio=={pins(LOCKS / 'label-studio.txt')['label-studio']}" == LABEL_STUDIO
    trl = pins(LOCKS / "trl.txt")
    assert (trl["trl"], f"torch=={trl['torch']}") == (TRL_VERSION, TORCH_PIN)
    assert label_studio_env(Path("state")).lock == LOCKS / "label-studio.txt"
    assert trl_env().first == (TORCH_PIN,)


def test_the_project_lock_agrees_with_pyproject_and_holds_everything_installed():
    """Every pin of pyproject.toml is the lock's, and every distribution the project needs (with the extras that make
    test installs) is installed at the lock's version: a dependency the lock missed would float."""
    lock = pins(LOCKS / "project.txt")
    project = tomllib.loads((PACKAGE_ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    for text in declared:
        req = Requirement(text)
        assert str(req.specifier) == f"=={lock[canonicalize_name(req.name)]}", text
    needed = installed_closure("rlhf-pipeline", {"test", "scale", "gguf", "instruct"}) - {"rlhf-pipeline"}
    unpinned = sorted(n for n in needed if n not in lock)
    assert unpinned == [], f"not in locks/project.txt: {unpinned}"
    drifted = {n: (metadata.version(n), lock[n]) for n in needed if metadata.version(n).split("+")[0] != lock[n]}
    assert drifted == {}, "installed (left) differs from locks/project.txt (right); run make again"


def test_a_bad_lock_line_is_named_with_its_file_and_line(tmp_path):
    lock = tmp_path / "x.txt"
    lock.write_text("# comment\nsix==1.17.0\npython-dateutil>=2\n")
    with pytest.raises(PinnedEnvError, match=re.escape(f"{lock}, line 3: 'python-dateutil>=2' is not an exact pin")):
        read_lock(lock)


def site_packages(env: PinnedEnv) -> set[str]:
    out = subprocess.run([env.python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    return {line.split("==")[0].lower() for line in out.stdout.splitlines()}


@pytest.mark.slow
def test_a_pinned_env_is_installed_exactly_and_rebuilt_when_its_lock_changes(tmp_path):
    lock = tmp_path / "lock.txt"
    six, dateutil = (f"{n}=={metadata.version(n)}" for n in ("six", "python-dateutil"))
    lock.write_text(f"{six}\n{dateutil}\n")
    env = PinnedEnv(tmp_path / "venv", lock)
    assert not env.is_current()
    python = env.ensure()
    assert env.is_current() and {"six", "python-dateutil"} <= site_packages(env)
    marker = python.parent.parent / ".rlhf-pins"
    built = marker.stat().st_mtime_ns
    assert env.ensure() == python and marker.stat().st_mtime_ns == built  # reused as it is

    lock.write_text(f"{six}\n")  # other pins: the venv is rebuilt, and what the lock dropped is gone
    assert not env.is_current()
    env.ensure()
    assert "python-dateutil" not in site_packages(env) and env.is_current()

    lock.write_text(f"{dateutil}\n")  # incomplete: dateutil needs six, which nothing may resolve behind the lock
    incomplete = r"(?s)pip check \(is the lock complete\?\) failed for venv .*requires six"
    with pytest.raises(PinnedEnvError, match=incomplete):
        env.ensure()
    assert not env.is_current()  # a half-built venv is never taken for a good one
