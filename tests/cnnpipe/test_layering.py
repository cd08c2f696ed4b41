"""cnnpipe/ is layered along the data path: sources -> store -> models -> predictions -> monitoring.

Every import, function-local and TYPE_CHECKING ones included, points down that path or into the
shared base; no module reaches for another package's private names; no two modules import each
other, however indirectly.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.cnn.test_boundaries import import_cycle

CNNPIPE = Path(__file__).resolve().parents[2] / "cnnpipe"
# Which package may import which. `base` is cnnpipe/base/ with cnnpipe's top modules settings and
# errors; `demo` is cnnpipe/demo.py; every other name is a package of cnnpipe/.
BELOW_CLI = ("base", "demo", "server", "sources", "store", "models", "predictions", "monitoring", "reports")
ALLOWED = {
    "base": set(),
    "demo": {"base"},
    "server": {"base"},
    "sources": {"base"},
    "store": {"base", "sources"},
    "models": {"base", "server", "sources", "store"},
    "predictions": {"base", "server", "sources", "store", "models"},
    "monitoring": {"base", "server", "sources", "store", "models", "predictions"},
    "reports": {"base", "server", "sources", "store", "models", "predictions", "monitoring"},
    "cli": set(BELOW_CLI),
}
TOP_MODULES = {"settings": "base", "errors": "base", "demo": "demo"}


def module_name(path: Path) -> str:
    parts = path.relative_to(CNNPIPE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(CNNPIPE.rglob("*.py"))}


def layer(module: str) -> str:
    """The entry of ALLOWED a cnnpipe module belongs to."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # cnnpipe/__init__.py
    if (CNNPIPE / parts[1]).is_dir():
        return parts[1]
    return TOP_MODULES[parts[1]]


def package(module: str) -> str:
    """The package a module sits in: siblings share private names."""
    return module if (CNNPIPE.parent / module.replace(".", "/") / "__init__.py").exists() else module.rpartition(".")[0]


def imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, cnnpipe module, imported name or None) for every import anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names if alias.name.split(".")[0] == "cnnpipe"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "cnnpipe":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((node.lineno, submodule, None) if submodule in MODULES
                             else (node.lineno, node.module, alias.name))
    return found


def test_every_import_points_down_the_data_path():
    assert len(MODULES) > 40 and set(map(layer, MODULES)) == set(ALLOWED)
    offenders = [f"{path.relative_to(CNNPIPE.parent)}:{line}: {layer(module)} imports {target} ({layer(target)})"
                 for module, path in MODULES.items() for line, target, _ in imports(path)
                 if layer(target) not in ALLOWED[layer(module)] | {layer(module)}]
    assert offenders == []


def test_no_module_imports_another_packages_private_names():
    offenders = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        modules_bound = {}  # local name -> the cnnpipe module it is bound to
        for line, target, name in imports(path):
            if name is not None and name.startswith("_") and package(target) != package(module):
                offenders.append(f"{path.relative_to(CNNPIPE.parent)}:{line}: {target}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cnnpipe"):
                modules_bound |= {alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names
                                  if f"{node.module}.{alias.name}" in MODULES}
            elif isinstance(node, ast.Import):
                modules_bound |= {alias.asname: alias.name for alias in node.names
                                  if alias.asname and alias.name in MODULES}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules_bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and package(modules_bound[node.value.id]) != package(module)):
                offenders.append(f"{path.relative_to(CNNPIPE.parent)}:{node.lineno}: "
                                 f"{modules_bound[node.value.id]}.{node.attr}")
    assert offenders == []


def test_cnnpipe_modules_import_one_way():
    graph = {module: {target for _, target, _ in imports(path)} - {module} for module, path in MODULES.items()}
    assert import_cycle(graph) is None


def test_each_package_says_its_job_and_what_it_may_import():
    words = set(ALLOWED)
    for name, allowed in ALLOWED.items():
        init = CNNPIPE / name / "__init__.py"
        if name == "demo":
            continue
        docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
        said = re.search(r"^May import: (.*)$", docstring, re.MULTILINE)
        assert said and len(docstring) > len(said.group(0)) + 40, f"{init}: say its job and `May import: ...`"
        named = set(re.findall(r"\b[a-z]+\b", said.group(1).split("(")[0])) & words
        assert named - {name} == allowed, f"{init}: its docstring's `May import:` says {sorted(named)}"
