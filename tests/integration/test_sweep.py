"""``gptpipe sweep`` on the micro recipe: a 2-value fine-tuning grid shares its upstream stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stages import registry

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # runs the micro pipeline: minutes


def test_sweep_runs_upstream_once_and_every_variant_under_one_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    summary = tmp_path / "sweep.json"
    store = tmp_path / "runs" / "store"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli.main", "sweep", "--config", str(ROOT / "configs" / "micro.yaml")]
        + ["--set", f"artifacts.store={store}", "--grid", "finetune.lr=0.001,0.003", "--parallel", "2"]
        + ["--report-json", str(summary)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(summary.read_text())
    variants = result["variants"]
    assert [v["overrides"] for v in variants] == [["finetune.lr=0.001"], ["finetune.lr=0.003"]]
    upstream = registry.ORDER[: registry.ORDER.index("finetune")]
    for name in upstream:  # shared by both variants: built by exactly one of them
        assert Counter(v["report"]["stages"][name]["status"] for v in variants)["ran"] == 1, name
    for name in registry.ORDER[registry.ORDER.index("finetune") :]:  # their own: both built theirs
        assert all(v["report"]["stages"][name]["status"] == "ran" for v in variants), name
    finetunes = {v["report"]["stages"]["finetune"]["ref"]["uri"] for v in variants}
    assert len(finetunes) == 2
    assert "finetune.lr=0.001" in done.stdout and "finetune.lr=0.003" in done.stdout  # the table

    uri = variants[0]["report"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    sweep = client.get_run(result["run_id"])
    assert sweep.info.status == "FINISHED" and sweep.data.params["variants"] == "2"
    children = {v["report"]["parent_run_id"] for v in variants}
    for run_id in children:
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == result["run_id"]
