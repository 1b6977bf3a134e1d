"""The local services helper (supervised Prefect/MLflow/S3) and the flow-side glue around it."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ._servers import gptpipe

pytestmark = pytest.mark.slow


def test_status_shows_every_service_healthy_and_env_file_points_at_them(services, client_env):
    done = gptpipe(client_env, "services", "status", "--home", str(services.home), "--json")
    report = json.loads(done.stdout)
    assert report["supervisor"]["running"]
    for name in ("s3", "mlflow", "prefect"):
        assert report[name]["healthy"] and report[name]["port"] == services.ports[name], name
    env = (services.home / "env.sh").read_text()
    assert f"export PREFECT_API_URL={services.prefect_url}" in env
    assert f"export MLFLOW_TRACKING_URI={services.mlflow_url}" in env
    assert f"export MLFLOW_S3_ENDPOINT_URL={services.s3_url}" in env


def test_supervisor_restarts_a_dead_service_and_down_stops_everything(tmp_path):
    from flows.cli import services as svc

    layout = svc.up(tmp_path, {"s3": 0}, bucket="restart-test", timeout=60, names=("s3",))
    try:
        first = svc.status(tmp_path)["s3"]
        assert first["healthy"] and set(svc.status(tmp_path)) == {"supervisor", "s3"}
        os.kill(first["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        now = svc.status(tmp_path)["s3"]
        while not (now["pid"] != first["pid"] and now["healthy"]) and time.monotonic() < deadline:
            time.sleep(0.5)
            now = svc.status(tmp_path)["s3"]
        assert now["pid"] != first["pid"] and now["healthy"], "the supervisor did not restart moto"
        from ._servers import s3_client

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the supervisor re-creates the bucket after a restart
            if "restart-test" in {b["Name"] for b in s3_client(layout).list_buckets()["Buckets"]}:
                break
            time.sleep(0.5)
        else:
            pytest.fail("bucket not re-created after the restart")
        supervisor = svc.status(tmp_path)["supervisor"]["pid"]
    finally:
        assert svc.down(tmp_path)
    assert not svc.alive(supervisor) and not svc.alive(now["pid"])
    assert svc.status(tmp_path) == {}


def test_only_transient_failures_are_retried():
    from flows.stage_task import retry_transient
    from stages.core.errors import ConfigError
    from stages.storage.s3 import S3Error

    class Failed:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert not retry_transient(None, None, Failed(ConfigError("pretrain.max_steps = -1: bad")))
    assert not retry_transient(None, None, Failed(S3Error("s3://b/k: bucket does not exist")))
    assert retry_transient(None, None, Failed(S3Error("s3://b/k: cannot reach endpoint", transient=True)))
    assert retry_transient(None, None, Failed(OSError("connection reset")))


def test_report_markdown_carries_registry_and_links():
    from flows import mlflow_links
    from flows.prefect_artifacts import full_markdown, slug

    assert slug("Tiny GPT_v2") == "tiny-gpt-v2"
    assert mlflow_links.run_url("sqlite:///x.db", "1", "abc") is None
    report = {
        "recipe": "micro",
        "tracking_uri": "http://127.0.0.1:5000",
        "experiment_id": "3",
        "parent_run_id": "abc",
        "store": "s3://b/store",
        "registered_model": {"name": "gptpipe-micro", "version": "2", "reused": False},
        "stages": {
            "publish": {
                "reused": False,
                "wall_time_s": 1.0,
                "metrics": {"enabled": True},
                "ref": {"stage": "publish", "uri": "s3://b/store/publish/k", "digest": "d"},
            }
        },
    }
    text = full_markdown(report)
    assert "`gptpipe-micro` version **2**" in text
    assert "http://127.0.0.1:5000/#/models/gptpipe-micro/versions/2" in text
    # Every link names the UI's model-training mode, or MLflow 3 opens its GenAI pages.
    assert "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning" in text
    assert "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning" in text
    assert "s3://b/store/publish/k/index.html" in text
