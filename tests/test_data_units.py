"""The data stage at scale: work units give the same bytes for any worker count, memory does not
grow with the corpus, a killed run resumes its finished units, a grown corpus tokenizes only its
new units, and the tokenizer samples it all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _data_fixtures import (
    MICRO,
    expected_splits,
    micro_config,
    run,
    shard_documents,
    stdlib_documents,
    stdlib_lines,
    synthetic_corpus,
    write_corpus,
)

from stages.lm.tokenizer import Tokenizer
from stages.storage.shards import TokenShards
from stages.storage.units import plan_units

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_ref(tmp_path_factory):
    store = tmp_path_factory.mktemp("tokenizer-store")
    return run("tokenizer", micro_config("corpus.max_bytes=200000"), store).ref


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> Path:
    """Text files, a JSONL file large enough to be cut in byte ranges, a Parquet file of many row groups."""
    root = synthetic_corpus(tmp_path_factory.mktemp("mixed") / "corpus", 300_000, 15_000, seed=1)
    lines = stdlib_lines()
    records = [{"text": "\n".join(lines[i : i + 1 + i % 9]) + "\n"} for i in range(0, 12_000, 7)]
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    texts = ["\n".join(lines[i : i + 3 + i % 5]) for i in range(20_000, 26_000, 4)]
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), root / "table.parquet", row_group_size=150)
    return root


def _data(store: Path, corpus: Path, tokenizer_ref, *overrides: str):
    cfg = micro_config(f"corpus.source={corpus}", "data.unit_bytes=40000", *overrides)
    return run("data", cfg, store, {"tokenizer": tokenizer_ref})


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.name != "manifest.json"}


def test_units_give_the_same_bytes_for_any_worker_count(tmp_path, mixed_corpus, tokenizer_ref):
    one = _data(tmp_path / "a", mixed_corpus, tokenizer_ref, "data.workers=1")
    two = _data(tmp_path / "b", mixed_corpus, tokenizer_ref, "data.workers=2")
    assert one.manifest.metrics["units"] > 8, "the corpus must span many units, JSONL ranges and row groups"
    assert two.manifest.metrics["workers"] == 2
    assert _contents(Path(one.ref.uri)) == _contents(Path(two.ref.uri))

    # The streams are those of the whole corpus read front to back, each filtered by the split rule.
    tok = Tokenizer.load(tokenizer_ref.uri)
    for split, documents in expected_splits(micro_config(f"corpus.source={mixed_corpus}")).items():
        got = TokenShards(one.ref.uri, split)
        want = [i for ids in tok.encode_batch(documents) for i in (*ids, tok.eos_id)]
        assert got.window(0, len(got)).tolist() == want
        assert shard_documents(one.ref.uri, split, tok) == documents
        assert (got.documents, got.num_bytes) == (len(documents), sum(len(d.encode("utf-8")) for d in documents))


def _python_peak(store: Path, corpus: Path, tokenizer_ref) -> int:
    tracemalloc.start()
    try:
        _data(store, corpus, tokenizer_ref, "data.workers=1", "data.unit_bytes=200000")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_corpus(tmp_path, tokenizer_ref):
    small = synthetic_corpus(tmp_path / "small", 1_500_000, 50_000, seed=2)
    large = synthetic_corpus(tmp_path / "large", 6_000_000, 50_000, seed=3)
    small_peak = _python_peak(tmp_path / "s", small, tokenizer_ref)
    large_peak = _python_peak(tmp_path / "l", large, tokenizer_ref)
    # Four times the text; a reader that kept the corpus (or its tokens) would peak ~4x higher.
    assert large_peak / small_peak < 1.5, (small_peak, large_peak)


def _stage_command(store: Path, corpus: Path, tokenizer_ref) -> list[str]:
    sets = [*MICRO, f"corpus.source={corpus}", "data.unit_bytes=40000"]
    return [
        sys.executable,
        "-m",
        "stages",
        "data",
        *[a for s in sets for a in ("--set", s)],
        "--input",
        f"tokenizer={tokenizer_ref.uri}",
        "--out",
        str(store),
    ]


# ~40 files of 1.5-3 KB: 12 KB units hold about five files each.
_GROWN = ("data.unit_bytes=12000", "data.val_fraction=0.2")
# Two files join the sorted listing: one between doc_0017 and doc_0018, one at the end.
_NEW_FILES = {"doc_0017a.txt": 0, "doc_9999.txt": 1}


def _units_json(result) -> list[dict]:
    return json.loads((Path(result.ref.uri) / "units.json").read_text(encoding="utf-8"))["units"]


@pytest.fixture(scope="module")
def grown(tmp_path_factory, tokenizer_ref):
    """A 40-file corpus run, the same store's run after two files were added, and a from-scratch run of the grown corpus."""
    base = tmp_path_factory.mktemp("grown")
    docs = [doc[: 1500 + 40 * i] for i, doc in enumerate(stdlib_documents(42, chars=4000))]
    corpus = write_corpus(base / "corpus", docs[:40])
    first = _data(base / "store", corpus, tokenizer_ref, *_GROWN)
    for name, extra in _NEW_FILES.items():
        (corpus / name).write_text(docs[40 + extra], encoding="utf-8", newline="")
    second = _data(base / "store", corpus, tokenizer_ref, *_GROWN)
    scratch = _data(base / "scratch", corpus, tokenizer_ref, *_GROWN)
    return corpus, first, second, scratch


