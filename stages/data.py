"""Stage ``data``: corpus -> train/val token shards in the format of ``stages/storage/shards.py``.

Documents go to ``train`` or ``val`` by a hash of (seed, document text) (``stages/storage/splits.py``),
so the split does not depend on file order and duplicate documents never straddle it. Each
document is written as its token ids followed by the EOS id, which separates documents in the
flat stream.

The corpus is streamed in work units (``stages/storage/units.py``): each unit reads its own
pieces of the source, splits and tokenizes its documents a chunk at a time, and writes its own
shard files (``stages/storage/unit_shards.py``); ``shards.json`` lists them in unit order, so each
split's token stream is exactly that of reading the corpus front to back, whatever the worker
count, executor or the order units finish in. Units run in a pool of ``data.workers`` processes
or on a Dask cluster (``stages/storage/executors.py``), a few per worker at a time, so memory is
bounded by the unit size, not the corpus. Finished units are kept in the work directory: a
killed run, rerun, redoes only the others.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from stages.core.errors import DataError
from stages.core.progress import byte_progress
from stages.core.stage import Output, Sections, Stage
from stages.core.tracking import Tracker
from stages.lm.tokenizer import Tokenizer
from stages.storage.artifacts import CHECKPOINTS
from stages.storage.corpus import CorpusReading, empty_message, list_sources
from stages.storage.executors import resolve_workers, run_tasks
from stages.storage.rss import PeakRSS
from stages.storage.shards import INDEX, dtype_for
from stages.storage.splits import SplitRule
from stages.storage.unit_shards import assemble, merge_stats, process_unit, tallies
from stages.storage.units import Unit, UnitDirectory, apply_cap, plan_units

log = logging.getLogger("gptpipe.data")

_PROGRESS_MIN_BYTES = 32 * 2**20  # below this a progress bar is noise


def _too_few_message(count: int) -> str:
    return (
        f"the corpus has {count} document(s); a train/val split needs at least 2 — "
        "add documents to corpus.source (each file or JSONL record is one document)"
    )


def _work_location(cfg: Sections, out: Path, work: str) -> str:
    """Where units are kept: beside an s3:// store for Dask (remote workers reach only the store),
    else in the stage's work directory under ``checkpoints/`` (kept across attempts)."""
    if cfg.data.executor == "dask" and work.startswith("s3://"):
        return work
    return str(out / CHECKPOINTS / "units")


def run(cfg: Sections, inputs: dict[str, Path], out: Path, tracker: Tracker, work: str = "") -> dict:
    tokenizer = Tokenizer.load(inputs["tokenizer"])
    workers = 1 if cfg.data.executor == "dask" else resolve_workers(cfg.data.workers)
    with PeakRSS() as peak:
        started = time.perf_counter()
        sources = list_sources(cfg.corpus)
        units = apply_cap(plan_units(cfg.corpus, cfg.data.unit_bytes, sources), cfg.corpus)
        plan_seconds = time.perf_counter() - started
        work = UnitDirectory(_work_location(cfg, out, work))
        settings = _unit_settings(cfg, tokenizer)
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
            reading = CorpusReading.of(cfg.corpus)  # plain data: a worker then needs no pydantic
            return [(unit, reading, {**settings, **extra}, tokenizer.model_proto, work.location) for unit in chosen]

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
        stats = merge_stats(ordered, cfg.corpus.source)
        if stats.documents == 0:
            raise DataError(empty_message(cfg.corpus, len(sources), stats))
        if stats.documents < 2:
            raise DataError(_too_few_message(stats.documents))
        redo = SplitRule.seeded(cfg.data.seed, cfg.data.val_fraction).repair(tallies(ordered))
        if redo is not None:  # a split came out empty: read one unit again, moving one document
            position, force = redo
            run_tasks(process_unit, tasks([units[position]], {"force": force}), finished, workers=1)
            ordered[position] = results[units[position].index]
        index = assemble(ordered, work, out, tokenizer)
        tokenize_seconds = time.perf_counter() - started
    if not work.remote:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)

    timing = {"read_seconds": plan_seconds, "tokenize_seconds": tokenize_seconds, "source_bytes": total_bytes}
    return {
        **_summary(index, timing),
        "units": len(units),
        "units_reused": reused,
        "workers": workers,
        "executor": cfg.data.executor,
        "peak_rss_mb": peak.megabytes,
        **stats.as_metrics(),
    }


def _unit_settings(cfg: Sections, tokenizer: Tokenizer) -> dict:
    """What a work unit's result depends on besides its bytes: the split rule, shard layout and tokenizer."""
    return {
        "seed": cfg.data.seed,
        "val_fraction": cfg.data.val_fraction,
        "shard_tokens": cfg.data.shard_tokens,
        "dtype": dtype_for(tokenizer.vocab_size).name,
        "eos_id": tokenizer.eos_id,
        "tokenizer": hashlib.sha256(tokenizer.model_proto).hexdigest()[:16],
        "corpus": cfg.corpus.model_dump(mode="json"),
    }


def _summary(index: dict, timing: dict) -> dict:
    """The split sizes and throughput the manifest and report card show, from the assembled shard index."""
    train, val = index["splits"]["train"], index["splits"]["val"]
    tokens = train["tokens"] + val["tokens"]
    seconds = timing["read_seconds"] + timing["tokenize_seconds"]
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
        "read_seconds": round(timing["read_seconds"], 3),
        "tokenize_seconds": round(timing["tokenize_seconds"], 3),
        "tokens_per_s": round(tokens / max(timing["tokenize_seconds"], 1e-9)),
        "source_bytes": timing["source_bytes"],
        "mb_per_s": round(timing["source_bytes"] / 1e6 / max(seconds, 1e-9), 3),
    }


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
