"""Scheduled runs on a real Prefect server: a cron deployment, its scheduled runs, a process worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from ._servers import ROOT, gptpipe, http_json

pytestmark = pytest.mark.slow
CRON = "*/10 * * * *"


def scheduled_runs(services, deployment_id: str) -> list[dict]:
    return http_json(
        f"{services.prefect_url}/flow_runs/filter",
        {
            "deployments": {"id": {"any_": [deployment_id]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC",
        },
    )


def test_cron_deployment_is_scheduled_and_a_process_worker_runs_it(services, client_env, tmp_path):
    store = tmp_path / "store"
    done = gptpipe(
        client_env,
        "deploy",
        "--name",
        "itest",
        "--pool",
        "gptpipe",
        "--cron",
        CRON,
        "--config",
        "configs/micro.yaml",
        "--set",
        "stages=[tokenizer]",
        "--set",
        f"artifacts.store={store}",
        # the nightly recipe of docs/scheduled-training.md: its first night has no champion yet and
        # trains from scratch (a model of its own, so the session's other runs are not its lineage)
        "--set",
        "continue_from=champion",
        "--set",
        "tracking.registered_model=gptpipe-itest-nightly",
        "--concurrency-limit",
        "1",
        "--collision-strategy",
        "cancel",
    )
    created = json.loads(done.stdout[done.stdout.index("{\n") : done.stdout.rindex("}") + 1])
    deployment = http_json(f"{services.prefect_url}/deployments/name/gptpipe/itest")
    assert deployment["id"] == created["id"]
    # Overlapping schedules: one run at a time; a run due while one is going is cancelled, not stacked.
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert deployment["work_pool_name"] == "gptpipe"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [CRON]
    assert deployment["parameters"]["overrides"] == [
        "stages=[tokenizer]",
        f"artifacts.store={store}",
        "continue_from=champion",
        "tracking.registered_model=gptpipe-itest-nightly",
    ]
    pool = http_json(f"{services.prefect_url}/work_pools/gptpipe")
    assert pool["type"] == "process"

    deadline = time.monotonic() + 120
    runs = scheduled_runs(services, deployment["id"])
    while not runs and time.monotonic() < deadline:
        time.sleep(2)
        runs = scheduled_runs(services, deployment["id"])
    assert runs, "the server's scheduler created no runs from the cron schedule"
    starts = [r["expected_start_time"] for r in runs]
    assert starts == sorted(starts) and all(r["auto_scheduled"] for r in runs)

    # Make the first scheduled run due now, then let a worker pick it up and run it.
    target = runs[0]
    now = datetime.now(timezone.utc).isoformat()
    http_json(
        f"{services.prefect_url}/flow_runs/{target['id']}/set_state",
        {"state": {"type": "SCHEDULED", "name": "Scheduled", "state_details": {"scheduled_time": now}}, "force": True},
    )
    worker = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "gptpipe", "--run-once"],
        env=client_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,  # the worker runs the whole micro pipeline: several minutes when the machine is loaded
    )
    final = http_json(f"{services.prefect_url}/flow_runs/{target['id']}")
    assert final["state_type"] == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:]
    said = worker.stdout + worker.stderr
    assert "continue_from=champion: model 'gptpipe-itest-nightly' has no 'champion' alias yet" in said, said[-3000:]
    assert any(p.name == "manifest.json" for p in (store / "tokenizer").glob("*/manifest.json"))
    logs = http_json(f"{services.prefect_url}/logs/filter", {"logs": {"flow_run_id": {"any_": [target["id"]]}}})
    assert any(entry["message"].startswith("stage tokenizer: finished") for entry in logs)


def test_committed_prefect_yaml_deploys_with_its_schedules(services, client_env):
    gptpipe(
        client_env,
        "deploy",
        "--name",
        "pool-maker",
        "--pool",
        "gptpipe",
        "--cron",
        "",
        "--config",
        "configs/micro.yaml",
    )  # makes sure the pool exists whatever ran first
    done = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
        env=client_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nightly = http_json(f"{services.prefect_url}/deployments/name/gptpipe/nightly-tiny")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert nightly["parameters"]["config_path"] == "configs/tiny.yaml"
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    smoke = http_json(f"{services.prefect_url}/deployments/name/gptpipe/hourly-micro-smoke")
    assert [s["active"] for s in smoke["schedules"]] == [False]


def test_deploy_help_documents_the_three_pool_types(client_env):
    text = gptpipe(client_env, "deploy", "--help").stdout
    for kind in ("process", "docker", "kubernetes"):
        assert "prefect worker start --pool" in text and kind in text
    assert "--type docker" in text and "--type kubernetes" in text


def test_a_bad_cron_fails_before_reaching_the_server(client_env):
    done = subprocess.run(
        [str(Path(sys.executable).parent / "gptpipe"), "deploy", "--cron", "every day"],
        env=client_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("gptpipe: error: --cron 'every day': not a valid cron")
