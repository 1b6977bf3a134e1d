"""One container per stage, through the path users take.

The image is built with podman on a locally made Debian base. ``podman system service``
provides the Docker API; a Prefect *docker* worker (prefect-docker) polls a docker work pool
holding the per-stage deployments (``gptpipe deploy --stages``). ``gptpipe run`` with
``execution.mode=containers`` runs the pipeline flow on the host; it starts each stage with
``run_deployment``, the worker starts a container per flow run, and the stages hand their
outputs to each other through the moto S3 server on the host while logging MLflow child runs
to the MLflow server on the host.

Skipped (with the reason) where podman cannot run; CI sets ``GPTPIPE_REQUIRE_CONTAINERS=1``
so a missing podman fails there instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import registry

from . import _podman
from ._servers import ARTIFACTS, MICRO, gptpipe, http_json, s3_client

# An image build and a pipeline in containers (its own subprocess limits go to 1,500 s).
pytestmark = [pytest.mark.slow, pytest.mark.container, pytest.mark.timeout(1800)]

REASON = _podman.available()
if REASON and os.environ.get("GPTPIPE_REQUIRE_CONTAINERS") == "1":
    raise RuntimeError(f"GPTPIPE_REQUIRE_CONTAINERS=1 but the container tests cannot run: {REASON}")
if REASON:
    pytest.skip(REASON, allow_module_level=True)

TAG = "localhost/gptpipe:test"
POOL = "gptpipe-containers"
STORE = "s3://gptpipe/containers"
# Canary credentials: present in the build's environment and in a pip.conf build secret; they
# must not reach any layer, the history or the image config.
CANARY = "canary-7f3e9d-not-a-real-secret"
STAGES = registry.ORDER


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    home = tmp_path_factory.mktemp("podman")
    env = _podman.podman_env(home)
    pip_conf = home / "pip.conf"
    pip_conf.write_text(f"[global]\n# index token {CANARY}\ntimeout = 120\n")
    _podman.build_image(
        env, TAG, extra_secret_env={"AWS_SECRET_ACCESS_KEY": CANARY, "PIP_INDEX_TOKEN": CANARY}, pip_conf=pip_conf
    )
    service = _podman.PodmanService(env, home / "podman.sock", home / "podman-service.log")
    yield {"env": env, "docker_host": service.url, "home": home}
    service.stop()
    # The worker leaves exited stage containers for inspection; the test does not.
    left = _podman.run(env, "podman", "ps", "-a", "-q", "--filter", f"ancestor={TAG}").stdout.split()
    if left:
        _podman.run(env, "podman", "rm", "-f", *left)


def test_image_runs_as_non_root_and_holds_no_credentials(engine):
    env = engine["env"]
    config = json.loads(_podman.run(env, "podman", "image", "inspect", TAG).stdout)[0]
    assert config["Config"]["User"] == "10001:10001"
    assert config["Config"]["Labels"]["org.opencontainers.image.revision"] not in ("", "unknown")
    history = _podman.run(env, "podman", "history", "--no-trunc", "--format", "json", TAG).stdout
    assert CANARY not in history and CANARY not in json.dumps(config)
    assert "ca_bundle" not in json.dumps(config["Config"].get("Env", []))
    uid = _podman.run(env, "podman", "run", "--rm", TAG, "id", "-u").stdout.strip()
    assert uid == "10001"
    # No secret file left in the image either: the pip.conf only existed as a build secret.
    leftover = _podman.run(
        env,
        "podman",
        "run",
        "--rm",
        TAG,
        "sh",
        "-c",
        "grep -rl " + CANARY + " /etc /home /app /tmp /root 2>/dev/null || true",
    ).stdout
    assert leftover.strip() == ""
    # The stage CLI is the entrypoint: `IMAGE --help` lists the stages.
    assert "pretrain" in _podman.run(env, "podman", "run", "--rm", TAG, "--help").stdout


@pytest.fixture(scope="module")
def container_run(engine, services, client_env, tmp_path_factory):
    """Stage deployments on a docker pool, a docker worker on podman's socket, one pipeline run."""
    cwd = tmp_path_factory.mktemp("containers-cwd")
    stage_env = [  # what the stage containers need to reach the host's S3 endpoint
        f"MLFLOW_S3_ENDPOINT_URL={services.s3_url}",
        "AWS_ACCESS_KEY_ID=testing",
        "AWS_SECRET_ACCESS_KEY=testing",
        "AWS_DEFAULT_REGION=us-east-1",
        "AWS_MAX_ATTEMPTS=3",
        "GPTPIPE_S3_CACHE=/tmp/gptpipe-s3",
        # The worker hands its own Prefect settings to the containers; this one is a host path.
        "PREFECT_HOME=/home/gptpipe/.prefect",
    ]
    deploy = ["deploy", "--stages", "--pool", POOL, "--pool-type", "docker", "--image", TAG]
    for item in stage_env:
        deploy += ["--env", item]
    gptpipe(client_env, *deploy, cwd=cwd)

    worker_log = open(engine["home"] / "worker.log", "w")
    worker_env = {**client_env, "DOCKER_HOST": engine["docker_host"]}
    prefect = str(Path(sys.executable).parent / "prefect")
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", POOL, "--type", "docker"],
        env=worker_env,
        cwd=cwd,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        started = time.monotonic()
        # Its own recipe name: the Model Registry entry (gptpipe-<name>) is not the other tests'.
        done = gptpipe(
            client_env,
            "run",
            "--config",
            str(MICRO),
            "--set",
            "name=micro-containers",
            "--set",
            f"artifacts.store={STORE}",
            "--set",
            "execution.mode=containers",
            "--set",
            "execution.resources.pretrain.memory=4g",
            cwd=cwd,
            timeout=1500,
        )
        elapsed = time.monotonic() - started
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        worker_log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "containers-worker.log").write_text((engine["home"] / "worker.log").read_text())
    print(f"container pipeline: {elapsed:.0f}s")
    return {"stdout": done.stdout, "stderr": done.stderr, "worker_log": (engine["home"] / "worker.log").read_text()}


