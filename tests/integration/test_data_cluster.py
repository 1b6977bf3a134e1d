"""The data stage on a real Dask cluster (``distributed.LocalCluster``: scheduler and worker
processes on 127.0.0.1) against a real S3 endpoint (moto over HTTP), s3:// corpora streamed
in place (Parquet row groups and objects read in ranged GETs, never copied whole), and a grown
corpus computing only its new units from an s3:// store, on the process pool and on Dask."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests._data_fixtures import MICRO, stdlib_documents, stdlib_lines, write_corpus

from ._servers import moto_bucket, moto_env

pytestmark = pytest.mark.slow
BUCKET = "gptpipe-data"


@pytest.fixture
def s3_client(moto, monkeypatch, tmp_path):
    """The environment points gptpipe (and processes started from here) at moto, whose bucket exists."""
    env = {**moto_env(moto), "GPTPIPE_S3_CACHE": str(tmp_path / "s3-cache")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    client = moto_bucket(moto, BUCKET)
    return client


@pytest.fixture
def s3(s3_client, tmp_path):
    """A corpus uploaded to the moto bucket: text objects, a JSONL object and two Parquet objects."""
    client = s3_client
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


def _plan(cfg) -> list:
    from stages.storage.units import plan_units

    return list(plan_units(cfg.corpus, cfg.data.unit_bytes))


def _holding(units: list, name: str) -> list[int]:
    """The units that hold a piece of the file or object ``name``."""
    return [unit.index for unit in units if any(p.location.endswith(f"/{name}") for p in unit.pieces)]


def test_dask_cluster_run_matches_the_process_pool_byte_for_byte(s3, tmp_path):
    """Each executor in a store of its own, so each computes every unit; then the corpus grows by
    one object and each computes only the unit holding it: unit keys do not depend on the executor."""
    from distributed import LocalCluster

    from stages.executor import run_stage
    from stages.storage.stores import S3Store

    source = f"s3://{BUCKET}/corpus"
    store = S3Store(f"s3://{BUCKET}/store", cache_dir=tmp_path / "store-cache")
    dask_store = S3Store(f"s3://{BUCKET}/store-dask", cache_dir=tmp_path / "dask-cache")
    cfg = _config(store.uri, source, "data.workers=2")
    tokenizer = run_stage("tokenizer", cfg, {}, store)
    assert tokenizer.manifest.metrics["seen_documents"] > 1000, "the tokenizer streamed the whole s3:// corpus"
    local = run_stage("data", cfg, {"tokenizer": tokenizer.ref}, store)
    assert local.manifest.metrics["units"] > 4

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        dask_cfg = _config(
            dask_store.uri, source, "data.executor=dask", f"data.dask_scheduler={cluster.scheduler_address}"
        )
        dask_tokenizer = run_stage("tokenizer", dask_cfg, {}, dask_store)
        assert dask_tokenizer.ref.digest == tokenizer.ref.digest
        on_dask = run_stage("data", dask_cfg, {"tokenizer": dask_tokenizer.ref}, dask_store)
        before = _plan(cfg)
        body = "\n".join(stdlib_lines()[20_000:20_280]).encode()
        s3["client"].put_object(Bucket=BUCKET, Key="corpus/text_05a.txt", Body=body)
        grown_on_dask = run_stage("data", dask_cfg, {"tokenizer": dask_tokenizer.ref}, dask_store)
    grown = run_stage("data", cfg, {"tokenizer": tokenizer.ref}, store)

    assert on_dask.manifest.metrics["executor"] == "dask" and on_dask.manifest.metrics["units_reused"] == 0
    assert _shards(S3Store(dask_store.uri, cache_dir=tmp_path / "c1"), on_dask) == _shards(
        S3Store(store.uri, cache_dir=tmp_path / "c2"), local
    )
    # Computed: the unit the new object lands in and, as that object ends a unit here, the rest of
    # the old unit it split; every other unit keeps its pieces, hence its key, and is reused.
    after = _plan(cfg)
    fresh = [unit.index for unit in after if unit.digests not in {old.digests for old in before}]
    assert _holding(after, "text_05a.txt") == fresh[:1] and len(fresh) <= 2 < len(after), (fresh, len(after))
    for result in (grown, grown_on_dask):
        metrics = result.manifest.metrics
        assert (metrics["units"], metrics["units_computed"], metrics["units_reused"]) == (
            len(after),
            len(fresh),
            len(after) - len(fresh),
        )
    assert _shards(S3Store(dask_store.uri, cache_dir=tmp_path / "c3"), grown_on_dask) == _shards(
        S3Store(store.uri, cache_dir=tmp_path / "c4"), grown
    )
    leftovers = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="store-dask/data/.units-").get("KeyCount", 0)
    assert leftovers == 0, "units are removed from the bucket once assembled into the artifact"
    assert not (s3["cache"] / "objects").exists(), "the corpus was streamed, not copied into the local cache"


def test_a_grown_corpus_in_an_s3_store_computes_only_its_new_units(s3_client, tmp_path):
    from stages.executor import run_stage
    from stages.storage.stores import S3Store

    docs = stdlib_documents(32, chars=3000)
    corpus = write_corpus(tmp_path / "corpus", docs[:30])
    sets = ("data.unit_bytes=10000", "data.workers=1")

    def stage(prefix: str, cache: str):
        """The data stage in ``s3://BUCKET/prefix`` with a local cache of its own (reuse comes from the bucket)."""
        store = S3Store(f"s3://{BUCKET}/{prefix}", cache_dir=tmp_path / cache)
        tokenizer_cfg = _config(store.uri, "python-stdlib", "corpus.max_bytes=200000")
        tokenizer = run_stage("tokenizer", tokenizer_cfg, {}, store)
        return run_stage("data", _config(store.uri, str(corpus), *sets), {"tokenizer": tokenizer.ref}, store)

    first = stage("incremental", "cache-a")
    added = {"doc_0011a.txt": docs[30], "doc_9999.txt": docs[31]}
    for name, text in added.items():
        (corpus / name).write_text(text, encoding="utf-8", newline="")
    second = stage("incremental", "cache-b")
    scratch = stage("scratch", "cache-c")

    units = _plan(_config("unused", str(corpus), *sets))
    holding = sorted({i for name in added for i in _holding(units, name)})
    assert first.manifest.metrics["units_computed"] == first.manifest.metrics["units"]
    metrics = second.manifest.metrics
    assert metrics["units_reused"] > 0 and metrics["units_computed"] == len(holding)
    assert metrics["units_reused"] + metrics["units_computed"] == metrics["units"] == scratch.manifest.metrics["units"]
    assert _shards(S3Store(f"s3://{BUCKET}/incremental", cache_dir=tmp_path / "c1"), second) == _shards(
        S3Store(f"s3://{BUCKET}/scratch", cache_dir=tmp_path / "c2"), scratch
    )


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
    files = lambda result: {p.name: p.read_bytes() for p in Path(result.ref.uri).iterdir() if p.suffix == ".bin"}
    assert files(remote) and files(remote) == files(local)
    assert _index(remote) == _index(local)
    # An object is known by its ETag, a local file by its sha256: the same bytes in either place
    # make the same units, under keys of their own (neither run reuses the other's units).
    remote_units, local_units = _units(remote), _units(local)
    assert [u.pop("key") for u in remote_units] != [u.pop("key") for u in local_units]
    assert remote_units == local_units and local.manifest.metrics["units_reused"] == 0


def _index(result) -> dict:
    return json.loads((Path(result.ref.uri) / "shards.json").read_text(encoding="utf-8"))


def _units(result) -> list[dict]:
    return json.loads((Path(result.ref.uri) / "units.json").read_text(encoding="utf-8"))["units"]
