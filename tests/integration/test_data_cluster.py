"""The data stage on a real Dask cluster (``distributed.LocalCluster``: scheduler and worker
processes on 127.0.0.1) against a real S3 endpoint (moto over HTTP), and s3:// corpora streamed
in place: Parquet row groups and objects read in ranged GETs, never copied whole."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests._data_fixtures import MICRO, stdlib_lines

pytestmark = pytest.mark.slow
BUCKET = "gptpipe-data"


@pytest.fixture
def s3(moto, monkeypatch, tmp_path):
    """The environment points gptpipe (and processes started from here) at moto; a corpus is uploaded."""
    import boto3

    env = {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{moto}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "GPTPIPE_S3_CACHE": str(tmp_path / "s3-cache"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    lines = stdlib_lines()
    for i in range(12):
        client.put_object(
            Bucket=BUCKET, Key=f"corpus/text_{i:02d}.txt", Body="\n".join(lines[i * 300 : i * 300 + 280]).encode()
        )
    records = "".join(json.dumps({"text": "\n".join(lines[i : i + 4])}) + "\n" for i in range(4000, 9000, 5))
    client.put_object(Bucket=BUCKET, Key="corpus/records.jsonl", Body=records.encode())
    table = tmp_path / "table.parquet"
    pq.write_table(
        pa.table({"text": ["\n".join(lines[i : i + 6]) for i in range(10_000, 16_000, 3)]}), table, row_group_size=200
    )
    client.upload_file(str(table), BUCKET, "corpus/table.parquet")
    big = tmp_path / "big.parquet"  # ~1 MB compressed, 17 row groups
    pq.write_table(
        pa.table({"text": ["\n".join(lines[i % len(lines) : i % len(lines) + 6]) for i in range(0, 50_000, 3)]}),
        big,
        row_group_size=1000,
    )
    client.upload_file(str(big), BUCKET, "big/table.parquet")
    return {"client": client, "table": big, "cache": tmp_path / "s3-cache"}


def _config(store: str, source: str, *extra: str):
    from stages.core.config import load_config

    return load_config(
        None, [*MICRO, f"artifacts.store={store}", f"corpus.source={source}", "data.unit_bytes=60000", *extra]
    )


def _shards(store, result) -> dict[str, bytes]:
    """Every file of a data artifact, downloaded and verified by the store."""
    directory = store.materialize(result.ref)
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "manifest.json"}


def test_dask_cluster_run_matches_the_process_pool_byte_for_byte(s3, tmp_path):
    from distributed import LocalCluster

    from stages.executor import run_stage
    from stages.storage.stores import S3Store

    source = f"s3://{BUCKET}/corpus"
    store_uri = f"s3://{BUCKET}/store"
    cfg = _config(store_uri, source, "data.workers=2")
    store = S3Store(store_uri, cache_dir=tmp_path / "store-cache")
    tokenizer = run_stage("tokenizer", cfg, {}, store)
    assert tokenizer.manifest.metrics["seen_documents"] > 1000, "the tokenizer streamed the whole s3:// corpus"
    local = run_stage("data", cfg, {"tokenizer": tokenizer.ref}, store)
    assert local.manifest.metrics["units"] > 4

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        dask_cfg = _config(store_uri, source, "data.executor=dask", f"data.dask_scheduler={cluster.scheduler_address}")
        on_dask = run_stage(
            "data", dask_cfg, {"tokenizer": tokenizer.ref}, S3Store(store_uri, cache_dir=tmp_path / "other-cache")
        )
    assert on_dask.ref.uri != local.ref.uri and on_dask.manifest.metrics["executor"] == "dask"
    assert _shards(S3Store(store_uri, cache_dir=tmp_path / "c1"), on_dask) == _shards(
        S3Store(store_uri, cache_dir=tmp_path / "c2"), local
    )
    leftovers = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="store/data/.units-").get("KeyCount", 0)
    assert leftovers == 0, "units are removed from the bucket once assembled into the artifact"
    assert not (s3["cache"] / "objects").exists(), "the corpus was streamed, not copied into the local cache"


def test_s3_parquet_is_streamed_by_row_group_and_equals_the_local_file(s3, tmp_path, monkeypatch):
    from stages.executor import run_stage
    from stages.storage import s3 as s3_module
    from stages.storage.stores import LocalStore

    size = s3["table"].stat().st_size
    assert pq.ParquetFile(s3["table"]).metadata.num_row_groups >= 8 and size > 500_000
    reads: list[int] = []
    ranged = s3_module._RangedObject.readinto

    def recording(self, buffer):
        got = ranged(self, buffer)
        reads.append(got)
        return got

    monkeypatch.setattr(s3_module._RangedObject, "readinto", recording)
    monkeypatch.setattr(s3_module, "READ_BLOCK", 32 * 1024)
    store = LocalStore(tmp_path / "store")
    remote_cfg = _config(
        str(tmp_path / "store"), f"s3://{BUCKET}/big/table.parquet", "data.workers=1", "data.unit_bytes=200000"
    )
    tokenizer = run_stage("tokenizer", remote_cfg, {}, store)
    remote = run_stage("data", remote_cfg, {"tokenizer": tokenizer.ref}, store)
    assert remote.manifest.metrics["units"] >= 4, "row groups are split over several units"
    assert reads and max(reads) < size / 4, f"no ranged GET reads the whole object ({max(reads)} of {size} bytes)"
    assert not (s3["cache"] / "objects").exists()

    local_cfg = _config(str(tmp_path / "store"), str(s3["table"]), "data.workers=1", "data.unit_bytes=200000")
    local = run_stage("data", local_cfg, {"tokenizer": tokenizer.ref}, store)
    files = lambda result: {p.name: p.read_bytes() for p in Path(result.ref.uri).iterdir() if p.name != "manifest.json"}
    assert files(remote) == files(local)
