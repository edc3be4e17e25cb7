"""The package's architecture as the tree shows it: subpackages on floors, imports only downwards, no cycles, small
functions, the project's own imports at the top of each file, no file names shared between folders."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssl_platform"
# From the bottom up: a module may import its own floor or the floors below it.
FLOORS = ["spec", "storage", "tracking", "data", "training", "sweeps", "launch", "cli", "__main__"]
SUBPACKAGES = {"storage", "tracking", "data", "training", "sweeps", "launch"}
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(("ssl_platform", *parts))] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssl_platform"):
            if node.module in modules:
                out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
    return out


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_subpackage_says_what_it_owns():
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert found == SUBPACKAGES
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 25, f"ssl_platform/{name}/__init__.py needs a paragraph saying what it owns"


def test_imports_run_only_downwards_and_without_cycles():
    modules = _modules()
    edges = {m: _imports(p, modules) for m, p in modules.items()}
    upward = [f"{a} -> {b}" for a, bs in edges.items() for b in bs
              if a.rsplit(".", 1)[-1] != "__init__" and FLOORS.index(_floor(b)) > FLOORS.index(_floor(a))]
    assert not upward, f"imports from a lower floor to a higher one: {upward}"
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [])
    assert not cycles, f"import cycles: {cycles}"


def test_floor_list_matches_the_tree():
    assert {_floor(m) for m in _modules()} <= set(FLOORS) | {"__init__"}


@pytest.mark.parametrize("folder", ["ssl_platform", "methods"])
def test_no_function_over_60_lines(folder):
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"


@pytest.mark.parametrize("folder", ["ssl_platform", "methods"])
def test_own_modules_are_imported_at_the_top(folder):
    """Only heavy optional libraries (ray, mlflow, boto3, ...) may be imported inside functions."""
    inside = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if (isinstance(node, ast.ImportFrom) and id(node) not in top and node.level == 0 and node.module
                    and node.module.split(".")[0] in ("ssl_platform", "methods")):
                inside.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
    assert not inside, f"the project's own modules imported inside functions: {inside}"


def test_no_two_files_share_a_name():
    names = defaultdict(list)
    for folder in ("ssl_platform", "methods"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name not in ("__init__.py", "__main__.py"):
                names[path.name].append(str(path.relative_to(ROOT)))
    shared = {k: v for k, v in names.items() if len(v) > 1}
    assert not shared, f"file names used twice: {shared}"


def test_test_only_code_lives_outside_the_package():
    text = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for name in ("class KillWorkerOnce", "class PoisonLoss", "class ViewDataset", "def build_view_transform",
                 "class MultiCropTransform"):
        assert name not in text, f"{name} is test / benchmark code: it belongs in tests/ or benchmarks/"
