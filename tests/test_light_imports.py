"""Checking a recipe loads no deep-learning stack.

``gptpipe config`` validates a recipe against every stage's declaration (its sections, inputs and
check), so it imports every stage module. A stage module therefore keeps torch, onnx and
onnxruntime out of its module-level imports: they load inside ``run`` (or the library functions it
calls). The data stage runs in a process that only tokenizes; carrying torch there cost ~290 MB of
resident memory (issue 25). Each check runs in a fresh interpreter, so nothing imported by another
test can hide an import or fake one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.registry import ORDER

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnx", "onnxruntime")


def heavy_modules_after(code: str) -> list[str]:
    """Which of ``HEAVY`` a fresh interpreter holds after running ``code`` in the repository root."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ORDER)
def test_declaring_a_stage_imports_no_torch_onnx_or_onnxruntime(name):
    assert heavy_modules_after(f"import stages.{name}") == []


def test_gptpipe_config_validates_a_recipe_without_torch_onnx_or_onnxruntime():
    code = (
        "import contextlib, io\n"
        "from flows.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as shown:\n"
        "    code = main(['config', '--config', 'configs/micro.yaml'])\n"
        "assert code == 0 and 'stages:' in shown.getvalue(), (code, shown.getvalue()[-500:])\n"
    )
    assert heavy_modules_after(code) == []


def test_the_executor_and_the_stage_entry_point_import_no_torch_onnx_or_onnxruntime():
    """What every stage process imports before its stage's ``run``: the data stage pays only for what it uses."""
    assert heavy_modules_after("import stages.__main__, stages.executor, stages.launchers, stages.registry") == []


def test_gptpipe_plan_sizes_a_recipe_without_torch_onnx_or_onnxruntime():
    """The plan before launch runs where no training stack is installed yet, and answers at once."""
    code = (
        "import contextlib, io\n"
        "from flows.cli.main import main\n"
        "for recipe in ('configs/tiny.yaml', 'configs/gpt2-small-8gpu.yaml'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as shown:\n"
        "        code = main(['plan', '--config', recipe])\n"
        "    assert code == 0 and 'fit: pretrain' in shown.getvalue(), (code, shown.getvalue()[-500:])\n"
    )
    assert heavy_modules_after(code) == []
