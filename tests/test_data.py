"""Data stage: shards hold exactly the corpus's tokens, split deterministically, in the documented format."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from _data_fixtures import (
    UNICODE_DOCS,
    expected_splits,
    micro_config,
    run,
    shard_documents,
    stdlib_documents,
    write_corpus,
)

from stages.core.errors import DataError
from stages.lm.tokenizer import Tokenizer
from stages.storage import executors
from stages.storage.shards import TokenShards
from stages.storage.splits import SplitRule


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
    # Each split is the corpus read front to back, filtered by the split rule.
    for split, documents in expected_splits(cfg).items():
        stream = TokenShards(directory, split)
        assert np.array_equal(stream.window(0, len(stream)), expected_stream(tok, documents))
        assert stream.documents == len(documents)
        assert stream.num_bytes == sum(len(doc.encode("utf-8")) for doc in documents)
        # Decoding the stream gives the documents back, text for text.
        assert shard_documents(directory, split, tok) == documents


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


_STORES = itertools.count()


def _stage(tmp_path: Path, tokenizer_ref, corpus: Path, *overrides: str):
    """The data stage over ``corpus``, in a store of its own."""
    store = tmp_path / f"store-{next(_STORES)}"
    return run("data", micro_config(f"corpus.source={corpus}", *overrides), store, {"tokenizer": tokenizer_ref})


def test_split_is_deterministic_by_seed_and_content(built, tmp_path):
    _, tok, _, _, tokenizer_ref = built
    docs = [f"doc {i}: " + "text " * (i % 7) + "\n" for i in range(200)]
    forward = write_corpus(tmp_path / "forward", docs)
    backward = write_corpus(tmp_path / "backward", docs[::-1])

    def val(corpus: Path, seed: int) -> list[str]:
        result = _stage(tmp_path, tokenizer_ref, corpus, "data.val_fraction=0.1", f"data.seed={seed}")
        return shard_documents(result.ref.uri, "val", tok)

    first = val(forward, 1)
    assert val(forward, 1) == first
    assert val(forward, 2) != first
    assert 5 <= len(first) <= 40
    # Membership follows the text, not the position: reversing the corpus keeps each document's side.
    assert sorted(val(backward, 1)) == sorted(first)


def _scoring(rule: SplitRule, below: bool, count: int) -> list[str]:
    """``count`` documents the rule scores below (or at least) its fraction, over 1000 bytes each."""
    found = (f"document {i}\n" + "more text\n" * 100 for i in range(10_000))
    return [doc for doc in found if (rule.score(doc) < rule.fraction) == below][:count]


@pytest.mark.parametrize("side", ["val", "train"])
def test_a_split_the_hash_leaves_empty_gets_one_document(built, tmp_path, side):
    """Two documents the hash puts on the same side, each its own work unit: one moves over."""
    _, tok, _, _, tokenizer_ref = built
    rule = SplitRule.seeded(0, 0.45)
    docs = _scoring(rule, below=side == "train", count=2)  # both on the other side
    corpus = write_corpus(tmp_path / "two", docs)
    result = _stage(tmp_path, tokenizer_ref, corpus, "data.seed=0", "data.val_fraction=0.45", "data.unit_bytes=1000")
    metrics = result.manifest.metrics
    assert metrics["units"] == 2
    assert (metrics["train_documents"], metrics["val_documents"]) == (1, 1)
    moved = shard_documents(result.ref.uri, side, tok)
    # The document that moves is the one nearest the other side.
    pick = min if side == "val" else max
    assert moved == [pick(docs, key=rule.score)]


def _files(result) -> dict[str, bytes]:
    """A data output's files but its manifest (whose metrics say what was reused)."""
    return {p.name: p.read_bytes() for p in sorted(Path(result.ref.uri).iterdir()) if p.name != "manifest.json"}


