"""Stage ``data``: corpus -> train/val token shards in the format of ``stages/storage/shards.py``.

Documents go to ``train`` or ``val`` by a hash of (seed, document text), so the split does not
depend on file order and duplicate documents never straddle it. Each document is written as
its token ids followed by the EOS id, which separates documents in the flat stream.

The corpus is streamed in work units (``stages/storage/units.py``): each unit reads its own
pieces of the source, splits and tokenizes its documents a chunk at a time, and writes its own
shard files; ``shards.json`` lists them in unit order, so each split's token stream is exactly
that of reading the corpus front to back, whatever the worker count, executor or the order
units finish in. Units run in a pool of ``data.workers`` processes or on a Dask cluster
(``stages/storage/executors.py``), a few per worker at a time, so memory is bounded by the unit
size, not the corpus. Finished units are kept in the work directory: a killed run, rerun,
redoes only the others.

``write_splits`` is the in-memory path for a list of documents (tests, small tools).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import sentencepiece as spm

from stages.core.errors import DataError
from stages.core.progress import byte_progress, progress_bar
from stages.core.sections import CorpusConfig
from stages.core.stage import Output, Sections, Stage
from stages.core.tracking import Tracker
from stages.lm.tokenizer import Tokenizer
from stages.storage.artifacts import CHECKPOINTS
from stages.storage.corpus import CorpusStats, empty_message, list_sources, read_pieces
from stages.storage.executors import resolve_workers, run_tasks, start_method
from stages.storage.rss import PeakRSS
from stages.storage.shards import INDEX, ShardWriter, dtype_for
from stages.storage.units import (
    Unit,
    UnitDirectory,
    apply_cap,
    plan_units,
    unit_signature,
)

log = logging.getLogger("gptpipe.data")

SPLITS = ("train", "val")

_CHUNK_CHARS = 256_000  # text per worker task: big enough to amortize IPC, small enough to balance
_PROGRESS_MIN_DOCS = 2000  # below this a progress bar is noise

_worker_processor: spm.SentencePieceProcessor | None = None


def _too_few_message(count: int) -> str:
    return (
        f"the corpus has {count} document(s); a train/val split needs at least 2 — "
        "add documents to corpus.source (each file or JSONL record is one document)"
    )


def split_documents(documents: Sequence[str], val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Indices of the documents in each split; both splits hold at least one document."""
    if len(documents) < 2:
        raise DataError(_too_few_message(len(documents)))
    key = seed.to_bytes(8, "little", signed=True)
    scores = [
        int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8, key=key).digest(), "little") / 2**64
        for doc in documents
    ]
    val = [i for i, s in enumerate(scores) if s < val_fraction]
    if not val:  # a small corpus: still validate on something
        val = [min(range(len(documents)), key=scores.__getitem__)]
    if len(val) == len(documents):
        val.remove(max(val, key=scores.__getitem__))
    chosen = set(val)
    return {"train": [i for i in range(len(documents)) if i not in chosen], "val": val}


