"""Services restarted mid-run: the S3 endpoint goes away during an upload and a download, the
MLflow server is killed during training (its supervisor brings it back). The transient errors
are retried and the runs complete with nothing lost."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from stages.executor import run_stage
from stages.storage.artifacts import verify
from stages.storage.stores import S3Store
from tests._processes import start_process, stop_process

from .conftest import ROOT, direct_s3

pytestmark = pytest.mark.slow
PROXY = ROOT / "tests" / "integration" / "_tcp_proxy.py"
BUCKET = "restarts"


@pytest.fixture
def endpoint(moto_port):
    """A TCP proxy standing in for the S3 endpoint: ``outage()`` kills it now and starts it again
    on the same port a second later. moto behind it keeps the objects, like a restarted MinIO."""
    from flows.cli.services import free_port

    port = free_port()
    command = [sys.executable, str(PROXY), str(port), str(moto_port)]
    state = {"proc": start_process(command), "port": port, "outages": 0}

    def outage() -> None:
        stop_process(state["proc"])
        state["outages"] += 1
        timer = threading.Timer(1.0, lambda: state.update(proc=start_process(command)))
        timer.start()
        state["timer"] = timer

    state["outage"] = outage
    s3 = direct_s3(moto_port)
    if BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)
    yield state
    if "timer" in state:
        state["timer"].join()
    stop_process(state["proc"])


def test_s3_endpoint_restarting_mid_upload_and_mid_download_is_retried_to_completion(endpoint, s3_env, tmp_path):
    from tests._data_fixtures import micro_config, stdlib_documents, write_corpus

    s3_env(endpoint["port"], attempts=10)  # botocore's own backoff rides out the second of downtime
    corpus = write_corpus(tmp_path / "corpus", stdlib_documents(30))
    cfg = micro_config(f"corpus.source={corpus}", f"artifacts.store=s3://{BUCKET}/store")

    class RestartsDuringTransfers(S3Store):
        def upload_file(self, path: Path, name: str) -> None:
            if path.name == "tokenizer.model":
                endpoint["outage"]()  # the endpoint is down as this upload starts
            super().upload_file(path, name)

        def download_file(self, name: str, target: Path) -> None:
            if name.endswith("tokenizer.model"):
                endpoint["outage"]()
            super().download_file(name, target)

    built = run_stage("tokenizer", cfg, {}, RestartsDuringTransfers(cfg.artifacts.store, tmp_path / "cache-a"))
    assert not built.reused
    # Another machine (a fresh cache) downloads the tokenizer through a second outage and builds on it.
    data = run_stage(
        "data", cfg, {"tokenizer": built.ref}, RestartsDuringTransfers(cfg.artifacts.store, tmp_path / "cache-b")
    )
    assert endpoint["outages"] == 2
    assert verify(S3Store(cfg.artifacts.store, tmp_path / "cache-c").materialize(data.ref)).digest == data.ref.digest
    assert run_stage("tokenizer", cfg, {}, S3Store(cfg.artifacts.store, tmp_path / "cache-d")).reused


class KillsMlflowAt:
    """Forwards to an MLflow child run; after step ``at`` is logged, SIGKILLs the MLflow server."""

    def __init__(self, inner, at: int, kill):
        self.inner, self.at, self.kill = inner, at, kill

    def log_metrics(self, metrics, step=None):
        self.inner.log_metrics(metrics, step)
        if step == self.at and "train_loss" in metrics:
            self.kill()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_mlflow_server_restarting_mid_training_loses_no_metric_and_the_run_finishes(
    servers, tiny_inputs, tmp_path, monkeypatch
):
    import psutil
    from mlflow.tracking import MlflowClient

    from flows.cli import services as svc
    from stages.core.config import parse_config
    from stages.core.tracking import start_run
    from stages.storage.stores import LocalStore

    # MLflow's client retries refused connections; shorter pauses than its default keep this test short.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "10")
    section = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
        "max_steps": 8,
        "batch_size": 2,
        "warmup_steps": 1,
        "eval_interval": 8,
        "eval_batches": 1,
        "log_interval": 1,
        "device": "cpu",
    }
    cfg = parse_config({"name": "restart", "pretrain": section})
    parent = start_run(servers.mlflow_url, "restarts", "parent")
    child = parent.child("pretrain")
    first_pid = svc.status(servers.home)["mlflow"]["pid"]

    down = []

    def kill_server() -> None:
        # The server and its uvicorn workers: a worker left alive would keep answering.
        family = [psutil.Process(first_pid), *psutil.Process(first_pid).children(recursive=True)]
        for process in family:
            os.kill(process.pid, signal.SIGKILL)
        psutil.wait_procs(family, timeout=10)
        down.append(not svc.healthy(servers.health_url("mlflow")))

    tracker = KillsMlflowAt(child, 3, kill_server)
    run_stage("pretrain", cfg, tiny_inputs, LocalStore(tmp_path / "store"), tracker)
    child.finish(ok=True)

    assert down == [True], "the server was really down while training went on"

    assert svc.status(servers.home)["mlflow"]["pid"] != first_pid, "the server was restarted"
    client = MlflowClient(tracking_uri=servers.mlflow_url)
    assert client.get_run(child.run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(child.run_id, "train_loss"))
    assert steps == list(range(1, 9)), "every step after the restart was logged too"
