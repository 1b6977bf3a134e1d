"""Layering: stages/ never imports prefect, and only the MLflow adapters import mlflow: the run adapter
stages/core/tracking.py, the model registry stages/serving/model_registry.py and the model code it registers,
stages/serving/pyfunc.py (a ``PythonModel`` needs mlflow at class definition).

(The pickle scan lives in tests/reliability/test_security.py.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_ADAPTER = {"stages/core/tracking.py", "stages/serving/model_registry.py", "stages/serving/pyfunc.py"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_stages_never_import_prefect_or_mlflow_outside_tracking():
    offenders = []
    for path in sorted((ROOT / "stages").rglob("*.py")):
        roots = imported_roots(path)
        if "prefect" in roots:
            offenders.append(f"{path.name} imports prefect")
        if "mlflow" in roots and path.relative_to(ROOT).as_posix() not in MLFLOW_ADAPTER:
            offenders.append(f"{path.name} imports mlflow")
    assert offenders == []


def test_importing_every_stage_loads_no_prefect():
    code = (
        "import sys, importlib, pkgutil, stages\n"
        "for m in pkgutil.walk_packages(stages.__path__, 'stages.'):\n"
        "    if m.name != 'stages.__main__': importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'prefect' or n.startswith('prefect.'))\n"
        "print(len(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stderr


def stages_imports(path: Path) -> set[str]:
    """Every ``stages`` module ``path`` names in an import, at any depth (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "stages"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("stages"):
            found |= {f"{node.module}.{alias.name}" if node.module == "stages" else node.module for alias in node.names}
    return found


def test_core_imports_nothing_above_it():
    """``stages/core`` is the bottom layer: no import of lm, storage, training, viewer, serving or a stage
    module, even inside a function. ``stages.registry`` is allowed: the recipe schema reads the stage names
    and declarations from it, and it imports only ``core`` itself (the stage modules are loaded by name)."""
    below = ("stages.core", "stages.registry")
    upward = {
        f"{path.relative_to(ROOT).as_posix()} imports {name}"
        for path in sorted((ROOT / "stages" / "core").glob("*.py"))
        for name in stages_imports(path)
        if not any(name == allowed or name.startswith(allowed + ".") for allowed in below)
    }
    assert upward == set()
    registry_imports = stages_imports(ROOT / "stages" / "registry.py")
    assert all(name.startswith("stages.core.") for name in registry_imports), registry_imports