def _chunks(documents: Sequence[str], indices: Sequence[int], chunk_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for i in indices:
        chunk.append(documents[i])
        size += len(documents[i])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_with(processor: spm.SentencePieceProcessor, texts: list[str], eos_id: int, dtype: str) -> np.ndarray:
    """One flat array: each document's ids followed by ``eos_id``.

    Ids come back from SentencePiece as numpy arrays where it can (no Python int per token:
    about 1.5x faster than lists on a 2-core machine), else as lists.
    """
    try:
        encoded = processor.encode(texts, return_type="numpy")
    except (ValueError, TypeError):  # an older sentencepiece without numpy output
        encoded = processor.encode(texts)
    flat = np.empty(sum(len(ids) for ids in encoded) + len(encoded), dtype=dtype)
    at = 0
    for ids in encoded:
        flat[at : at + len(ids)] = ids
        at += len(ids)
        flat[at] = eos_id
        at += 1
    return flat


def _start_method() -> str:  # kept for the in-memory path; one definition in executors
    return start_method()


def _init_worker(model_proto: bytes) -> None:
    global _worker_processor
    _worker_processor = spm.SentencePieceProcessor(model_proto=model_proto)


def _encode_in_worker(texts: list[str], eos_id: int, dtype: str) -> np.ndarray:
    assert _worker_processor is not None, "worker initializer did not run"
    return _encode_with(_worker_processor, texts, eos_id, dtype)


class _Encoder:
    """Maps chunks of documents to flat id arrays, in order, in-process or in a process pool."""

    def __init__(self, tokenizer: Tokenizer, workers: int, dtype: np.dtype):
        self.tokenizer, self.workers, self.dtype = tokenizer, workers, np.dtype(dtype).name
        self.pool: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:  # started on first need: a one-chunk corpus never pays for processes
            self.pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context(_start_method()),
                initializer=_init_worker,
                initargs=(self.tokenizer.model_proto,),
            )
        return self.pool

    def map(self, chunks: list[list[str]]) -> Iterator[tuple[int, np.ndarray]]:
        eos = self.tokenizer.eos_id
        if self.workers == 1 or len(chunks) < 2:
            return ((len(c), _encode_with(self.tokenizer.processor, c, eos, self.dtype)) for c in chunks)
        results = self._pool().map(_encode_in_worker, chunks, [eos] * len(chunks), [self.dtype] * len(chunks))
        return zip((len(c) for c in chunks), results)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def write_splits(
    documents: Sequence[str],
    splits: dict[str, list[int]],
    tokenizer: Tokenizer,
    out: Path,
    workers: int,
    shard_tokens: int,
    chunk_chars: int = _CHUNK_CHARS,
) -> dict:
    """Tokenize every split into shard files under ``out``; return the ``shards.json`` index."""
    dtype = dtype_for(tokenizer.vocab_size)
    index: dict = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "splits": {}}
    encoder = _Encoder(tokenizer, workers, dtype)
    bar = progress_bar(
        total=len(documents),
        desc="tokenize",
        unit="doc",
        file=sys.stderr,
        disable=len(documents) <= _PROGRESS_MIN_DOCS,
        leave=False,
    )
    try:
        for split in SPLITS:
            writer = ShardWriter(out, split, dtype, shard_tokens)
            try:
                for count, ids in encoder.map(list(_chunks(documents, splits[split], chunk_chars))):
                    writer.write(ids)
                    bar.update(count)
            finally:
                writer.close()
            index["splits"][split] = {
                "files": writer.files,
                "tokens": writer.tokens,
                "documents": len(splits[split]),
                "bytes": sum(len(documents[i].encode("utf-8")) for i in splits[split]),
            }
    finally:
        bar.close()
        encoder.close()
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


# ------------------------------------------------------------------ the streaming path: work units

_UNIT_PROCESSORS: dict[str, spm.SentencePieceProcessor] = {}  # per worker process: loaded once per model
_PROGRESS_MIN_BYTES = 32 * 2**20  # below this a progress bar is noise


def _unit_processor(model_proto: bytes) -> spm.SentencePieceProcessor:
    digest = hashlib.sha256(model_proto).hexdigest()
    if digest not in _UNIT_PROCESSORS:
        # One thread per process: the parallelism is the units, across processes or machines.
        _UNIT_PROCESSORS.clear()
        _UNIT_PROCESSORS[digest] = spm.SentencePieceProcessor(model_proto=model_proto, num_threads=1)
    return _UNIT_PROCESSORS[digest]


