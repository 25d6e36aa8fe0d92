"""The inhibition core's import structure: no module of memel.inhibition imports itself back
(directly or through others), and the collectives know nothing of the Inhibitor."""

from __future__ import annotations

import ast
from pathlib import Path

import memel.inhibition

PACKAGE = "memel.inhibition"
ROOT = Path(memel.inhibition.__file__).parent


def _module_name(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def _imports(path: Path) -> set[str]:
    """The memel.inhibition modules ``path`` imports anywhere (top level, functions, TYPE_CHECKING)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            # ``from . import x`` / ``from .pkg import x`` may name submodules
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(t for t in targets if t == PACKAGE or t.startswith(PACKAGE + "."))
    modules = {_module_name(p) for p in ROOT.glob("*.py")}
    return {t for t in found if t in modules and t != name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in sorted(ROOT.glob("*.py"))}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_import_graph_is_parsed() -> None:
    graph = _graph()
    assert f"{PACKAGE}.collectives" in graph[f"{PACKAGE}.sync"]
    assert f"{PACKAGE}.sync" in graph[f"{PACKAGE}.module"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the search finds cycles


def test_no_import_cycle_in_the_inhibition_package() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_collectives_and_sync_do_not_import_the_inhibitor() -> None:
    graph = _graph()
    for name in ("collectives", "sync"):
        reachable, todo = set(), [f"{PACKAGE}.{name}"]
        while todo:
            for target in graph[todo.pop()] - reachable:
                reachable.add(target)
                todo.append(target)
        assert f"{PACKAGE}.module" not in reachable, name
        assert "Inhibitor" not in {
            node.id for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())) if isinstance(node, ast.Name)
        }, name
