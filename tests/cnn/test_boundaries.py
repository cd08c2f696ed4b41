"""cnn/ is plain PyTorch: it must run in a notebook without the orchestration stack."""

from __future__ import annotations

import ast
from pathlib import Path

FORBIDDEN = {"prefect", "mlflow", "duckdb", "cnnpipe", "tasks", "flows"}
CNN = Path(__file__).resolve().parents[2] / "cnn"


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_cnn_never_imports_the_orchestration_stack():
    files = sorted(CNN.rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(CNN)): imported_roots(f) & FORBIDDEN for f in files}
    assert {name: roots for name, roots in offenders.items() if roots} == {}
