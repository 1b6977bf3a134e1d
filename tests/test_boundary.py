"""Layering: stages/ never imports prefect, and only the tracking adapter imports mlflow: stages/core/tracking.py
and the model code it registers, stages/core/mlflow_model.py (a ``PythonModel`` needs mlflow at class definition).

(The pickle scan lives in tests/reliability/test_security.py.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_ADAPTER = {"stages/core/tracking.py", "stages/core/mlflow_model.py"}


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