def test_a_repaired_unit_is_reused_only_where_the_same_repair_is_needed(built, tmp_path):
    """The repair's forced document is part of a unit's key: a repaired result never stands in for the
    plain unit (a grown corpus that needs no repair), nor a plain result for a repaired one."""
    _, tok, _, _, tokenizer_ref = built
    rule = SplitRule.seeded(0, 0.45)
    pair = _scoring(rule, below=False, count=2)  # both train: a run of these two moves one to val
    held_out = _scoring(rule, below=True, count=1)  # a val document: with it, no repair is needed
    settings = ("data.seed=0", "data.val_fraction=0.45", "data.unit_bytes=1000")  # a unit per document

    def stage(corpus: Path):
        return run(
            "data", micro_config(f"corpus.source={corpus}", *settings), tmp_path / "store", {"tokenizer": tokenizer_ref}
        )

    repaired = stage(write_corpus(tmp_path / "pair", pair))
    metrics = repaired.manifest.metrics
    assert (metrics["val_documents"], metrics["units_computed"], metrics["units_reused"]) == (1, 2, 0)

    grown = stage(write_corpus(tmp_path / "grown", [*pair, *held_out]))
    metrics = grown.manifest.metrics
    # The unit that was repaired is read again without the force; the other one is reused.
    assert (metrics["units"], metrics["units_computed"], metrics["units_reused"]) == (3, 2, 1)
    assert shard_documents(grown.ref.uri, "val", tok) == held_out
    assert shard_documents(grown.ref.uri, "train", tok) == pair
    assert _files(grown) == _files(_stage(tmp_path, tokenizer_ref, tmp_path / "grown", *settings))

    # The same two documents elsewhere: both plain units are reused, then the repaired one too.
    again = stage(write_corpus(tmp_path / "pair-again", pair))
    metrics = again.manifest.metrics
    assert (metrics["units_computed"], metrics["units_reused"]) == (0, 2)
    assert _files(again) == _files(repaired)


@pytest.fixture
def pools(monkeypatch) -> list[str]:
    """Start methods of the process pools the data stage opens."""
    methods: list[str] = []

    class Recording(executors.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            methods.append(kwargs["mp_context"].get_start_method())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(executors, "ProcessPoolExecutor", Recording)
    return methods


def _same_streams(got: Path | str, want: Path | str) -> None:
    for split in ("train", "val"):
        a, b = TokenShards(got, split), TokenShards(want, split)
        assert np.array_equal(a.window(0, len(a)), b.window(0, len(b)))
        assert (a.documents, a.num_bytes) == (b.documents, b.num_bytes)


# Small units so the ~150 KB corpus is spread over several worker tasks.
_SPREAD = ("data.val_fraction=0.1", "data.workers=2", "data.unit_bytes=20000")


def test_worker_processes_and_shard_rolling_give_the_same_stream(built, corpus_dir, tmp_path, pools):
    _, _, shards, _, tokenizer_ref = built
    result = _stage(tmp_path, tokenizer_ref, corpus_dir, *_SPREAD, "data.shard_tokens=5000")
    assert len(pools) == 1 and result.manifest.metrics["workers"] == 2
    rolled = TokenShards(result.ref.uri, "train")
    assert len(rolled.arrays) > result.manifest.metrics["units"] and all(len(a) <= 5000 for a in rolled.arrays)
    _same_streams(result.ref.uri, shards.ref.uri)


def test_workers_from_a_threaded_host_are_spawned_and_agree(built, corpus_dir, tmp_path, pools):
    """Inside a threaded host (as under Prefect) workers are spawned, not forked."""
    _, _, shards, _, tokenizer_ref = built
    seen: dict = {}

    def job() -> None:
        seen["result"] = _stage(tmp_path, tokenizer_ref, corpus_dir, *_SPREAD)

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
    _same_streams(seen["result"].ref.uri, shards.ref.uri)


def test_data_stage_needs_two_documents(built, tmp_path):
    _, _, _, store, tokenizer_ref = built
    write_corpus(tmp_path / "one", ["a single document\n"])
    cfg = micro_config(f"corpus.source={tmp_path / 'one'}")
    with pytest.raises(DataError, match=r"1 document\(s\); a train/val split needs at least 2"):
        run("data", cfg, store, {"tokenizer": tokenizer_ref})
