"""Services that are not there or refuse us: a missing bucket, bad S3 credentials (real moto
servers over HTTP), an MLflow server that does not answer. One line each, nothing written,
and the MLflow case fails before any stage begins."""

from __future__ import annotations

import pytest

from tests._processes import moto_command, start_process, stop_process

from ._failure_checks import error_line, finished_outputs, finished_runs, run_gptpipe_cli, run_stage_cli
from .conftest import MICRO_TOKENIZER, ROOT, direct_s3


def _all_objects(port: int) -> list[str]:
    s3 = direct_s3(port)
    return [
        f"{b['Name']}/{o['Key']}"
        for b in s3.list_buckets()["Buckets"]
        for o in s3.list_objects_v2(Bucket=b["Name"]).get("Contents", [])
    ]


@pytest.fixture
def small_corpus(tmp_path):
    from tests._data_fixtures import stdlib_documents, write_corpus

    return write_corpus(tmp_path / "corpus", stdlib_documents(20))


@pytest.mark.slow
def test_store_in_a_missing_bucket_is_one_line_and_writes_nothing(
    moto_port, s3_env, small_corpus, capsys, tracking_uri, parent_run
):
    s3_env(moto_port)
    before = _all_objects(moto_port)
    argv = [
        "tokenizer",
        *MICRO_TOKENIZER,
        "--set",
        f"corpus.source={small_corpus}",
        "--out",
        "s3://no-such-bucket/store",
        "--tracking-uri",
        tracking_uri,
        "--parent-run-id",
        parent_run,
    ]
    line = error_line(*run_stage_cli(capsys, *argv)[::2])
    assert "s3://no-such-bucket/store/tokenizer/" in line and "bucket does not exist" in line
    assert f"127.0.0.1:{moto_port}" in line and "create it or fix the s3:// URI" in line
    assert _all_objects(moto_port) == before
    assert finished_runs(tracking_uri, parent_run) == []


@pytest.mark.slow
def test_s3_corpus_in_a_missing_bucket_is_one_line(moto_port, s3_env, capsys, tmp_path, tracking_uri, parent_run):
    s3_env(moto_port)
    argv = [
        "tokenizer",
        *MICRO_TOKENIZER,
        "--set",
        "corpus.source=s3://no-such-bucket/corpus",
        "--out",
        str(tmp_path / "store"),
        "--tracking-uri",
        tracking_uri,
        "--parent-run-id",
        parent_run,
    ]
    line = error_line(*run_stage_cli(capsys, *argv)[::2])
    assert "s3://no-such-bucket/corpus: bucket does not exist" in line
    assert finished_outputs(tmp_path / "store") == [] and finished_runs(tracking_uri, parent_run) == []


@pytest.fixture
def moto_with_auth():
    """A moto server that checks credentials after two requests (the health check, the bucket creation)."""
    import os

    from flows.cli.services import free_port

    port = free_port()
    proc = start_process(
        moto_command(port), f"http://127.0.0.1:{port}/", env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "2"}
    )
    try:
        direct_s3(port).create_bucket(Bucket="locked")
        yield port
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_bad_s3_credentials_are_one_line_without_the_secret(
    moto_with_auth, s3_env, small_corpus, capsys, tracking_uri, parent_run
):
    secret = "canary-wrong-secret-5a1b"
    s3_env(moto_with_auth, key="AKIACANARYWRONGKEY", secret=secret)
    argv = [
        "tokenizer",
        *MICRO_TOKENIZER,
        "--set",
        f"corpus.source={small_corpus}",
        "--out",
        "s3://locked/store",
        "--tracking-uri",
        tracking_uri,
        "--parent-run-id",
        parent_run,
    ]
    code, out, err = run_stage_cli(capsys, *argv)
    line = error_line(code, err)
    assert "s3://locked/store/tokenizer/" in line and "access denied (InvalidAccessKeyId)" in line
    assert "check the credentials" in line
    assert secret not in out + err
    assert finished_runs(tracking_uri, parent_run) == []


def test_unreachable_mlflow_fails_the_stage_before_it_begins(tiny_inputs, tmp_path, capsys, monkeypatch):
    from flows.cli.services import free_port

    monkeypatch.setenv("GPTPIPE_TRACKING_CONNECT_TIMEOUT", "1")
    dead = f"http://127.0.0.1:{free_port()}"
    store = tmp_path / "store"
    argv = [
        "pretrain",
        "--set",
        "pretrain.max_steps=2",
        "--input",
        f"tokenizer={tiny_inputs['tokenizer'].uri}",
        "--input",
        f"data={tiny_inputs['data'].uri}",
        "--out",
        str(store),
        "--tracking-uri",
        dead,
        "--parent-run-id",
        "0" * 32,
    ]
    line = error_line(*run_stage_cli(capsys, *argv)[::2])
    assert f"MLflow tracking server {dead} is not reachable" in line and "Connection refused" in line
    assert not store.exists(), "the pretrain stage must not have begun (no work directory, no checkpoint)"


def test_unreachable_mlflow_fails_gptpipe_run_before_prefect_or_any_stage(tmp_path, capsys, monkeypatch):
    from flows.cli.services import free_port

    monkeypatch.setenv("GPTPIPE_TRACKING_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:canary-password@127.0.0.1:{free_port()}")
    code, out, err = run_gptpipe_cli(
        capsys,
        "run",
        "--config",
        str(ROOT / "configs" / "micro.yaml"),
        "--set",
        f"artifacts.store={tmp_path / 'store'}",
    )
    line = error_line(code, err)
    assert "is not reachable" in line and "--no-track" in line
    assert "canary-password" not in out + err, "credentials in the URI are not echoed"
    assert list(tmp_path.iterdir()) == [], "no store, no local MLflow database, no stage began"
