"""The S3 artifact store and s3:// corpora against a real S3 endpoint (moto server over HTTP).

The outage test puts a killable TCP proxy between gptpipe and moto: killing it mid-upload is
an endpoint going away while the bucket keeps what it already received.
"""

from __future__ import annotations

import hashlib
import signal
import sys
import time
from pathlib import Path

import pytest

from tests._processes import start_process, stop_process

from ._servers import MICRO, moto_bucket

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
BUCKET = "gptpipe-test"


@pytest.fixture
def endpoint(moto, monkeypatch, tmp_path):
    """A killable proxy in front of moto; the environment points gptpipe's S3 client at it."""
    from flows.cli.services import free_port

    port = free_port()
    state = {"proxy": start_process([sys.executable, str(HERE / "_tcp_proxy.py"), str(port), str(moto)]), "port": port}
    for name, value in {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "3",
        "GPTPIPE_S3_CACHE": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    state["direct"] = moto_bucket(moto, BUCKET)  # straight to moto, past the proxy
    state["restart"] = lambda: state.update(
        proxy=start_process([sys.executable, str(HERE / "_tcp_proxy.py"), str(port), str(moto)])
    )
    yield state
    stop_process(state["proxy"])


def micro(store: str, *extra: str):
    from stages.core.config import load_config

    return load_config(MICRO, [f"artifacts.store={store}", *extra])


def keys_under(client, prefix: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def test_outage_mid_upload_fails_clearly_and_leaves_nothing_complete(endpoint, tmp_path):
    from stages.executor import call_key, run_stage
    from stages.stage_call import StageCall
    from stages.storage.s3 import S3Error
    from stages.storage.stores import S3Store

    store_uri = f"s3://{BUCKET}/outage"
    # The failed run cannot release its lease through a dead endpoint, so the rerun waits it out:
    # a 6 s lease, not the default minute.
    cfg = micro(store_uri, "corpus.max_bytes=120000", "tokenizer.train_bytes=120000", "artifacts.lease_s=6")
    key = call_key(StageCall.for_recipe("tokenizer", cfg, {}))
    uploaded: list[str] = []

    class CutAfterFirstFile(S3Store):
        def upload_file(self, path: Path, name: str) -> None:
            if uploaded:  # the endpoint dies after the first object went up
                endpoint["proxy"].send_signal(signal.SIGKILL)
                endpoint["proxy"].wait()
            super().upload_file(path, name)
            uploaded.append(name)

    with pytest.raises(S3Error) as failure:
        run_stage("tokenizer", cfg, {}, CutAfterFirstFile(store_uri))
    message = str(failure.value)
    assert "\n" not in message and "upload failed after 3 attempts" in message
    assert f"cannot reach endpoint http://127.0.0.1:{endpoint['port']}" in message and "rerun" in message
    assert "testing" not in message, "credentials must never appear in messages"
    assert failure.value.transient, "an unreachable endpoint is worth a later retry"

    # What the bucket holds: the first file, and no manifest — so nobody takes it as finished.
    left = keys_under(endpoint["direct"], f"outage/tokenizer/{key}/")
    assert left == uploaded[:1]
    assert not any(k.endswith("/manifest.json") for k in left)
    endpoint["restart"]()
    fresh = S3Store(store_uri, cache_dir=tmp_path / "other-cache")
    assert fresh.find("tokenizer", key) is None

    result = run_stage("tokenizer", cfg, {}, fresh)
    assert not result.reused
    assert f"outage/tokenizer/{key}/manifest.json" in keys_under(endpoint["direct"], f"outage/tokenizer/{key}/")
    again = run_stage("tokenizer", cfg, {}, S3Store(store_uri, cache_dir=tmp_path / "third-cache"))
    assert again.reused and again.ref == result.ref


def test_large_files_go_up_in_parts_and_downloads_are_verified(endpoint, tmp_path):
    from stages.core.errors import ArtifactError
    from stages.storage.artifacts import Manifest, files_digest, hash_files
    from stages.storage.s3 import MULTIPART_CHUNK
    from stages.storage.stores import S3Store

    store = S3Store(f"s3://{BUCKET}/parts", cache_dir=tmp_path / "a")
    work = store.scratch("blob", "k1")
    big = work / "weights.bin"
    payload = hashlib.sha256(b"seed").digest() * ((MULTIPART_CHUNK + 1_000_000) // 32)
    big.write_bytes(payload)
    (work / "small.txt").write_text("hello\n")
    files = hash_files(work)
    manifest = Manifest(
        stage="blob", key="k1", config={}, inputs={}, code_version="t", files=files, digest=files_digest(files)
    )
    ref = store.commit(work, manifest)
    folder = f"parts/blob/k1/{manifest.digest}"  # files go up under the digest of the manifest that lists them
    head = endpoint["direct"].head_object(Bucket=BUCKET, Key=f"{folder}/weights.bin")
    assert head["ETag"].strip('"').endswith("-2"), "a file over the threshold is a 2-part multipart upload"

    reader = S3Store(f"s3://{BUCKET}/parts", cache_dir=tmp_path / "b")
    local = reader.materialize(ref)
    assert (local / "weights.bin").read_bytes() == payload
    assert (local / "small.txt").read_text() == "hello\n"

    endpoint["direct"].put_object(Bucket=BUCKET, Key=f"{folder}/small.txt", Body=b"tampered\n")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        S3Store(f"s3://{BUCKET}/parts", cache_dir=tmp_path / "c").materialize(ref)


def test_s3_corpus_source_reads_objects_in_key_order_with_a_stable_fingerprint(endpoint, monkeypatch, tmp_path):
    from stages.core.config import CorpusConfig
    from stages.storage.corpus import fingerprint, iter_documents

    direct = endpoint["direct"]
    direct.put_object(Bucket=BUCKET, Key="corpus/b.txt", Body=b"second document\n")
    direct.put_object(Bucket=BUCKET, Key="corpus/a.txt", Body=b"first document\n")
    direct.put_object(Bucket=BUCKET, Key="corpus/skip.bin", Body=b"\x00\x01")
    direct.put_object(Bucket=BUCKET, Key="corpus/docs.jsonl", Body=b'{"text": "third"}\n')
    cfg = CorpusConfig(source=f"s3://{BUCKET}/corpus")
    assert list(iter_documents(cfg)) == ["first document\n", "second document\n", "third"]
    assert fingerprint(cfg) == fingerprint(cfg)
    before = fingerprint(cfg)
    # Another machine (a stage container) with its own, empty local cache computes the same key.
    monkeypatch.setenv("GPTPIPE_S3_CACHE", str(tmp_path / "another-cache"))
    assert fingerprint(cfg) == before and not (tmp_path / "another-cache").exists(), "fingerprinting downloads nothing"
    direct.put_object(Bucket=BUCKET, Key="corpus/a.txt", Body=b"first document, edited\n")
    assert fingerprint(cfg) != before, "an edited object must change the stage's cache key"
    assert list(iter_documents(CorpusConfig(source=f"s3://{BUCKET}/corpus/a.txt"))) == ["first document, edited\n"]


def test_missing_bucket_is_one_clear_line(endpoint):
    from stages.core.errors import ArtifactError
    from stages.storage.stores import S3Store

    with pytest.raises(ArtifactError, match="bucket does not exist") as failure:
        S3Store("s3://no-such-bucket/x").find("tokenizer", "k")
    assert not getattr(failure.value, "transient", False)


# --- several runs after one key: leases and conditional publication against the S3 endpoint ---------


def _objects(client, prefix: str) -> dict[str, str]:
    """``{key: ETag}`` of every object under ``prefix``."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"]: item["ETag"] for page in pages for item in page.get("Contents", [])}


def test_s3_claims_have_one_winner_and_a_stale_lease_one_taker(endpoint, tmp_path):
    from stages.storage.lease import LeaseHolder, LeaseLost
    from stages.storage.stores import S3Store
    from tests._lease_workers import race

    uri = f"s3://{BUCKET}/leases"
    for attempt in range(3):
        reports = race(f"{uri}-{attempt}", "claim", tmp_path, 4, "30")
        assert sum(r["won"] for r in reports) == 1, reports

    store = S3Store(uri, cache_dir=tmp_path / "c")
    # A fresh lease is nobody else's: 30 s, so that no loaded machine turns it stale between the claims.
    assert store.claim("race", "fresh", LeaseHolder("gone", "another-host", 1), lease_s=30) is not None
    assert store.claim("race", "fresh", lease_s=30) is None, "a fresh lease is nobody else's"
    stalled = store.claim("race", "k", LeaseHolder("gone", "another-host", 1), lease_s=2)
    assert stalled is not None
    assert "leases/.leases/race/k.json" in _objects(endpoint["direct"], "leases/.leases/")
    time.sleep(2.5)
    reports = race(uri, "claim", tmp_path, 4, "30")
    assert sum(r["won"] for r in reports) == 1, reports
    taker = store.lease_holder("race", "k")
    assert taker.run_id.startswith("worker-")
    with pytest.raises(LeaseLost, match=f"now held by run {taker.run_id}"):
        stalled.renew()
    stalled.release()  # If-Match on its old ETag: the taker's record stays
    assert store.lease_holder("race", "k").token == taker.token


def test_s3_concurrent_commits_publish_one_output_and_losers_remove_only_their_own_files(endpoint, tmp_path):
    from stages.storage.artifacts import verify
    from stages.storage.stores import S3Store
    from tests._lease_workers import race

    direct = endpoint["direct"]
    reports = race(f"s3://{BUCKET}/own", "commit", tmp_path, 4, "own")
    published = {r["published"] for r in reports}
    assert len(published) == 1 and published <= {r["mine"] for r in reports}, reports
    (digest,) = published
    left = _objects(direct, "own/race/k/")
    assert set(left) == {"own/race/k/manifest.json", f"own/race/k/{digest}/out.txt"}, "losers deleted their folders"
    store = S3Store(f"s3://{BUCKET}/own", cache_dir=tmp_path / "fresh")
    assert verify(store.materialize(store.ref(store.find("race", "k")))).digest == digest

    reports = race(f"s3://{BUCKET}/same", "commit", tmp_path, 4, "same")
    assert len({r["published"] for r in reports} | {r["mine"] for r in reports}) == 1, "same bytes, one digest"
    (digest,) = {r["published"] for r in reports}
    assert set(_objects(direct, "same/race/k/")) == {"same/race/k/manifest.json", f"same/race/k/{digest}/out.txt"}


def test_s3_commit_to_a_finished_key_keeps_its_objects_and_readers(endpoint, tmp_path):
    import threading

    from stages.storage.artifacts import Manifest, files_digest, hash_files
    from stages.storage.stores import S3Store
    from tests._lease_workers import race

    uri = f"s3://{BUCKET}/kept"
    store = S3Store(uri, cache_dir=tmp_path / "writer")
    work = store.scratch("race", "k")
    (work / "out.txt").write_text("first\n")
    files = hash_files(work)
    first = store.publish(work, Manifest("race", "k", {}, {}, "t", files=files, digest=files_digest(files)))
    before = _objects(endpoint["direct"], "kept/race/k/")
    stop, errors, reads = threading.Event(), [], [0]

    def download_all_the_time():  # a reader on another machine: a fresh cache for every copy
        while not stop.is_set():
            try:
                reader = S3Store(uri, cache_dir=tmp_path / f"reader-{reads[0]}")
                assert (reader.materialize(store.ref(first)) / "out.txt").read_text() == "first\n"
                reads[0] += 1
            except Exception as exc:
                errors.append(exc)

    reader = threading.Thread(target=download_all_the_time)
    reader.start()
    try:
        reports = race(uri, "commit", tmp_path, 4, "own")
    finally:
        stop.set()
        reader.join()
    assert {r["published"] for r in reports} == {first.digest}
    assert errors == [] and reads[0] > 0
    assert _objects(endpoint["direct"], "kept/race/k/") == before, "not one object written or deleted"
