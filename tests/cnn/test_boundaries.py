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


def cnn_imports(path: Path) -> set[str]:
    """The cnn/ modules a file imports anywhere in it, function-local and TYPE_CHECKING imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("cnn.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "cnn":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cnn."):
            names.add(node.module.split(".")[1])
    return names - {path.stem}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in a module graph, as the modules along it, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported, [*path, module]):
                return cycle
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module, []))), None)


def test_cnn_modules_import_one_way():
    graph = {path.stem: cnn_imports(path) for path in CNN.glob("*.py")}
    assert import_cycle(graph) is None


def test_the_data_and_loop_modules_never_reach_up_to_training_runs_or_inference():
    # From the bottom up: decoding and splits, loaders and augment, device, loop; then runs, train, launch, predict.
    lower = ("decoding", "splits", "loaders", "augment", "device", "loop")
    upper = {"runs", "train", "launch", "predict"}
    reaching_up = {module: cnn_imports(CNN / f"{module}.py") & upper for module in lower}
    assert {module: found for module, found in reaching_up.items() if found} == {}
