"""House rules that keep the layers apart."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_CORE = {"prefect", "mlflow", "boto3", "botocore", "deepspeed", "flows", "tasks", "infra"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_rlhf_core_imports_no_orchestration_tracking_or_storage():
    offenders = {
        path.name: sorted(imported_modules(path) & FORBIDDEN_IN_CORE) for path in (ROOT / "rlhf_core").glob("*.py")
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_tasks_and_infra_never_import_flows():
    for folder in ("tasks", "infra"):
        for path in (ROOT / folder).glob("*.py"):
            assert "flows" not in imported_modules(path), path