def _split_score(text: str, key: bytes) -> float:
    """The same number ``split_documents`` uses: val when below ``val_fraction``."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest(), "little") / 2**64


def process_unit(unit: Unit, corpus: CorpusConfig, settings: dict, model_proto: bytes, work_location: str) -> dict:
    """Read, split, tokenize and write one unit; return (and store) its result.

    Runs in a worker process or on a Dask worker, so it takes only plain, picklable values and
    reaches the corpus and the unit directory by location. A unit already finished under the
    same signature is not redone: its stored result comes back marked ``reused``.
    """
    work = UnitDirectory(work_location)
    signature = unit_signature(unit, settings)
    result_name = f"{unit.name}-{signature}.json"
    found = work.result(result_name)
    if found is not None:
        return {**found, "reused": True}

    started = time.perf_counter()
    processor = _unit_processor(model_proto)
    dtype, eos = np.dtype(settings["dtype"]), int(settings["eos_id"])
    if work.remote:
        scratch = Path(tempfile.mkdtemp(prefix=f"gptpipe-{unit.name}-"))
    else:
        scratch = Path(work_location) / f".{unit.name}.tmp-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
    try:
        writers = {
            s: ShardWriter(scratch, s, dtype, settings["shard_tokens"], prefix=f"{s}_{unit.index:06d}") for s in SPLITS
        }
        pending: dict[str, list[str]] = {s: [] for s in SPLITS}
        pending_chars = dict.fromkeys(SPLITS, 0)
        counts = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
        key = int(settings["seed"]).to_bytes(8, "little", signed=True)
        lowest = highest = None  # (score, ordinal): candidates for the split's "never empty" fallback

        def flush(split: str) -> None:
            if pending[split]:
                writers[split].write(_encode_with(processor, pending[split], eos, dtype.name))
                pending[split], pending_chars[split] = [], 0

        stats = CorpusStats(source=corpus.source)
        for ordinal, doc in enumerate(read_pieces(unit.pieces, corpus, stats, unit.budget)):
            score = _split_score(doc, key)
            if lowest is None or score < lowest[0]:
                lowest = (score, ordinal)
            if highest is None or score > highest[0]:
                highest = (score, ordinal)
            split = "val" if score < settings["val_fraction"] else "train"
            if ordinal == settings.get("force_val"):
                split = "val"
            elif ordinal == settings.get("force_train"):
                split = "train"
            pending[split].append(doc)
            pending_chars[split] += len(doc)
            counts[split]["documents"] += 1
            counts[split]["bytes"] += len(doc.encode("utf-8"))
            if pending_chars[split] >= _CHUNK_CHARS:
                flush(split)
        for split in SPLITS:
            flush(split)
            writers[split].close()
        result = {
            "unit": unit.index,
            "signature": signature,
            "source_bytes": unit.size,
            "splits": {s: {"files": writers[s].files, "tokens": writers[s].tokens, **counts[s]} for s in SPLITS},
            "stats": asdict(stats),
            "lowest": lowest,
            "highest": highest,
            "seconds": round(time.perf_counter() - started, 3),
        }
        work.publish({name: scratch / name for s in SPLITS for name in writers[s].files}, result_name, result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**result, "reused": False}


def _work_location(cfg: Sections, out: Path, work: str) -> str:
    """Where units are kept: beside an s3:// store for Dask (remote workers reach only the store),
    else in the stage's work directory under ``checkpoints/`` (kept across attempts)."""
    if cfg.data.executor == "dask" and work.startswith("s3://"):
        return work
    return str(out / CHECKPOINTS / "units")


def _merge_stats(results: list[dict], source: str) -> CorpusStats:
    total = CorpusStats(source=source)
    for result in results:
        for name, value in result["stats"].items():
            if name == "capped":
                total.capped = total.capped or bool(value)
            elif name != "source":
                setattr(total, name, getattr(total, name) + int(value))
    return total


def _fallback(results: list[dict]) -> tuple[int, dict] | None:
    """The unit to redo, and how, when a split came out empty (mirrors ``split_documents``)."""
    val = sum(r["splits"]["val"]["documents"] for r in results)
    train = sum(r["splits"]["train"]["documents"] for r in results)
    if val == 0:  # a small corpus: still validate on something (the lowest score goes to val)
        best = min((r for r in results if r["lowest"]), key=lambda r: r["lowest"][0])
        return best["unit"], {"force_val": best["lowest"][1]}
    if train == 0:
        best = max((r for r in results if r["highest"]), key=lambda r: r["highest"][0])
        return best["unit"], {"force_train": best["highest"][1]}
    return None


