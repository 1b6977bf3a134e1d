"""Many runs, one store: real ``gptpipe run`` processes started together share the content-keyed store.

Each stage key is computed by exactly one run (the others wait on its lease and reuse the output),
every finished output verifies against its manifest, and the embedded Prefect and MLflow databases
the runs share survive the concurrency. The same holds on an ``s3://`` store (moto over HTTP).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stages import registry
from stages.storage.artifacts import MANIFEST, verify

from ._servers import moto_bucket, moto_env

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "configs" / "micro.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # several micro pipelines at once


def start_runs(count: int, cwd: Path, env: dict[str, str], *overrides: str) -> list[tuple[subprocess.Popen, Path]]:
    """``count`` ``gptpipe run`` processes on the micro recipe, started together in one directory."""
    runs = []
    for index in range(count):
        report = cwd / f"report-{index}.json"
        cmd = [sys.executable, "-m", "flows.cli.main", "run", "--config", str(MICRO), "--report-json", str(report)]
        for item in overrides:
            cmd += ["--set", item]
        log = open(cwd / f"run-{index}.log", "w")
        runs.append((subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT), report))
    return runs


def finish(runs: list[tuple[subprocess.Popen, Path]], cwd: Path) -> list[dict]:
    reports = []
    for index, (proc, report) in enumerate(runs):
        code = proc.wait(timeout=1400)
        log = (cwd / f"run-{index}.log").read_text(encoding="utf-8", errors="replace")
        assert code == 0, f"run {index} exited {code}:\n{log[-4000:]}"
        reports.append(json.loads(report.read_text(encoding="utf-8")))
    return reports


def assert_each_key_built_once(reports: list[dict]) -> None:
    for name in registry.ORDER:
        statuses = Counter(report["stages"][name]["status"] for report in reports)
        assert statuses["ran"] == 1, f"stage {name}: {dict(statuses)}"
        assert set(statuses) <= {"ran", "waited", "reused"}
        refs = {json.dumps(report["stages"][name]["ref"], sort_keys=True) for report in reports}
        assert len(refs) == 1, f"stage {name}: the runs ended on different outputs {refs}"


def test_three_runs_on_one_local_store_build_each_key_once(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    store = tmp_path / "runs" / "store"
    reports = finish(start_runs(3, tmp_path, env, f"artifacts.store={store}"), tmp_path)
    assert_each_key_built_once(reports)
    waited = [r["stages"][n] for r in reports for n in registry.ORDER if r["stages"][n]["status"] == "waited"]
    assert waited and all(w["waited_s"] > 0 for w in waited), "runs started together wait for each other"
    for name in registry.ORDER:
        outputs = [p for p in (store / name).iterdir() if (p / MANIFEST).is_file()]
        assert len(outputs) == 1, outputs
        verify(outputs[0])
        leftovers = [p.name for p in (store / name).iterdir() if p.name.startswith(".work-")]
        assert leftovers == [], f"stage {name}: work directories left behind {leftovers}"
    parents = {r["parent_run_id"] for r in reports}
    assert len(parents) == 3, "each run has its own MLflow run in the shared SQLite store"


def test_two_runs_on_one_s3_store_build_each_key_once(tmp_path, moto):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT), **moto_env(moto)}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "GPTPIPE_S3_CACHE"):
        env.pop(name, None)
    client = moto_bucket(moto, "concurrent")
    # Two runs, each in its own directory (its own S3 cache under its own HOME), one store.
    runs, dirs = [], []
    for index in range(2):
        cwd = tmp_path / f"run{index}"
        cwd.mkdir()
        dirs.append(cwd)
        run_env = {**env, "HOME": str(cwd / "home"), "PREFECT_HOME": str(cwd / "prefect")}
        runs += start_runs(1, cwd, run_env, "artifacts.store=s3://concurrent/store")
    reports = [finish([run], cwd)[0] for run, cwd in zip(runs, dirs)]
    assert_each_key_built_once(reports)
    listed = client.list_objects_v2(Bucket="concurrent", Prefix="store/")
    manifests = [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith("/" + MANIFEST)]
    assert len(manifests) == len(registry.ORDER), manifests
