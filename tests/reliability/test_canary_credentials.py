"""Credentials never leak: a full micro pipeline runs with canary secrets in its environment,
against a real MLflow server and an S3 store, and every output is searched for them.

Searched: the command's stdout/stderr, every object in the bucket (artifact store and MLflow's
proxied artifacts), the MLflow server's database and logs, every MLflow param and tag, the
local S3 cache, and the Prefect home (its database holds the flow's logs and artifacts).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, clean_env, direct_s3

pytestmark = pytest.mark.slow

CANARIES = {
    "AWS_ACCESS_KEY_ID": "AKIACANARY7Q3XK2LEAK",
    "AWS_SECRET_ACCESS_KEY": "canary-secret-9f8e7d6c5b4a",
    "AWS_SESSION_TOKEN": "canary-session-0a1b2c3d",
    "MLFLOW_TRACKING_USERNAME": "canary-user-4e5f",
    "MLFLOW_TRACKING_PASSWORD": "canary-password-6a7b",
    "HF_TOKEN": "hf_canary_8c9d0e1f",
}


def _files_with(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {n.decode()}" for n in needles if n in data]
    return hits


def test_canary_credentials_appear_in_no_output_of_a_full_pipeline_run(servers, tmp_path):
    from mlflow.tracking import MlflowClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    store = "s3://gptpipe/canary-store"
    env = clean_env(
        **servers.client_env(),
        PREFECT_HOME=str(tmp_path / "prefect"),
        GPTPIPE_S3_CACHE=str(tmp_path / "s3-cache"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_EXTRA_LOGGERS="gptpipe",
        AWS_MAX_ATTEMPTS="5",
    )
    env.pop("PREFECT_API_URL")  # no Prefect server in this suite: the flow starts its temporary one
    env.update(CANARIES)  # moto accepts any key; MLflow's server ignores the client's basic auth
    command = [
        str(Path(sys.executable).parent / "gptpipe"),
        "run",
        "--config",
        str(ROOT / "configs" / "micro.yaml"),
        "--set",
        f"artifacts.store={store}",
        "--set",
        "tracking.experiment=canary",
        "--set",
        "export.pt2.enabled=false",
        "--set",
        "export.parity_shapes=1",
        "--set",
        "export.generation_prompts=1",
    ]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, timeout=900)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    needles = [value.encode() for value in CANARIES.values()]

    leaks = [f"output: {n.decode()}" for n in needles if n in done.stdout + done.stderr]
    for root in (cwd, tmp_path / "prefect", tmp_path / "s3-cache", servers.home):
        leaks += _files_with(root, needles)

    s3 = direct_s3(servers.ports["s3"])
    objects = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="gptpipe")
        for o in page.get("Contents", [])
    ]
    assert any(k.startswith("canary-store/publish/") for k in objects) and any(
        k.startswith("mlartifacts/") for k in objects
    )
    for key in objects:
        body = s3.get_object(Bucket="gptpipe", Key=key)["Body"].read()
        leaks += [f"s3://gptpipe/{key}: {n.decode()}" for n in needles if n in body]

    client = MlflowClient(tracking_uri=servers.mlflow_url)
    experiment = client.get_experiment_by_name("canary")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 8, "the parent run and one child per stage"
    for run in runs:
        text = repr(run.data.params) + repr(run.data.tags)
        leaks += [f"run {run.info.run_name}: {n.decode()}" for n in needles if n.decode() in text]
    assert leaks == []
