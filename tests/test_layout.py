"""House rules that keep the layers apart, read from the source."""

import ast
import subprocess
import sys
from pathlib import Path

from infra.codebase import PACKAGE_ROOT, all_modules, module_path, project_imports

FORBIDDEN_IN_CORE = {"prefect", "mlflow", "boto3", "botocore", "deepspeed", "flows", "tasks", "infra"}
CLI_LIBRARIES = {"typer", "rich"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_rlhf_core_imports_no_orchestration_tracking_or_storage():
    offenders = {
        path.name: sorted(imported_modules(path) & FORBIDDEN_IN_CORE)
        for path in (PACKAGE_ROOT / "rlhf_core").rglob("*.py")
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_tasks_and_infra_never_import_flows():
    for folder in ("tasks", "infra"):
        for path in (PACKAGE_ROOT / folder).rglob("*.py"):
            assert "flows" not in imported_modules(path), path


def test_the_command_line_libraries_stay_in_flows():
    offenders = [
        m for m in all_modules() if not m.startswith("flows.") and imported_modules(module_path(m)) & CLI_LIBRARIES
    ]
    assert offenders == []


def find_cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset()}) is None
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"})}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_the_projects_modules():
    """Imports inside functions count: a cycle dodged by a late import is still a cycle."""
    assert find_cycle({module: project_imports(module) for module in all_modules()}) is None


def test_functions_of_more_than_four_parameters_take_the_rest_by_keyword():
    offenders = []
    for module in all_modules():
        for node in ast.walk(ast.parse(module_path(module).read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                positional = [a.arg for a in [*node.args.posonlyargs, *node.args.args] if a.arg not in ("self", "cls")]
                if len(positional) > 4:
                    offenders.append(f"{module}:{node.lineno} {node.name}({', '.join(positional)})")
    assert offenders == []


def test_a_config_is_read_and_checked_without_torch_or_the_services():
    """The CLI loads a config and finds a run already done before it imports any heavy library."""
    script = (
        "import sys; from flows.config import load_config; load_config(None, ['ppo.steps=3']); "
        "print(sorted(m for m in ('torch', 'transformers', 'prefect', 'mlflow', 'boto3') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=PACKAGE_ROOT
    )
    assert loaded.stdout.strip() == "[]"


def test_modules_are_found_in_subpackages_too(tmp_path):
    """A subpackage's modules count (a flat glob would skip them, and with them their imports and the code digest)."""
    for name in ("infra/__init__.py", "infra/storage.py", "infra/data/__init__.py", "infra/data/sources.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert all_modules(tmp_path) == ["infra.data", "infra.data.sources", "infra.storage"]


def test_no_relative_imports():
    """Every import names its module in full: the import graph (and so the layout rules and the code digest) reads
    only absolute imports."""
    relative = [
        module
        for module in all_modules()
        for node in ast.walk(ast.parse(module_path(module).read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert relative == []
