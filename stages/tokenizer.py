"""Stage ``tokenizer``: train a SentencePiece model on the corpus (the class is ``stages.lm.tokenizer``).

Source code must survive a round trip byte for byte, so the trainer runs with the
``identity`` normalization (no NFKC, no whitespace squeezing), whitespace-only pieces (runs
of indentation become single tokens) and no dummy ``▁`` prefix. SentencePiece treats every
input string as one "sentence" and never learns a newline piece on its own, so documents are
fed line by line and ``"\\n"`` is a *user-defined symbol*: a reserved piece that always
encodes as its own single id. Nothing is remapped; ``decode`` gives the newline back as is.

The reserved ids are listed in ``stages/lm/tokenizer.py``.

Outputs: ``tokenizer.model`` (the SentencePiece proto), ``tokenizer.vocab`` (one ``piece\\tscore``
per line, pieces JSON-escaped so the newline piece stays on one line) and ``tokenizer.json``
(special ids and training settings).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from stages.core.errors import DataError
from stages.core.progress import byte_progress
from stages.core.sections import TokenizerConfig
from stages.core.stage import Output, Sections, Stage
from stages.core.tracking import Tracker
from stages.lm.tokenizer import (
    BOS_ID,
    EOS_ID,
    FORMAT,
    INFO_FILE,
    MODEL_FILE,
    NEWLINE,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    VOCAB_FILE,
    Tokenizer,
)
from stages.storage.corpus import CorpusStats, iter_documents, list_sources
from stages.storage.rss import PeakRSS

# SentencePiece drops training sentences longer than max_sentence_length bytes; long lines
# are cut into pieces of at most _LINE_CHARS characters (4 bytes each at worst) instead.
_MAX_SENTENCE_BYTES = 16384
_LINE_CHARS = 4000
# Compression is measured on at most this much held-out text (an even sample of it, by hash).
_HELDOUT_BYTES = 4_000_000
_PROGRESS_MIN_BYTES = 32 * 2**20

_TRAINER_SETTINGS = {
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "add_dummy_prefix": False,
    "split_by_whitespace": True,
}


# ------------------------------------------------------------------------------ training


def _unit_hash(text: str, salt: str) -> float:
    """A stable number in [0, 1) for a document: decides held-out membership and sampling order."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=salt.encode()).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_heldout(documents: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, heldout) by a content hash; with ``fraction > 0`` at least one document is held out
    when there are two or more, and at least one is always kept for training."""
    if fraction <= 0 or len(documents) < 2:
        return list(documents), []
    scores = [_unit_hash(doc, "heldout") for doc in documents]
    held = {i for i, s in enumerate(scores) if s < fraction}
    if not held:
        held = {min(range(len(documents)), key=scores.__getitem__)}
    if len(held) == len(documents):
        held.discard(max(range(len(documents)), key=scores.__getitem__))
    train = [d for i, d in enumerate(documents) if i not in held]
    return train, [documents[i] for i in sorted(held)]


def sample_for_training(documents: Sequence[str], budget: int) -> list[str]:
    """At most ``budget`` UTF-8 bytes of documents, picked in hash order so a capped sample spans
    the whole corpus rather than its alphabetical start."""
    order = sorted(range(len(documents)), key=lambda i: _unit_hash(documents[i], "train-sample"))
    chosen, used = [], 0
    for i in order:
        size = len(documents[i].encode("utf-8"))
        if used + size > budget:
            if used == 0:  # one huge document: take its start rather than nothing
                chosen.append(documents[i].encode("utf-8")[:budget].decode("utf-8", errors="ignore"))
            break
        chosen.append(documents[i])
        used += size
    return chosen


class HashSample:
    """The documents with the smallest hashes whose sizes fit in ``budget`` bytes, kept while streaming.

    Equal to ``sample_for_training`` on the whole list (the longest prefix of the hash order that
    fits), in memory bounded by the budget: a max-heap holds the chosen prefix; a document that
    pushes it over the budget evicts the largest hashes, and nothing hashing above an evicted
    document can ever enter again (a prefix that did not fit before cannot fit now).
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.heap: list[tuple[float, int, str, int]] = []  # (-score, -ordinal, text, size)
        self.used = 0
        self.limit: tuple[float, int] | None = None  # (score, ordinal) of the first eviction
        self.first: tuple[float, int, str] | None = None  # smallest-hash document, cut to the budget

    def offer(self, text: str, score: float, ordinal: int, size: int) -> None:
        if self.first is None or (score, ordinal) < self.first[:2]:
            cut = text if size <= self.budget else text.encode("utf-8")[: self.budget].decode("utf-8", errors="ignore")
            self.first = (score, ordinal, cut)
        if self.limit is not None and (score, ordinal) > self.limit:
            return
        heapq.heappush(self.heap, (-score, -ordinal, text, size))
        self.used += size
        while self.used > self.budget:
            negative, neg_ordinal, _, popped = heapq.heappop(self.heap)
            self.used -= popped
            self.limit = min(self.limit or (2.0, 0), (-negative, -neg_ordinal))

    def documents(self) -> list[str]:
        """The sample in hash order (as ``sample_for_training`` returns it)."""
        if not self.heap:
            return [self.first[2]] if self.first else []
        return [text for _, _, text, _ in sorted(self.heap, key=lambda item: (-item[0], -item[1]))]


