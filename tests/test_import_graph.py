"""No import cycle in ``stages/`` or ``flows/``, counting every import: top-level, inside functions, under
``TYPE_CHECKING``, relative ones resolved.

A cycle hidden inside functions still ties two modules together (neither can be read, moved or tested
without the other) and turns into an ImportError the day one of the imports moves to the top. The
stage contract's test (tests/test_stage_contract.py) checks module-level imports only; this one reads
all of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "flows")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of ``PACKAGES`` by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``path`` imports, anywhere in the file: ``from a.b import c`` gives ``a.b`` and
    ``a.b.c`` (whichever of them is a module counts); ``from . import x`` is resolved against ``module``."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            names.add(source)
            names |= {f"{source}.{alias.name}" for alias in node.names}
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {
        name: {m for m in imported_names(name, path) if m in modules and m != name} for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the path ``a -> b -> ... -> a``, or None."""
    state: dict[str, str] = {}
    for start in sorted(graph):
        if start in state:
            continue
        trail, todo = [start], [iter(sorted(graph[start]))]
        state[start] = "open"
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[trail.pop()] = "done"
                todo.pop()
            elif state.get(nxt) == "open":
                return [*trail[trail.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = "open"
                trail.append(nxt)
                todo.append(iter(sorted(graph[nxt])))
    return None


def test_stages_and_flows_have_no_import_cycle_even_inside_functions():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_imports_inside_functions_relative_ones_and_names_the_cycle(tmp_path):
    """The checker itself: a cycle made only of a function-level import and a relative import is found."""
    package = tmp_path / "stages"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "a.py").write_text("def f():\n    from stages.b import g\n", encoding="utf-8")
    (package / "b.py").write_text("from . import a\n", encoding="utf-8")
    (tmp_path / "flows").mkdir()
    graph = import_graph(tmp_path)
    assert graph["stages.a"] == {"stages.b"} and graph["stages.b"] == {"stages", "stages.a"}
    assert find_cycle(graph) == ["stages.a", "stages.b", "stages.a"]
    (package / "b.py").write_text("import json\n", encoding="utf-8")
    assert find_cycle(import_graph(tmp_path)) is None
