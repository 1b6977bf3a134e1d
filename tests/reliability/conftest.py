"""Fixtures of the reliability suite: an MLflow store to check run statuses, tiny input
artifacts, and real servers (moto S3, MLflow) on 127.0.0.1 for the server-backed tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._processes import moto_command, start_process, stop_process

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The micro tokenizer settings every stage-level case starts from (seconds, one thread).
MICRO_TOKENIZER = [
    "--set",
    "tokenizer.vocab_size=400",
    "--set",
    "tokenizer.train_bytes=200000",
    "--set",
    "tokenizer.threads=1",
    "--set",
    "data.workers=1",
]
# A one-layer GPT that trains in seconds: the pretrain stage's refusals are tested on it.
TINY_PRETRAIN = [
    "pretrain.model.n_layer=1",
    "pretrain.model.n_head=2",
    "pretrain.model.n_embd=32",
    "pretrain.max_steps=2",
    "pretrain.device=cpu",
]


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A SQLite MLflow store shared by the suite (creating one costs seconds of migrations)."""
    from stages.core.tracking import default_tracking_uri

    return default_tracking_uri(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture
def parent_run(tracking_uri, request) -> str:
    """A fresh parent run per test, so its child runs are exactly the ones this test made."""
    from stages.core.tracking import start_run

    return start_run(tracking_uri, "reliability", run_name=request.node.name[:200]).run_id


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory):
    """Tokenizer and data artifacts (hand-made shards of a learnable stream) for pretrain cases."""
    from tests._scale_fixtures import make_inputs

    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="session")
def moto_port():
    """A moto S3 server over HTTP (objects in memory, any credentials accepted)."""
    from flows.cli.services import free_port

    port = free_port()
    proc = start_process(moto_command(port), f"http://127.0.0.1:{port}/")
    yield port
    stop_process(proc)


def direct_s3(port: int):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3_env(monkeypatch, tmp_path):
    """Point gptpipe's S3 client at a given port (returns a setter); a fresh local S3 cache per test."""

    def point_at(port: int, key: str = "testing", secret: str = "testing", attempts: int = 3) -> None:
        for name, value in {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": str(attempts),
            "GPTPIPE_S3_CACHE": str(tmp_path / "s3-cache"),
        }.items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)

    return point_at


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """moto S3 + an MLflow server (artifacts proxied into the bucket), supervised by
    ``flows.cli.services`` exactly as ``gptpipe services up --only s3,mlflow`` runs them."""
    from flows.cli import services as svc

    home = tmp_path_factory.mktemp("services")
    layout = svc.up(home, {"s3": 0, "mlflow": 0, "prefect": 0}, bucket="gptpipe", timeout=240, names=("s3", "mlflow"))
    yield layout
    svc.down(home)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child gptpipe process: this one's, minus anything pointing elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING", "PREFECT_API"))}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env
