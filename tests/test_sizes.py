"""Sizes the codebase holds (issue 25): a stage module reads on a few screens, a function on one.

- every stage module (``stages/<stage>.py``) is at most 300 lines;
- every function in ``stages/`` is at most 80 lines, docstring included, and takes at most
  8 parameters (more is a sign that a typed input is missing).

A failure names each offender with its size, so the fix starts from the message.
"""

from __future__ import annotations

import ast
from pathlib import Path

from stages import registry

ROOT = Path(__file__).resolve().parents[1]
STAGE_MODULE_LINES = 300
FUNCTION_LINES = 80
PARAMETERS = 8


def functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    return len([a for a in named if a.arg not in ("self", "cls")])


def test_stage_modules_are_at_most_300_lines():
    long = {}
    for name in registry.ORDER:
        lines = len((ROOT / "stages" / f"{name}.py").read_text(encoding="utf-8").splitlines())
        if lines > STAGE_MODULE_LINES:
            long[f"stages/{name}.py"] = lines
    assert long == {}, f"stage modules over {STAGE_MODULE_LINES} lines: {long}"


def test_functions_in_stages_are_at_most_80_lines_and_8_parameters():
    long, wide = {}, {}
    for path in sorted((ROOT / "stages").rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        for node in functions(path):
            lines = node.end_lineno - node.lineno + 1
            if lines > FUNCTION_LINES:
                long[f"{where}:{node.lineno} {node.name}"] = lines
            if parameter_count(node) > PARAMETERS:
                wide[f"{where}:{node.lineno} {node.name}"] = parameter_count(node)
    assert long == {}, f"functions over {FUNCTION_LINES} lines: {long}"
    assert wide == {}, f"functions over {PARAMETERS} parameters: {wide}"
