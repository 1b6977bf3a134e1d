"""Stage ``tokenizer``: train a SentencePiece model on the corpus.

The corpus is streamed once: an even sample of it (by content hash, ``stages/storage/sampling.py``)
is what SentencePiece trains on, and a held-out share (``stages/storage/splits.py``'s rule)
measures compression. How the model is trained so that source code round-trips byte for byte,
and the artifact's files, are in ``stages/lm/tokenizer_training.py``; the class that loads it
and the reserved ids are in ``stages/lm/tokenizer.py``.

Outputs: ``tokenizer.model``, ``tokenizer.vocab`` and ``tokenizer.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.core.progress import byte_progress
from stages.core.stage import Output, Sections, Stage
from stages.core.tracking import Tracker
from stages.lm.tokenizer import INFO_FILE, MODEL_FILE, VOCAB_FILE, Tokenizer
from stages.lm.tokenizer_training import train_model, write_artifact
from stages.storage.corpus import CorpusStats, iter_documents, list_sources
from stages.storage.rss import PeakRSS
from stages.storage.sampling import HashSample, sample_for_training, sample_score
from stages.storage.splits import SplitRule, Tally

# Compression is measured on at most this much held-out text (an even sample of it, by hash).
_HELDOUT_BYTES = 4_000_000
HELDOUT_KEY = b"heldout"  # the split rule's key for held-out documents (the data stage keys by its seed)
_PROGRESS_MIN_BYTES = 32 * 2**20


def stream_sample(cfg: Sections) -> tuple[list[str], list[str], CorpusStats]:
    """(training sample, held-out documents, stats) in one streaming pass over the whole corpus.

    Held-out membership is ``stages/storage/splits.py``'s rule keyed by ``"heldout"``; the training
    sample is a ``HashSample`` of the rest, so it is spread evenly over the corpus however large.
    Only the sample and ``_HELDOUT_BYTES`` of held-out text are held in memory. A corpus so small
    that the hash holds out none (or all) of it gets a second pass with the rule's repair applied.
    """
    rule = SplitRule(HELDOUT_KEY, cfg.tokenizer.heldout_fraction)
    force: dict[str, int] = {}
    while True:
        stats = CorpusStats(source=cfg.corpus.source)
        train, held = HashSample(cfg.tokenizer.train_bytes), HashSample(_HELDOUT_BYTES)
        tally = Tally()
        total = sum(source.size for source in list_sources(cfg.corpus))
        bar = byte_progress(total, "tokenizer sample", min_bytes=_PROGRESS_MIN_BYTES)
        for ordinal, doc in enumerate(iter_documents(cfg.corpus, stats)):
            size = len(doc.encode("utf-8"))
            bar.update(size)
            score = rule.score(doc)
            split = rule.split(score, ordinal, force)
            tally.add(score, ordinal, split)
            if split == "val":
                held.offer(doc, score, ordinal, size)
            else:
                train.offer(doc, sample_score(doc), ordinal, size)
        bar.close()
        redo = None if force else rule.repair([tally])
        if redo is None:
            break
        force = redo[1]
    heldout = held.documents() if held.heap else []
    return train.documents(), heldout, stats


def compression(tokenizer: Tokenizer, documents: Sequence[str]) -> dict[str, Any]:
    """Bytes and characters per token on ``documents``, and how many fail to round-trip exactly."""
    encoded = tokenizer.encode_batch(documents)
    tokens = sum(len(ids) for ids in encoded)
    num_bytes = sum(len(d.encode("utf-8")) for d in documents)
    chars = sum(len(d) for d in documents)
    failures = sum(tokenizer.decode(ids, keep_special=True) != d for ids, d in zip(encoded, documents))
    return {
        "bytes_per_token": round(num_bytes / max(tokens, 1), 4),
        "chars_per_token": round(chars / max(tokens, 1), 4),
        "eval_tokens": tokens,
        "eval_bytes": num_bytes,
        "roundtrip_failures": failures,
    }


def run(cfg: Sections, inputs: dict[str, Path], out: Path, tracker: Tracker) -> dict:
    started = time.perf_counter()
    with PeakRSS() as peak:
        sample, heldout, stats = stream_sample(cfg)
        read_seconds = time.perf_counter() - started

        started = time.perf_counter()
        tokenizer = Tokenizer(train_model(sample, cfg.tokenizer))
        train_seconds = time.perf_counter() - started
        write_artifact(tokenizer, cfg.tokenizer, out)

        # With no held-out documents, compression is measured on (a slice of) the training text.
        evaluated = heldout or sample_for_training(sample, 500_000)
        measured = compression(tokenizer, evaluated)
    sample_bytes = sum(len(d.encode("utf-8")) for d in sample)
    metrics = {
        "vocab_size": tokenizer.vocab_size,
        "model_type": cfg.tokenizer.model_type,
        "train_seconds": round(train_seconds, 3),
        "read_seconds": round(read_seconds, 3),
        "train_documents": len(sample),
        "train_bytes": sample_bytes,
        "heldout_documents": len(heldout),
        "compression_measured_on": "heldout" if heldout else "train",
        # The sample against what was streamed: how much of the whole corpus the tokenizer saw.
        "seen_documents": stats.documents,
        "seen_bytes": stats.bytes,
        "sampled_fraction": round(sample_bytes / max(stats.bytes, 1), 4),
        "read_mb_per_s": round(stats.bytes / 1e6 / max(read_seconds, 1e-9), 3),
        "peak_rss_mb": peak.megabytes,
        **measured,
        **stats.as_metrics(),
    }
    return metrics  # the executor records these in the manifest and logs them to MLflow


STAGE = Stage(
    name="tokenizer",
    summary="SentencePiece model trained on the corpus",
    sections=("corpus", "tokenizer"),
    inputs=(),
    outputs=(
        Output(MODEL_FILE, "the SentencePiece model proto"),
        Output(VOCAB_FILE, "one piece and score per line"),
        Output(INFO_FILE, "special ids and training settings"),
    ),
    run=run,
    headline=("vocab_size", "bytes_per_token"),
)
