"""No function in ``stages/`` or ``flows/`` exists only for the tests.

A function only tests call is a second path beside the one production runs: a test can pass
on it while the real path is wrong. So every module-level function of ``stages/`` and
``flows/`` must be referenced by name from production code — ``stages/``, ``flows/``,
``benchmarks/``, ``docker/``, ``configs/`` or the entry points in ``pyproject.toml``, the
``Makefile`` and ``prefect.yaml`` — somewhere other than its own definition. ``tests/`` does
not count. A helper a test needs lives under ``tests/``.

Methods are not checked: frameworks call many of them by protocol (pydantic validators,
``readinto``, MLflow's ``predict``), which no name search can tell from a test-only method.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("stages", "flows")  # where functions are defined
PRODUCTION = ("stages", "flows", "benchmarks", "docker", "configs")  # where references count
ENTRY_POINT_FILES = ("pyproject.toml", "Makefile", "prefect.yaml")
ENTRY_POINTS = {"main", "run"}  # called by the executor (``stages.<name>.run``) or a launcher (``main``)

# Known test-only functions in files this change does not own, each with who should remove it.
# Empty it as they go: an entry whose function is referenced (or gone) fails the test below.
ALLOWED: dict[str, str] = {}

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A string constant naming a callable: "name", "module.name" or "path/module.py:name".
_NAMED = re.compile(r"^[\w./-]*?([A-Za-z_]\w*)$")


def _python_files(folders: tuple[str, ...]) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _names_in(node: ast.AST) -> Counter:
    """Every name ``node`` uses: variables, attributes, imports, and strings that name a callable."""
    found: Counter = Counter()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            found[child.id] += 1
        elif isinstance(child, ast.Attribute):
            found[child.attr] += 1
        elif isinstance(child, ast.alias):
            found[child.name.rsplit(".", 1)[-1]] += 1
        elif isinstance(child, ast.Constant) and isinstance(child.value, str):
            match = _NAMED.match(child.value.replace(":", "."))
            if match:
                found[match.group(1)] += 1
    return found


def _module_functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Functions at module level, including those under a module-level ``if``/``try``."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            todo.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            todo.extend(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)
    return found


def _references() -> Counter:
    """How often each name is used in production code (Python by AST, other files by word)."""
    total: Counter = Counter()
    for path in _python_files(PRODUCTION):
        total += _names_in(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    others = [ROOT / name for name in ENTRY_POINT_FILES]
    others += [p for folder in PRODUCTION for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix != ".py"]
    for path in others:
        if not path.is_file() or path.stat().st_size > 2**20:
            continue  # docker/wheels/ may hold a torch wheel: no entry point hides in one
        try:
            total.update(_WORD.findall(path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue  # binary (an image)
    return total


def _unreferenced() -> dict[str, str]:
    """``{"path:function": ...}`` for module-level functions nothing in production refers to."""
    references = _references()
    missing = {}
    for path in _python_files(CHECKED):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for function in _module_functions(tree):
            name = function.name
            if name in ENTRY_POINTS or (name.startswith("__") and name.endswith("__")):
                continue
            own = _names_in(function)[name]  # a recursive call is not a caller
            if references[name] - own <= 0:
                missing[f"{path.relative_to(ROOT).as_posix()}:{name}"] = ""
    return missing


def test_every_function_in_stages_and_flows_has_a_production_caller():
    unreferenced = sorted(set(_unreferenced()) - set(ALLOWED))
    assert not unreferenced, (
        "only tests call these; make the test drive the production path, or move the helper under tests/: "
        + ", ".join(unreferenced)
    )


def test_the_allow_list_holds_only_functions_still_unreferenced():
    stale = sorted(set(ALLOWED) - set(_unreferenced()))
    assert not stale, f"referenced by production code now (or gone): remove from ALLOWED: {', '.join(stale)}"
