"""Import layering of the package: lower modules never import upper ones.

Every module of ``mm_subspace`` is parsed (imports at the top and inside functions; ``if TYPE_CHECKING:``
blocks do not run and are skipped) and the strongly connected components of the import graph are
computed. The only circle allowed is the layer <-> base-kind registry pair: an ``AdapterLayer`` reads its
base module through a ``BaseKind``, and a kind's default ``wrap`` builds the ``AdapterLayer``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mm_subspace

PACKAGE = Path(mm_subspace.__file__).parent
ALLOWED = {frozenset({"mm_subspace.bases", "mm_subspace.layer"})}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _owner(name: str, modules: dict[str, Path]) -> str:
    while name not in modules:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a package's ``__init__`` counts as the package)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "mm_subspace"]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] != "mm_subspace":
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[module].update(_owner(t, modules) for t in targets)
        graph[module].discard(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_cycle_finder_sees_a_circle_and_ignores_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_graph_reads_relative_function_level_imports():
    graph = import_graph()
    assert "mm_subspace.registry" in graph["mm_subspace.config"]  # AdapterConfig.from_dict, inside a function
    assert "mm_subspace.formats.common" in graph["mm_subspace.formats.kohya"]
    assert "mm_subspace.layer" not in graph["mm_subspace.registry"]  # only under TYPE_CHECKING


def test_no_import_circle_but_layer_and_base_registry():
    found = [c for c in cycles(import_graph()) if frozenset(c) not in ALLOWED]
    assert not found, f"import circles in mm_subspace: {[sorted(c) for c in found]}"


def test_lower_layers_import_no_upper_module():
    graph = import_graph()
    assert not graph["mm_subspace.bases"] - {"mm_subspace.layer"}, "bases registers no kinds of other modules"
    for low in ("mm_subspace.errors", "mm_subspace.patterns", "mm_subspace.atomic", "mm_subspace.compat"):
        assert graph[low] <= {"mm_subspace.errors"}, f"{low} imports {sorted(graph[low])}"
    for module, imported in graph.items():
        if module.startswith("mm_subspace.methods."):
            assert "mm_subspace.inject" not in imported, f"{module} imports the injector"


def test_star_import_binds_only_the_public_api():
    namespace: dict[str, object] = {}
    exec("from mm_subspace import *", namespace)
    assert "io" not in namespace and "annotations" not in namespace
    assert all(hasattr(mm_subspace, name) for name in mm_subspace.__all__)
    assert {"inject", "save_adapter", "load_adapter", "export_peft", "describe_adapter", "routing"} <= set(namespace)