def test_each_stage_ran_in_its_own_container_and_handed_off_through_s3(container_run, services):
    runs = http_json(f"{services.prefect_url}/flow_runs/filter", {"limit": 200})
    stage_runs = {
        r["name"]: r
        for r in runs
        if r.get("deployment_id") and r["name"] in STAGES and any(t == "stage:" + r["name"] for t in r["tags"])
    }
    assert sorted(stage_runs) == sorted(STAGES), sorted(r["name"] for r in runs)
    assert all(r["state_type"] == "COMPLETED" for r in stage_runs.values())
    # The worker started them as containers (one per flow run) on podman's socket.
    created = container_run["worker_log"].count("created successfully")
    assert created == len(STAGES), container_run["worker_log"][-3000:]
    # Every stage's finished output is in the S3 store: manifests are written last.
    listed = s3_client(services).list_objects_v2(Bucket="gptpipe", Prefix="containers/")
    manifests = {
        item["Key"].split("/")[1] for item in listed.get("Contents", []) if item["Key"].endswith("/manifest.json")
    }
    assert manifests == set(STAGES)


def test_stage_child_runs_were_logged_from_the_containers(container_run, services):
    import re

    found = re.search(r"MLflow run ([0-9a-f]{32})", container_run["stdout"])
    assert found, container_run["stdout"][-2000:]
    parent = found.group(1)
    body = {"experiment_ids": [], "max_results": 50, "filter": f"tags.mlflow.parentRunId = '{parent}'"}
    parent_run = http_json(f"{services.mlflow_url}/api/2.0/mlflow/runs/get?run_id={parent}")["run"]
    body["experiment_ids"] = [parent_run["info"]["experiment_id"]]
    children = http_json(f"{services.mlflow_url}/api/2.0/mlflow/runs/search", body)["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"]["tags"]} for run in children]
    by_stage = {t["gptpipe.stage"]: (t, run) for t, run in zip(tags, children)}
    assert sorted(by_stage) == sorted(STAGES)
    for stage, (tag, run) in by_stage.items():
        assert tag["gptpipe.executor"] == "container", (stage, tag)
        assert tag["gptpipe.image_revision"] not in ("", "unknown")
        assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in by_stage["evaluate"][1]["data"]["metrics"]}
    assert "evaluate.sft_accuracy" in metrics
    assert parent_run["info"]["status"] == "FINISHED"
    # The pipeline registered the ONNX graph under the export child run the container created.
    parent_tags = {t["key"]: t["value"] for t in parent_run["data"]["tags"]}
    assert parent_tags["gptpipe.registered_model"].startswith("gptpipe-micro-containers/")
