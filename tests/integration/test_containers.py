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
def docker_worker(engine, services, client_env, tmp_path_factory):
    """Stage deployments on a docker pool and a docker worker on podman's socket (for the module)."""
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

    log_path = engine["home"] / "worker.log"
    worker_log = open(log_path, "w")
    worker_env = {**client_env, "DOCKER_HOST": engine["docker_host"]}
    prefect = str(Path(sys.executable).parent / "prefect")
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", POOL, "--type", "docker"],
        env=worker_env,
        cwd=cwd,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    yield {"cwd": cwd, "log": log_path}
    worker.terminate()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
    worker_log.close()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "containers-worker.log").write_text(log_path.read_text(errors="replace"))


@pytest.fixture(scope="module")
def container_run(docker_worker, client_env):
    """One pipeline run, each stage in its own container."""
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
        cwd=docker_worker["cwd"],
        timeout=1500,
    )
    elapsed = time.monotonic() - started
    print(f"container pipeline: {elapsed:.0f}s")
    return {"stdout": done.stdout, "stderr": done.stderr, "worker_log": docker_worker["log"].read_text()}


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


# Long enough to stop mid-run (a step takes milliseconds), deterministic so the resumed weights
# can equal an uninterrupted run's; the pipeline ends after pretraining (tokenizer and data are
# the container pipeline's, reused from the store).
STOP_STEPS = 300
STOP_RECIPE = [
    "name=micro-containers-stop",
    f"artifacts.store={STORE}",
    "execution.mode=containers",
    "stages=[tokenizer, data, pretrain]",
    f"pretrain.max_steps={STOP_STEPS}",
    "pretrain.checkpoint_interval=25",
    "pretrain.threads=1",
    "pretrain.deterministic=true",
]


def _objects(client, prefix: str) -> list[str]:
    return [item["Key"] for item in client.list_objects_v2(Bucket="gptpipe", Prefix=prefix).get("Contents", [])]


def _running_pretrain(engine, other_than: set[str]) -> str | None:
    found = _podman.run(
        engine["env"], "podman", "ps", "-q", "--filter", "label=io.prefect.deployment-name=pretrain"
    ).stdout.split()
    fresh = [c for c in found if c not in other_than]
    return fresh[0] if fresh else None


def _wait_for(what, ready, run: subprocess.Popen, log: Path, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while (value := ready()) is None:
        assert run.poll() is None, f"the pipeline ended before {what}:\n{log.read_text(errors='replace')[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.2)
    return value


def test_a_stage_container_stopped_then_killed_mid_pretraining_resumes_to_the_same_weights(
    container_run, docker_worker, engine, services, client_env, tmp_path, monkeypatch
):
    """The pretraining container is stopped as platforms stop containers, twice in one run:

    1. ``podman stop -t 30`` (SIGTERM, SIGKILL after the grace period: a pod eviction). The image's
       entrypoint passes SIGTERM to the flow's engine: training writes a checkpoint at the step it
       is in, mirrors it beside the S3 store, and the stage ends ``Preempted``.
    2. ``podman kill`` (SIGKILL, no warning) on the next container once it has mirrored a newer
       checkpoint: the worker reports the flow run ``Crashed``.

    Both times the pipeline starts the stage again (``execution.restarts``: 2); each new container
    brings the newest checkpoint back and resumes; the final weights equal an uninterrupted run of
    the same stage, bit for bit."""
    import re

    import safetensors.torch
    import torch

    from stages.core.config import load_config
    from stages.executor import run_stage
    from stages.storage.artifacts import ArtifactRef, read_manifest
    from stages.storage.stores import LocalStore, S3Store, ref_from_path

    command = [str(Path(sys.executable).parent / "gptpipe"), "run", "--config", str(MICRO)]
    for item in STOP_RECIPE:
        command += ["--set", item]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen(command, env=client_env, cwd=docker_worker["cwd"], stdout=out, stderr=subprocess.STDOUT)
    s3 = s3_client(services)

    def mirrored() -> set[str]:
        return {k for k in _objects(s3, "containers/pretrain/.checkpoints-") if k.endswith(".done")}

    def newest(keys: set[str]) -> int:
        return max(int(re.search(r"step_(\d+)\.done$", key).group(1)) for key in keys)

    _wait_for("a mirrored checkpoint", lambda: mirrored() or None, run, log)
    first = _wait_for("the pretraining container", lambda: _running_pretrain(engine, set()), run, log)
    _podman.run(engine["env"], "podman", "stop", "-t", "30", first)
    after_stop = mirrored()  # the first container is gone: what it left is final

    second = _wait_for("a new pretraining container", lambda: _running_pretrain(engine, {first}), run, log)
    _wait_for("a newer mirrored checkpoint", lambda: (mirrored() - after_stop) or None, run, log)
    _podman.run(engine["env"], "podman", "kill", second)
    after_kill = mirrored()
    assert run.wait(timeout=900) == 0, log.read_text(errors="replace")[-6000:]

    text, worker_log = log.read_text(errors="replace"), docker_worker["log"].read_text(errors="replace")
    stopped = re.search(rf"stopped by SIGTERM after step (\d+) of {STOP_STEPS}: checkpoint", worker_log)
    assert stopped, worker_log[-6000:]
    assert newest(after_stop) == int(stopped.group(1)), "the stop's own checkpoint was mirrored"
    for n, how in ((1, "Preempted"), (2, "Crashed")):
        assert f"ended {how} (the platform stopped its container); starting it again, {n} of 2" in text, text[-4000:]
    resumed = [int(step) for step in re.findall(r"pretrain: resuming from step (\d+), checkpoint", worker_log)]
    assert resumed == [newest(after_stop), newest(after_kill)], (resumed, sorted(after_stop), sorted(after_kill))
    assert 0 < resumed[0] < resumed[1] < STOP_STEPS
    for step in resumed:
        assert f"checkpoint step_{step:08d} brought back from s3://gptpipe/containers/pretrain/" in worker_log
    assert not [k for k in _objects(s3, "containers/pretrain/.checkpoints-") if not k.endswith("/")], (
        "the published model replaces the mirrored checkpoints"
    )

    # The uninterrupted reference: the same pretraining call, here on the host, from the same inputs.
    for name, value in {
        "AWS_ENDPOINT_URL_S3": services.s3_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    bucket = S3Store(STORE, cache_dir=tmp_path / "cache")
    outputs = [k for k in _objects(s3, "containers/pretrain/") if k.endswith("/manifest.json") and "/." not in k]
    manifests = [bucket.find("pretrain", key.split("/")[2]) for key in outputs]
    (resumed,) = [m for m in manifests if m.config["pretrain"]["max_steps"] == STOP_STEPS]
    inputs = {
        name: ref_from_path(bucket.materialize(ArtifactRef.from_dict(ref))) for name, ref in resumed.inputs.items()
    }
    cfg = load_config(MICRO, STOP_RECIPE[3:] + ["artifacts.store=unused"])
    reference = run_stage("pretrain", cfg, inputs, LocalStore(tmp_path / "reference"))
    got = bucket.materialize(bucket.ref(resumed))
    expected = safetensors.torch.load_file(str(Path(reference.ref.uri) / "model" / "model.safetensors"))
    actual = safetensors.torch.load_file(str(got / "model" / "model.safetensors"))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert read_manifest(got).metrics["steps"] == STOP_STEPS
