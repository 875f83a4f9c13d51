"""The package as a whole: no import cycle among its modules (a module-level, function-level or type-only import
all count: each is a dependency a reader follows), and one version."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "moa_vllm", ROOT / "kernels" / "moa_kernels")


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in package.rglob("*.py"):
            parts = list(path.relative_to(package.parent).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The modules of ours one import statement names (`from a import b` is module a.b when b is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: from the importing module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        origin = ".".join([*base, *([node.module] if node.module else [])])
    else:
        origin = node.module or ""
    return [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports. An import names the deepest of our modules its path starts with;
    the implicit import of a module's parent packages is not an edge (Python runs those first, in order)."""
    known = module_files()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported(node, module, path.name == "__init__.py", known):
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    graph[module].add(name)
    return graph


def test_the_import_graph_sees_imports_of_every_kind():
    graph = import_graph()
    assert "moa_vllm.vllm_plugin.moa.kernels_cuda" in graph["moa_vllm.vllm_plugin.moa.backend"]  # in a function
    assert "moa_vllm.vllm_plugin.moa.ring_state" in graph["moa_vllm.vllm_plugin.moa.engine_context"]  # TYPE_CHECKING
    assert "moa_vllm.planner.steps.profile" in graph["moa_vllm.planner.chain"]


def test_no_import_cycle_in_moa_vllm_or_kernels():
    try:
        order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
    assert len(order) == len(module_files()) > 50


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"a"}}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())


def test_one_version():
    from moa_vllm import __version__

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__


def test_no_test_module_imports_another_test_module():
    """Shared helpers live in plain modules (tests/**/<name>.py without test_) or conftest.py fixtures."""
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.rpartition(".")[2].startswith("test_")]
    assert not offenders, offenders
