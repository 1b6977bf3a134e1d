"""A work unit's shard files: reading, splitting and tokenizing one unit, and the units' files
assembled, in unit order, into one data artifact (the format of ``stages/storage/shards.py``).

``process_unit`` runs in a worker process or on a Dask worker: it takes only plain, picklable
values and reaches the corpus and the ``UnitDirectory`` by location. Each unit writes its own
``<split>_<unit>_<part>.bin`` files, so units can finish in any order; ``assemble`` lists them in
unit order, which makes each split's token stream that of reading the corpus front to back.
Documents go to a split by ``stages/storage/splits.py``'s rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import sentencepiece as spm

from stages.lm.tokenizer import Tokenizer
from stages.storage.corpus import CorpusReading, CorpusStats, read_pieces
from stages.storage.earlier_units import UNITS, unit_entry
from stages.storage.shards import INDEX, ShardWriter, dtype_for
from stages.storage.splits import SPLITS, SplitRule, Tally
from stages.storage.units import Unit, UnitDirectory, unit_key

_CHUNK_CHARS = 256_000  # text encoded per call: big enough to amortize the call, small enough for memory

_UNIT_PROCESSORS: dict[str, spm.SentencePieceProcessor] = {}  # per worker process: loaded once per model


def _unit_processor(model_proto: bytes) -> spm.SentencePieceProcessor:
    digest = hashlib.sha256(model_proto).hexdigest()
    if digest not in _UNIT_PROCESSORS:
        # One thread per process: the parallelism is the units, across processes or machines.
        _UNIT_PROCESSORS.clear()
        _UNIT_PROCESSORS[digest] = spm.SentencePieceProcessor(model_proto=model_proto, num_threads=1)
    return _UNIT_PROCESSORS[digest]


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


def process_unit(unit: Unit, corpus: CorpusReading, settings: dict, model_proto: bytes, work_location: str) -> dict:
    """Read, split, tokenize and write one unit; return (and store) its result.

    ``settings`` holds the split's ``seed`` and ``val_fraction``, ``shard_tokens``, ``dtype`` and
    ``eos_id``, the tokenizer's and the code's digests (and, for a unit read again by
    ``SplitRule.repair``, its ``force``): with the unit's pieces they make its key (``unit_key``).
    A unit this attempt already finished under the same key is not redone: its stored result
    comes back marked ``reused``.
    """
    work = UnitDirectory(work_location)
    key = unit_key(unit, settings)
    result_name = f"{unit.name}-{key}.json"
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
        rule = SplitRule.seeded(settings["seed"], settings["val_fraction"])
        tally = Tally()

        def flush(split: str) -> None:
            if pending[split]:
                writers[split].write(_encode_with(processor, pending[split], eos, dtype.name))
                pending[split], pending_chars[split] = [], 0

        stats = CorpusStats(source=corpus.source)
        for ordinal, doc in enumerate(read_pieces(unit.pieces, corpus, stats, unit.budget)):
            score = rule.score(doc)
            split = rule.split(score, ordinal, settings.get("force"))
            tally.add(score, ordinal, split)
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
            "key": key,
            "source_bytes": unit.size,
            "splits": {s: {"files": writers[s].files, "tokens": writers[s].tokens, **counts[s]} for s in SPLITS},
            "stats": asdict(stats),
            "tally": asdict(tally),
            "seconds": round(time.perf_counter() - started, 3),
        }
        work.publish({name: scratch / name for s in SPLITS for name in writers[s].files}, result_name, result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**result, "reused": False}


def merge_stats(results: list[dict], source: str) -> CorpusStats:
    """The corpus stats of all units together."""
    total = CorpusStats(source=source)
    for result in results:
        for name, value in result["stats"].items():
            if name == "capped":
                total.capped = total.capped or bool(value)
            elif name != "source":
                setattr(total, name, getattr(total, name) + int(value))
    return total


def tallies(results: list[dict]) -> list[Tally]:
    """Each unit's ``Tally``, in the order of ``results``, for ``SplitRule.repair``."""
    return [Tally(**result["tally"]) for result in results]


def assemble(results: list[dict], work: UnitDirectory, out: Path, tokenizer: Tokenizer) -> dict:
    """Unit files into the artifact, in unit order, ``shards.json`` listing them and ``units.json``
    listing each unit's key and files (what a later run reuses). A unit taken from an earlier
    output (``placed``) has its files in ``out`` already."""
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
                if not result.get("placed"):
                    work.fetch(name, out / name)
                files.append(name)
        index["splits"][split] = {
            "files": files,
            "tokens": sum(r["splits"][split]["tokens"] for r in results),
            "documents": sum(r["splits"][split]["documents"] for r in results),
            "bytes": sum(r["splits"][split]["bytes"] for r in results),
        }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    listed = {"units": [unit_entry(result) for result in results]}
    (out / UNITS).write_text(json.dumps(listed, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    work.clear()
    return index