def stream_sample(cfg: Sections) -> tuple[list[str], list[str], CorpusStats]:
    """(training sample, held-out documents, stats) in one streaming pass over the whole corpus.

    Held-out membership is ``split_heldout``'s content hash; the training sample is
    ``sample_for_training``'s hash order over the rest, so it is spread evenly over the corpus
    however large. Only the sample and ``_HELDOUT_BYTES`` of held-out text are held in memory.
    A corpus so small that the hash holds out none (or all) of it gets a second pass with
    ``split_heldout``'s fallback applied.
    """
    fraction = cfg.tokenizer.heldout_fraction
    force_held = force_train = None
    while True:
        stats = CorpusStats(source=cfg.corpus.source)
        train, held = HashSample(cfg.tokenizer.train_bytes), HashSample(_HELDOUT_BYTES)
        held_count = 0
        lowest = highest = None  # (heldout score, ordinal)
        total = sum(source.size for source in list_sources(cfg.corpus))
        bar = byte_progress(total, "tokenizer sample", min_bytes=_PROGRESS_MIN_BYTES)
        for ordinal, doc in enumerate(iter_documents(cfg.corpus, stats)):
            size = len(doc.encode("utf-8"))
            bar.update(size)
            held_score = _unit_hash(doc, "heldout") if fraction > 0 else 1.0
            lowest = (held_score, ordinal) if lowest is None or held_score < lowest[0] else lowest
            highest = (held_score, ordinal) if highest is None or held_score > highest[0] else highest
            is_held = held_score < fraction
            if ordinal == force_held:
                is_held = True
            elif ordinal == force_train:
                is_held = False
            if is_held:
                held_count += 1
                held.offer(doc, held_score, ordinal, size)
            else:
                train.offer(doc, _unit_hash(doc, "train-sample"), ordinal, size)
        bar.close()
        documents = stats.documents
        if fraction <= 0 or force_held is not None or force_train is not None:
            break
        if documents < 2:  # one document: nothing is held out
            if not held_count:
                break
            force_train = 0
        elif held_count == 0:
            force_held = lowest[1]
        elif held_count == documents:
            force_train = highest[1]
        else:
            break
    heldout = held.documents() if held.heap else []
    return train.documents(), heldout, stats


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Documents as SentencePiece sentences: one per non-empty line, long lines cut in pieces."""
    for doc in documents:
        for line in doc.split(NEWLINE):
            for start in range(0, len(line), _LINE_CHARS):
                yield line[start : start + _LINE_CHARS]


def _explain_trainer_error(message: str, cfg: TokenizerConfig, train_bytes: int) -> str:
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
    if too_high:
        return (
            f"tokenizer.vocab_size={cfg.vocab_size} is too large for {train_bytes:,} bytes of training text "
            f"(it supports at most {too_high.group(2)}); set tokenizer.vocab_size lower or give corpus.source more text"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return (
            f"tokenizer.vocab_size={cfg.vocab_size} cannot hold the corpus's {too_low.group(2)} required characters "
            f"and reserved pieces; raise tokenizer.vocab_size or lower tokenizer.character_coverage (now {cfg.character_coverage})"
        )
    return f"SentencePiece training failed on {train_bytes:,} bytes: {message.splitlines()[0]}"


def train_model(documents: Sequence[str], cfg: TokenizerConfig) -> bytes:
    """Train on ``documents`` and return the serialized SentencePiece model."""
    train_bytes = sum(len(d.encode("utf-8")) for d in documents)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(documents),
            model_writer=model,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            split_digits=cfg.split_digits,
            user_defined_symbols=[*SPECIAL_TOKENS, NEWLINE],
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            pad_piece="<pad>",
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=cfg.threads,
            minloglevel=2,  # SentencePiece's INFO log is thousands of lines on stderr
            **_TRAINER_SETTINGS,
        )
    except RuntimeError as exc:
        raise DataError(_explain_trainer_error(str(exc), cfg, train_bytes)) from None
    return model.getvalue()


def write_artifact(tokenizer: Tokenizer, cfg: TokenizerConfig, out: Path) -> None:
    (out / MODEL_FILE).write_bytes(tokenizer.model_proto)
    processor = tokenizer.processor
    with open(out / VOCAB_FILE, "w", encoding="utf-8") as handle:
        for i in range(tokenizer.vocab_size):
            piece = json.dumps(processor.id_to_piece(i), ensure_ascii=False)[1:-1]
            handle.write(f"{piece}\t{processor.get_score(i):g}\n")
    info = {
        "format": FORMAT,
        "vocab_size": tokenizer.vocab_size,
        "unk_id": tokenizer.unk_id,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "newline_id": tokenizer.newline_id,
        "special": tokenizer.special,
        "model_type": cfg.model_type,
        "byte_fallback": cfg.byte_fallback,
        "split_digits": cfg.split_digits,
        "character_coverage": cfg.character_coverage,
        "trainer_settings": _TRAINER_SETTINGS,
        "vocab_file_format": "piece<TAB>score per line, piece JSON-escaped without quotes",
        "sentencepiece_version": spm.__version__,
    }
    tokenizer.info = info
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
        "read_mb_per_second": round(stats.bytes / 1e6 / max(read_seconds, 1e-9), 3),
        "peak_rss_mb": peak.megabytes,
        **measured,
        **stats.as_metrics(),
    }
    return metrics  # the runner records these in the manifest; flows log them to MLflow


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