def run(cfg: Sections, inputs: dict[str, Path], out: Path, tracker: Tracker, work: str = "") -> dict:
    tokenizer = Tokenizer.load(inputs["tokenizer"])
    workers = 1 if cfg.data.executor == "dask" else resolve_workers(cfg.data.workers)
    with PeakRSS() as peak:
        started = time.perf_counter()
        sources = list_sources(cfg.corpus)
        units = apply_cap(plan_units(cfg.corpus, cfg.data.unit_bytes, sources), cfg.corpus)
        plan_seconds = time.perf_counter() - started
        work = UnitDirectory(_work_location(cfg, out, work))
        settings = {
            "seed": cfg.data.seed,
            "val_fraction": cfg.data.val_fraction,
            "shard_tokens": cfg.data.shard_tokens,
            "dtype": dtype_for(tokenizer.vocab_size).name,
            "eos_id": tokenizer.eos_id,
            "tokenizer": hashlib.sha256(tokenizer.model_proto).hexdigest()[:16],
            "corpus": cfg.corpus.model_dump(mode="json"),
        }
        results: dict[int, dict] = {}
        total_bytes = sum(unit.size for unit in units)
        bar = byte_progress(total_bytes, "data", min_bytes=_PROGRESS_MIN_BYTES)
        tokens_done = 0

        def finished(result: dict) -> None:
            nonlocal tokens_done
            results[result["unit"]] = result
            tokens_done += sum(s["tokens"] for s in result["splits"].values())
            bar.update(result["source_bytes"])
            bar.set_postfix(
                tokens_per_s=f"{tokens_done / max(time.perf_counter() - started, 1e-9):,.0f}", refresh=False
            )

        def tasks(chosen: list[Unit], extra: dict) -> list[tuple]:
            return [(unit, cfg.corpus, {**settings, **extra}, tokenizer.model_proto, work.location) for unit in chosen]

        started = time.perf_counter()
        try:
            run_tasks(
                process_unit,
                tasks(units, {}),
                finished,
                executor=cfg.data.executor,
                workers=workers,
                scheduler=cfg.data.dask_scheduler,
            )
        finally:
            bar.close()
        reused = sum(bool(r.get("reused")) for r in results.values())
        if reused:
            log.info("data: reused %d of %d finished unit(s) from an earlier attempt", reused, len(units))
        ordered = [results[unit.index] for unit in units]
        stats = _merge_stats(ordered, cfg.corpus.source)
        if stats.documents == 0:
            raise DataError(empty_message(cfg.corpus, len(sources), stats))
        if stats.documents < 2:
            raise DataError(_too_few_message(stats.documents))
        redo = _fallback(ordered)
        if redo is not None:
            index, extra = redo
            position = next(i for i, unit in enumerate(units) if unit.index == index)
            run_tasks(process_unit, tasks([units[position]], extra), finished, workers=1)
            ordered[position] = results[index]
        index = _assemble(ordered, work, out, tokenizer)
        tokenize_seconds = time.perf_counter() - started
    if not work.remote:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)

    train, val = index["splits"]["train"], index["splits"]["val"]
    tokens = train["tokens"] + val["tokens"]
    seconds = plan_seconds + tokenize_seconds
    return {
        "train_tokens": train["tokens"],
        "val_tokens": val["tokens"],
        "train_documents": train["documents"],
        "val_documents": val["documents"],
        "train_bytes": train["bytes"],
        "val_bytes": val["bytes"],
        "train_files": len(train["files"]),
        "dtype": index["dtype"],
        "vocab_size": index["vocab_size"],
        "bytes_per_token": round((train["bytes"] + val["bytes"]) / max(tokens, 1), 4),
        "read_seconds": round(plan_seconds, 3),
        "tokenize_seconds": round(tokenize_seconds, 3),
        "tokens_per_second": round(tokens / max(tokenize_seconds, 1e-9)),
        "source_bytes": total_bytes,
        "mb_per_second": round(total_bytes / 1e6 / max(seconds, 1e-9), 3),
        "units": len(units),
        "units_reused": reused,
        "workers": workers,
        "executor": cfg.data.executor,
        "peak_rss_mb": peak.megabytes,
        **stats.as_metrics(),
    }


def _assemble(results: list[dict], work: UnitDirectory, out: Path, tokenizer: Tokenizer) -> dict:
    """Unit files into the artifact, in unit order, and ``shards.json`` listing them."""
    index: dict = {
        "dtype": dtype_for(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "splits": {},
    }
    for split in SPLITS:
        files: list[str] = []
        for result in results:
            for name in result["splits"][split]["files"]:
                work.fetch(name, out / name)
                files.append(name)
        index["splits"][split] = {
            "files": files,
            "tokens": sum(r["splits"][split]["tokens"] for r in results),
            "documents": sum(r["splits"][split]["documents"] for r in results),
            "bytes": sum(r["splits"][split]["bytes"] for r in results),
        }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    work.clear()
    return index


STAGE = Stage(
    name="data",
    summary="corpus to memory-mapped token shards, train/val split",
    sections=("corpus", "data"),
    inputs=("tokenizer",),
    outputs=(Output(INDEX, "the shard files of each split, dtype, vocabulary size, EOS id"),),
    run=run,
    headline=("train_tokens", "val_tokens"),
    keeps_work=True,
)
