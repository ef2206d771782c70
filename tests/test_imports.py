"""The import graph of ``prunepath`` has no cycles where it is checked.

Every module is parsed (not imported) and every ``import prunepath...`` / ``from . import``
/ ``from .x import`` statement counts, at the top level and inside functions alike (a
function-level import hides a cycle from Python, not from this test). Importing a module
also runs its package's ``__init__``; that implicit edge is not counted (it never makes a
cycle at import time), an explicit ``from . import ops`` is.

``CHECKED`` lists the modules (or packages, with everything under them) that must not sit on
any cycle; extend it as cycles elsewhere are removed. ``test_whole_package`` turns on once
the package has none at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "prunepath"

CHECKED = ["prunepath.ops", "prunepath.checkpoint", "prunepath.convert"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(target: str, modules) -> str | None:
    """The module ``target`` names (a module, or the package whose attribute it is)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # ``from pkg import sub``: sub may be a module of its own, else a name in pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for t in targets:
                if t == "prunepath" or not t.startswith("prunepath"):
                    continue  # the root package's __init__ only re-exports (lazily)
                dep = _resolve(t, modules)
                if dep is not None and dep != name:
                    graph[name].add(dep)
    return graph


def cycles(graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _checked(module: str) -> bool:
    return any(module == c or module.startswith(c + ".") for c in CHECKED)


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "prunepath.ops.registry" in graph["prunepath.ops.dispatch"]
    assert "prunepath.ops.checks" in graph["prunepath.ops.cpp_backend"]


def test_no_cycle_through_checked_modules():
    bad = [c for c in cycles(import_graph()) if any(_checked(m) for m in c)]
    assert not bad, f"import cycles through {CHECKED}: {bad}"


def test_whole_package():
    found = cycles(import_graph())
    if found:
        pytest.skip(f"cycles outside the checked modules remain: {found}")
    assert not found


def test_backends_are_reached_through_the_ops_table():
    """Outside prunepath.ops, nothing imports a backend module or the Triton kernels: the
    ops (and their table, prunepath.ops.registry) are the way to them."""
    private = {"prunepath.triton_kernels", "prunepath.ops.cpp_backend",
               "prunepath.ops.torch_backend", "prunepath.ops.triton_backend"}
    bad = {m: sorted(deps & private) for m, deps in import_graph().items()
           if deps & private and not m.startswith(("prunepath.ops", "prunepath.triton_kernels"))}
    assert not bad, f"modules reaching backends directly: {bad}"
