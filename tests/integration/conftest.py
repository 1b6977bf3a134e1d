"""Real servers for the integration tests: Prefect, MLflow (SQLite + S3 artifacts) and moto S3.

They are started once per session through ``flows.cli.services`` (the same supervisor
``gptpipe services up`` uses) on free 127.0.0.1 ports, under a temporary home, and stopped
at teardown. ``client_env`` is what a gptpipe process needs to use them.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    from flows.cli import services as svc

    home = tmp_path_factory.mktemp("services")
    # A short scheduler loop so a new deployment's cron runs appear within seconds.
    layout = svc.up(
        home,
        {"s3": 0, "mlflow": 0, "prefect": 0},
        bucket="gptpipe",
        timeout=240,
        extra_env={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"},
    )
    yield layout
    svc.down(home)


@pytest.fixture(scope="session")
def client_env(services, tmp_path_factory) -> dict[str, str]:
    scratch = tmp_path_factory.mktemp("client")
    env = {**os.environ, **services.client_env()}
    env.update(
        PREFECT_HOME=str(scratch / "prefect-home"),
        GPTPIPE_S3_CACHE=str(scratch / "s3-cache"),
        AWS_MAX_ATTEMPTS="3",
        PREFECT_LOGGING_EXTRA_LOGGERS="gptpipe",
        PYTHONUNBUFFERED="1",
    )
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="session")
def server_pipeline(client_env, tmp_path_factory) -> dict:
    """The micro recipe run twice against the servers, its outputs in s3://gptpipe/store."""
    import re

    from ._servers import MICRO, gptpipe

    cwd = tmp_path_factory.mktemp("pipeline-cwd")
    runs = []
    for _ in range(2):
        done = gptpipe(
            client_env, "run", "--config", str(MICRO), "--set", "artifacts.store=s3://gptpipe/store", cwd=cwd
        )
        found = re.search(r"MLflow run ([0-9a-f]{32})", done.stdout)
        assert found, done.stdout
        runs.append({"stdout": done.stdout, "stderr": done.stderr, "parent_run_id": found.group(1)})
    return {"runs": runs, "store": "s3://gptpipe/store", "cwd": cwd}


@pytest.fixture(scope="module")
def moto():
    """A bare moto S3 endpoint on 127.0.0.1 for one test module (the S3 store and Dask tests)."""
    from flows.cli.services import free_port
    from tests._processes import moto_command, start_process, stop_process

    port = free_port()
    proc = start_process(moto_command(port), f"http://127.0.0.1:{port}/", timeout=60)
    yield port
    stop_process(proc)
