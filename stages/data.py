"""Stage ``data``: corpus -> train/val token shards in the format of ``stages/storage/shards.py``.

Documents go to ``train`` or ``val`` by a hash of (seed, document text), so the split does not
depend on file order and duplicate documents never straddle it. Each document is written as
its token ids followed by the EOS id, which separates documents in the flat stream.

Tokenizing runs in ``data.workers`` processes (``workers == 1``: in this process). Each worker
loads the model once from its serialized bytes; documents travel in chunks and come back as
one flat id array per chunk, already in the shard dtype.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import sentencepiece as spm

from stages.core.config import PipelineConfig
from stages.storage.corpus import read_corpus
from stages.core.errors import DataError
from stages.core.progress import progress_bar
from stages.storage.shards import INDEX, ShardWriter, dtype_for
from stages.lm.tokenizer import Tokenizer
from stages.core.tracking import Tracker

SPLITS = ("train", "val")

_CHUNK_CHARS = 256_000  # text per worker task: big enough to amortize IPC, small enough to balance
_PROGRESS_MIN_DOCS = 2000  # below this a progress bar is noise

_worker_processor: spm.SentencePieceProcessor | None = None


def split_documents(documents: Sequence[str], val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Indices of the documents in each split; both splits hold at least one document."""
    if len(documents) < 2:
        raise DataError(
            f"the corpus has {len(documents)} document(s); a train/val split needs at least 2 — "
            "add documents to corpus.source (each file or JSONL record is one document)"
        )
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
    """One flat array: each document's ids followed by ``eos_id``."""
    encoded = processor.encode(texts)
    flat = np.empty(sum(len(ids) for ids in encoded) + len(encoded), dtype=dtype)
    at = 0
    for ids in encoded:
        flat[at : at + len(ids)] = ids
        at += len(ids)
        flat[at] = eos_id
        at += 1
    return flat


def _start_method() -> str:
    """'fork' when this process runs one thread, else 'spawn'.

    Forking a process whose other threads hold locks (Prefect's task runner, MLflow's
    loggers) can deadlock the child, so a threaded host gets 'spawn'. But 'spawn' re-imports
    the caller's ``__main__``, which breaks a plain script without an ``if __name__ ==
    "__main__":`` guard; a single-threaded caller is safe to fork, so it gets 'fork'.
    """
    # tqdm's monitor thread only wakes every few seconds to read bar timings; the workers
    # never touch tqdm, so it does not make forking unsafe.
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and t.name != "tqdm_monitor"]
    if not others and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


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
    documents: Sequence[str], splits: dict[str, list[int]], tokenizer: Tokenizer, out: Path,
    workers: int, shard_tokens: int, chunk_chars: int = _CHUNK_CHARS,
) -> dict:
    """Tokenize every split into shard files under ``out``; return the ``shards.json`` index."""
    dtype = dtype_for(tokenizer.vocab_size)
    index: dict = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "splits": {}}
    encoder = _Encoder(tokenizer, workers, dtype)
    bar = progress_bar(
        total=len(documents), desc="tokenize", unit="doc", file=sys.stderr,
        disable=len(documents) <= _PROGRESS_MIN_DOCS, leave=False,
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


def run(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, tracker: Tracker) -> dict:
    started = time.perf_counter()
    tokenizer = Tokenizer.load(inputs["tokenizer"])
    corpus = read_corpus(cfg.corpus)
    splits = split_documents(corpus.documents, cfg.data.val_fraction, cfg.data.seed)
    read_seconds = time.perf_counter() - started

    started = time.perf_counter()
    index = write_splits(corpus.documents, splits, tokenizer, out, cfg.data.workers, cfg.data.shard_tokens)
    tokenize_seconds = time.perf_counter() - started

    train, val = index["splits"]["train"], index["splits"]["val"]
    tokens = train["tokens"] + val["tokens"]
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
        "read_seconds": round(read_seconds, 3),
        "tokenize_seconds": round(tokenize_seconds, 3),
        "tokens_per_second": round(tokens / max(tokenize_seconds, 1e-9)),
        "workers": cfg.data.workers,
        **corpus.stats.as_metrics(),
    }
