"""The GPU check script (benchmarks/gpu_check.py) is ready for the day a GPU is at hand: its dry run
takes the same four steps on the CPU, and every step passes and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.registry import ORDER

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_without_a_gpu_it_says_so_in_one_line_and_points_at_the_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run for real")
    done = check("--out", str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu_check: no CUDA device here; use --dry-run to check the script on the CPU"


@pytest.mark.slow
def test_the_dry_run_takes_every_step_on_the_cpu_and_writes_their_figures(tmp_path):
    done = check("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"] is True
    steps = summary["steps"]
    assert list(steps) == ["environment", "mfu", "pipeline", "torchrun"]
    assert {name: step["status"] for name, step in steps.items()} == dict.fromkeys(steps, "passed")
    assert steps["environment"]["figures"]["torch"].startswith("2.")
    assert steps["mfu"]["figures"]["table_row"].startswith("| CPU |"), steps["mfu"]
    pipeline = steps["pipeline"]["figures"]
    assert pipeline["pretrain"]["device"] == "cpu" and pipeline["pretrain"]["precision"] == "fp32"
    assert 0 < pipeline["pretrain"]["mfu"] <= 1
    assert pipeline["export"]["max_abs_diff"] < 1e-3, pipeline["export"]
    assert list(pipeline) == list(ORDER), "every stage of the pipeline ran"
    torchrun = steps["torchrun"]["figures"]
    assert torchrun["pretrain"]["world_size"] == 2, torchrun
    assert (tmp_path / "torchrun.log").is_file()
