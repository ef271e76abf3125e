"""The package's module-level import graph (parsed with `ast`, nothing imported): no cycles, and the
low layers (`raypdm.models`, `raypdm.data`) never import the front ends (`raypdm.pipelines`, `raypdm.cli`)
at module level. Imports inside functions (the lazy ones) and under `if TYPE_CHECKING:` do not count."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "raypdm"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def _module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]):
    """Import statements that run when the module is imported: the top level, and inside top-level
    try/except, if (not `if TYPE_CHECKING:`), with, loops and class bodies; never inside functions."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            yield from _module_level_imports(node.body)
            for handler in node.handlers:
                yield from _module_level_imports(handler.body)
            yield from _module_level_imports(node.orelse)
            yield from _module_level_imports(node.finalbody)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            yield from _module_level_imports(node.body)
            yield from _module_level_imports(getattr(node, "orelse", []))
        elif isinstance(node, ast.ClassDef):
            yield from _module_level_imports(node.body)


def _known(name: str) -> str | None:
    """`name` if it is a raypdm module, else its longest prefix that is one (None outside raypdm)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def import_graph() -> dict[str, dict[str, str]]:
    """module -> {imported module: how}. `how` is "explicit" (the statement names that module) or
    "package of X" (importing raypdm.x.y runs raypdm/x/__init__.py first; not counted for the importer's
    own parent packages, which are already being imported when it runs)."""
    graph: dict[str, dict[str, str]] = {name: {} for name in MODULES}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for node in _module_level_imports(tree.body):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE and (known := _known(alias.name)):
                        targets.add(known)
            else:
                source = _resolve_from(module, node)
                if source.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in MODULES:
                        targets.add(sub)
                    elif known := _known(source):
                        targets.add(known)
        own_parents = set(_ancestors(module))
        for target in targets:
            if target != module:
                graph[module][target] = "explicit"
        for target in targets:
            for parent in _ancestors(target):
                if parent != module and parent not in own_parents and parent not in graph[module]:
                    graph[module][parent] = f"package of {target}"
    return graph


def _cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # shortest path back to `start` inside the component (BFS)
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w not in members:
                        continue
                    if w == start:
                        found = v
                        break
                    if w not in previous:
                        previous[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.append(v)
            v = previous.get(v)
        path = [start] + list(reversed(path[1:])) + [start]
        cycles.append(path)
    return cycles


def _describe(path: list[str], graph: dict[str, dict[str, str]]) -> str:
    steps = [path[0]]
    for a, b in zip(path, path[1:]):
        how = graph[a][b]
        steps.append(f" -> {b}" + ("" if how == "explicit" else f" [{how}]"))
    return "".join(steps)


def test_graph_sees_the_package():
    graph = import_graph()
    assert len(graph) > 50
    # spot checks that the parser resolves absolute, `from package import module` and relative imports
    assert "raypdm.train.loggers" in graph["raypdm.pipelines.train"]
    assert "raypdm.protect.aspl" in graph["raypdm.protect"]  # `from raypdm.protect import aspl, ...`
    assert "raypdm.config" in graph["raypdm.train.loggers"]
    # lazy imports inside functions are not module-level edges
    assert "raypdm.data.uri" not in graph["raypdm.train.loggers"]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": "explicit"}, "b": {"c": "explicit"}, "c": {"a": "package of c.x"}, "d": {"a": "explicit"}}
    cycles = _cycles(graph)
    assert cycles == [["a", "b", "c", "a"]]
    assert _describe(cycles[0], graph) == "a -> b -> c -> a [package of c.x]"


def test_no_module_level_import_cycles():
    graph = import_graph()
    cycles = _cycles(graph)
    assert not cycles, "module-level import cycles:\n" + "\n".join(_describe(c, graph) for c in cycles)


def _subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_models_and_data_do_not_import_the_front_ends():
    graph = import_graph()
    low, high = ("raypdm.models", "raypdm.data"), ("raypdm.pipelines", "raypdm.cli")
    bad = sorted(
        f"{module} -> {target}" + ("" if how == "explicit" else f" [{how}]")
        for module, targets in graph.items()
        if _subpackage(module) in low
        for target, how in targets.items()
        if _subpackage(target) in high
    )
    assert not bad, "low layers import the front ends at module level:\n" + "\n".join(bad)