def test_a_grown_corpus_computes_only_the_units_holding_new_files(grown):
    corpus, first, second, scratch = grown
    cfg = micro_config(f"corpus.source={corpus}", *_GROWN)
    units = list(plan_units(cfg.corpus, cfg.data.unit_bytes))
    holding = [u.index for u in units if any(Path(p.location).name in _NEW_FILES for p in u.pieces)]
    assert len(units) >= 6 and 1 <= len(holding) <= 2, (len(units), holding)

    before, after = first.manifest.metrics, second.manifest.metrics
    assert (before["units_computed"], before["units_reused"]) == (before["units"], 0)
    assert after["units"] == len(units)
    assert (after["units_computed"], after["units_reused"]) == (len(holding), len(units) - len(holding))
    # Exactly the units holding a new file have keys the first run did not make.
    known = {unit["key"] for unit in _units_json(first)}
    assert [i for i, unit in enumerate(_units_json(second)) if unit["key"] not in known] == holding
    # Reusing units gives the bytes of a run that computed everything (shards.json and units.json included).
    assert scratch.manifest.metrics["units_reused"] == 0
    assert _contents(Path(second.ref.uri)) == _contents(Path(scratch.ref.uri))


def test_the_report_card_shows_the_units_computed_and_reused(grown):
    from flows.report import rows

    _, first, second, _ = grown
    for result in (first, second):
        metrics = result.manifest.metrics
        stage, _, _, figures, _ = rows({"stages": {"data": result.record()}})[0]
        expected = f"units_computed={metrics['units_computed']}, units_reused={metrics['units_reused']}"
        assert stage == "data" and expected in figures, figures
    assert first.manifest.metrics["units_reused"] == 0 and second.manifest.metrics["units_reused"] > 0


def test_documents_keep_their_split_side_when_the_corpus_grows(grown, tokenizer_ref):
    corpus, first, second, _ = grown
    tok = Tokenizer.load(tokenizer_ref.uri)
    old = {split: shard_documents(first.ref.uri, split, tok) for split in ("train", "val")}
    new = {split: shard_documents(second.ref.uri, split, tok) for split in ("train", "val")}
    assert old["val"] and old["train"], "the corpus needs both sides without a repair"
    for split in ("train", "val"):
        assert set(old[split]) <= set(new[split])
    added = [(corpus / name).read_text(encoding="utf-8") for name in _NEW_FILES]
    assert sorted(set(new["train"]) - set(old["train"]) | set(new["val"]) - set(old["val"])) == sorted(added)


@pytest.mark.slow  # a data stage in a child process, killed and rerun
def test_a_killed_run_resumes_from_its_finished_units(tmp_path, tokenizer_ref):
    corpus = synthetic_corpus(tmp_path / "corpus", 8_000_000, 40_000, seed=4)
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        _stage_command(store, corpus, tokenizer_ref),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    finished: list[Path] = []
    try:
        deadline = time.monotonic() + 300
        while len(finished) < 5 and proc.poll() is None and time.monotonic() < deadline:
            finished = list(store.glob("data/.work-*/checkpoints/units/unit_*.json"))
            time.sleep(0.02)
        assert proc.poll() is None, "the stage ended before it could be killed; give it a larger corpus"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not list(store.glob("data/*/manifest.json")), "a killed run must leave nothing marked finished"

    resumed = _data(store, corpus, tokenizer_ref)
    metrics = resumed.manifest.metrics
    assert metrics["units_reused"] >= len(finished) and metrics["units_reused"] < metrics["units"]
    assert not list(store.glob("data/.work-*")), "the work directory is gone once the artifact is published"
    uninterrupted = _data(tmp_path / "clean", corpus, tokenizer_ref)
    assert uninterrupted.manifest.metrics["units_reused"] == 0
    assert _contents(Path(resumed.ref.uri)) == _contents(Path(uninterrupted.ref.uri))


def test_tokenizer_samples_the_whole_corpus(tmp_path):
    """First half English prose, second half Cyrillic: a sample of the first files would miss the second."""
    english = ("the quick brown fox jumps over the lazy dog while the river runs past the old mill " * 40).strip()
    russian = ("съешь же ещё этих мягких французских булок да выпей чаю пока солнце светит над рекой " * 40).strip()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(200):
        text = english if i < 100 else russian
        (corpus / f"doc_{i:04d}.txt").write_text(f"{i} {text}\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in corpus.iterdir())
    cfg = micro_config(f"corpus.source={corpus}", f"tokenizer.train_bytes={total // 4}")
    result = run("tokenizer", cfg, tmp_path / "store")
    metrics = result.manifest.metrics
    assert metrics["seen_documents"] == 200 and metrics["seen_bytes"] == metrics["corpus_bytes"]
    assert metrics["train_bytes"] <= total // 4 and metrics["train_documents"] < 100
    tok = Tokenizer.load(result.ref.uri)
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    latin = [p for p in pieces if len(p.strip()) >= 3 and p.strip().isascii() and p.strip().isalpha()]
    cyrillic = [p for p in pieces if len(p.strip()) >= 3 and all("\u0400" <= c <= "\u04ff" for c in p.strip())]
    assert latin and cyrillic, (latin[:5], cyrillic[:5])
