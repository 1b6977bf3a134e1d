"""Data stage: shards hold exactly the corpus's tokens, split deterministically, in the documented format."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from _data_fixtures import UNICODE_DOCS, micro_config, run, stdlib_documents, write_corpus

from stages import data
from stages.core.errors import DataError
from stages.lm.tokenizer import Tokenizer
from stages.storage.corpus import read_corpus
from stages.storage.shards import TokenShards


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """~50 documents: real Python modules plus non-ASCII prose."""
    docs = stdlib_documents(46, chars=3000) + UNICODE_DOCS
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs)


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus_dir):
    store = tmp_path_factory.mktemp("store")
    cfg = micro_config(f"corpus.source={corpus_dir}", "data.val_fraction=0.1")
    tokenizer = run("tokenizer", cfg, store)
    shards = run("data", cfg, store, {"tokenizer": tokenizer.ref})
    return cfg, Tokenizer.load(tokenizer.ref.uri), shards, store, tokenizer.ref


def expected_stream(tok: Tokenizer, documents: list[str]) -> np.ndarray:
    ids: list[int] = []
    for doc in documents:
        ids += tok.encode(doc) + [tok.eos_id]
    return np.array(ids, dtype=np.int64)


def test_shards_hold_exactly_the_corpus_tokens(built):
    cfg, tok, shards, _, _ = built
    directory = Path(shards.ref.uri)
    documents = read_corpus(cfg.corpus).documents
    splits = data.split_documents(documents, cfg.data.val_fraction, cfg.data.seed)
    assert sorted(splits["train"] + splits["val"]) == list(range(len(documents)))
    for split in ("train", "val"):
        stream = TokenShards(directory, split)
        want = expected_stream(tok, [documents[i] for i in splits[split]])
        assert np.array_equal(stream.window(0, len(stream)), want)
        assert stream.documents == len(splits[split])
        assert stream.num_bytes == sum(len(documents[i].encode("utf-8")) for i in splits[split])
        assert int((stream.window(0, len(stream)) == tok.eos_id).sum()) == len(splits[split])
        # Decoding the stream gives the documents back, text for text.
        assert tok.decode(stream.window(0, len(stream))) == "".join(documents[i] for i in splits[split])


def test_index_matches_the_documented_format(built):
    _, tok, shards, _, _ = built
    index = json.loads((Path(shards.ref.uri) / "shards.json").read_text(encoding="utf-8"))
    assert set(index) == {"dtype", "vocab_size", "eos_id", "splits"}
    assert (index["dtype"], index["vocab_size"], index["eos_id"]) == ("uint16", tok.vocab_size, tok.eos_id)
    assert set(index["splits"]) == {"train", "val"}
    for info in index["splits"].values():
        assert set(info) == {"files", "tokens", "documents", "bytes"}
        sizes = [(Path(shards.ref.uri) / name).stat().st_size for name in info["files"]]
        assert sum(sizes) == 2 * info["tokens"]
    metrics = shards.manifest.metrics
    assert (
        metrics["train_tokens"] == index["splits"]["train"]["tokens"]
        and metrics["val_tokens"] == index["splits"]["val"]["tokens"]
    )
    assert metrics["train_documents"] + metrics["val_documents"] == metrics["corpus_documents"]
    assert metrics["dtype"] == "uint16" and metrics["bytes_per_token"] > 1.0


def test_split_is_deterministic_by_seed_and_content():
    docs = [f"doc {i}: " + "text " * (i % 7) for i in range(200)]
    first = data.split_documents(docs, 0.1, seed=1)
    assert data.split_documents(docs, 0.1, seed=1) == first
    assert data.split_documents(docs, 0.1, seed=2) != first
    assert 5 <= len(first["val"]) <= 40
    # Membership follows the text, not the position: reversing the corpus keeps each document's side.
    reversed_split = data.split_documents(docs[::-1], 0.1, seed=1)
    assert sorted(docs[::-1][i] for i in reversed_split["val"]) == sorted(docs[i] for i in first["val"])


def test_tiny_corpora(tmp_path):
    two = data.split_documents(["a", "b"], 0.05, seed=0)
    assert len(two["val"]) == 1 and len(two["train"]) == 1
    with pytest.raises(DataError, match=r"1 document\(s\); a train/val split needs at least 2"):
        data.split_documents(["only one"], 0.05, seed=0)


def _write(tmp_path: Path, cfg, tok: Tokenizer, workers: int, shard_tokens: int) -> Path:
    out = tmp_path / f"w{workers}-{shard_tokens}"
    out.mkdir()
    documents = read_corpus(cfg.corpus).documents
    splits = data.split_documents(documents, cfg.data.val_fraction, cfg.data.seed)
    # Small chunks so the tiny corpus is spread over several worker tasks.
    data.write_splits(documents, splits, tok, out, workers=workers, shard_tokens=shard_tokens, chunk_chars=8000)
    return out


@pytest.fixture
def pools(monkeypatch) -> list[str]:
    """Start methods of the process pools the data stage opens."""
    methods: list[str] = []

    class Recording(data.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            methods.append(kwargs["mp_context"].get_start_method())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(data, "ProcessPoolExecutor", Recording)
    return methods


def test_worker_processes_and_shard_rolling_give_the_same_stream(built, tmp_path, pools):
    cfg, tok, shards, _, _ = built
    reference = TokenShards(shards.ref.uri, "train")
    out = _write(tmp_path, cfg, tok, workers=2, shard_tokens=5000)
    rolled = TokenShards(out, "train")
    assert len(pools) == 1
    assert len(rolled.arrays) > 1 and all(len(a) <= 5000 for a in rolled.arrays)
    assert np.array_equal(rolled.window(0, len(rolled)), reference.window(0, len(reference)))


def test_workers_from_a_threaded_host_are_spawned_and_agree(built, tmp_path, pools):
    """Inside a threaded host (as under Prefect) workers are spawned, not forked."""
    cfg, tok, shards, _, _ = built
    seen: dict = {}

    def job() -> None:
        seen["out"] = _write(tmp_path, cfg, tok, workers=2, shard_tokens=10**9)

    blocker = threading.Event()
    extra = threading.Thread(target=blocker.wait)  # another live thread, like a host's event loop
    extra.start()
    try:
        worker = threading.Thread(target=job)
        worker.start()
        worker.join()
    finally:
        blocker.set()
        extra.join()
    assert pools == ["spawn"]
    for split in ("train", "val"):
        want = TokenShards(shards.ref.uri, split)
        got = TokenShards(seen["out"], split)
        assert np.array_equal(got.window(0, len(got)), want.window(0, len(want)))


def test_data_stage_needs_two_documents(built, tmp_path):
    _, _, _, store, tokenizer_ref = built
    write_corpus(tmp_path / "one", ["a single document\n"])
    cfg = micro_config(f"corpus.source={tmp_path / 'one'}")
    with pytest.raises(DataError, match=r"needs at least 2"):
        run("data", cfg, store, {"tokenizer": tokenizer_ref})
