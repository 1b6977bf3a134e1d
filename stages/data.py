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
bounded by the unit size, not the corpus.

A grown corpus tokenizes only what is new. Units are cut where their pieces' contents say (not
at sizes computed from the corpus total), so adding files leaves the other units as they were,
and a unit's key is made of what its result depends on: the content digests of its pieces
(``stages/storage/piece_digests.py``; not their paths), its ``corpus.max_bytes`` budget, how
documents are read (``corpus.text_field``, ``corpus.max_doc_bytes``), the split rule
(``data.seed``, ``data.val_fraction`` and a repair's forced document), the shard layout
(``data.shard_tokens``, dtype, EOS id), the tokenizer's digest and the code that makes units.
Each output lists its units' keys and files in ``units.json``; a unit whose key a finished data
output of the same store (local or ``s3://``) already holds is copied from it, checked against
that output's manifest, instead of computed (``stages/storage/earlier_units.py``). A unit
finished by an earlier attempt of this same run is kept in the work directory and reused too.
The manifest reports ``units``, ``units_computed`` and ``units_reused``.

A document's side follows its text, so it never changes as the corpus grows, but in one case:
when the hash leaves a side empty, one unit is read again with a forced document
(``SplitRule.repair``), and a grown corpus that fills that side by the hash (or needs another
document forced) puts it back where its hash says. The force is part of that unit's key, so a
repaired result is reused only by a run that needs the same repair, and never in place of the
unrepaired unit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stages.core.errors import DataError
from stages.core.progress import byte_progress
from stages.core.stage import Output, Sections, Stage
from stages.core.tracking import Tracker
from stages.lm.tokenizer import Tokenizer
from stages.storage.artifacts import CHECKPOINTS, code_version
from stages.storage.corpus import CorpusReading, empty_message, list_sources
from stages.storage.earlier_units import UNITS, EarlierUnits
from stages.storage.executors import resolve_workers, run_tasks
from stages.storage.piece_digests import PieceDigests
from stages.storage.rss import PeakRSS
from stages.storage.shards import INDEX, dtype_for
from stages.storage.splits import SplitRule
from stages.storage.unit_shards import assemble, merge_stats, process_unit, tallies
from stages.storage.units import Unit, UnitDirectory, apply_cap, plan_units, unit_key

log = logging.getLogger("gptpipe.data")

_PROGRESS_MIN_BYTES = 32 * 2**20  # below this a progress bar is noise
_COPY_THREADS = 8  # units copied from earlier outputs at a time (I/O: local copies or S3 downloads)


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
        digests = PieceDigests(cfg.corpus.source, resolve_workers(cfg.data.workers))
        units = apply_cap(plan_units(cfg.corpus, cfg.data.unit_bytes, sources, digests), cfg.corpus, sources)
        earlier = EarlierUnits.beside(work)
        plan_seconds = time.perf_counter() - started
        runner = _Runner(cfg, tokenizer, UnitDirectory(_work_location(cfg, out, work)), earlier, out)
        started = time.perf_counter()
        with runner.progress(sum(unit.size for unit in units)):
            runner.run(units, workers)
            ordered = [runner.results[unit.index] for unit in units]
            stats = merge_stats(ordered, cfg.corpus.source)
            if stats.documents == 0:
                raise DataError(empty_message(cfg.corpus, len(sources), stats))
            if stats.documents < 2:
                raise DataError(_too_few_message(stats.documents))
            redo = SplitRule.seeded(cfg.data.seed, cfg.data.val_fraction).repair(tallies(ordered))
            if redo is not None:  # a split came out empty: read one unit again, moving one document
                position, force = redo
                ordered[position] = runner.redo(units[position], ordered[position], force)
        index = assemble(ordered, runner.work, out, tokenizer)
        tokenize_seconds = time.perf_counter() - started
    if not runner.work.remote:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    reused = sum(bool(result.get("reused")) for result in ordered)
    log.info("data: %d unit(s), %d reused, %d computed", len(units), reused, len(units) - reused)
    timing = {"read_seconds": plan_seconds, "tokenize_seconds": tokenize_seconds, "source_bytes": runner.total}
    return {
        **_summary(index, timing),
        "units": len(units),
        "units_computed": len(units) - reused,
        "units_reused": reused,
        "workers": workers,
        "executor": cfg.data.executor,
        "peak_rss_mb": peak.megabytes,
        **stats.as_metrics(),
    }


class _Runner:
    """This run's units: taken from an earlier output where one has their key, else computed
    (``process_unit``, on the configured executor), with a progress bar over both."""

    def __init__(self, cfg: Sections, tokenizer: Tokenizer, work: UnitDirectory, earlier: EarlierUnits, out: Path):
        self.cfg, self.tokenizer, self.work, self.earlier, self.out = cfg, tokenizer, work, earlier, out
        self.settings = _unit_settings(cfg, tokenizer)
        self.results: dict[int, dict] = {}
        self.total = 0
        self._bar = None
        self._started = time.perf_counter()
        self._tokens = 0

    @contextlib.contextmanager
    def progress(self, total_bytes: int):
        self.total = total_bytes
        self._bar = byte_progress(total_bytes, "data", min_bytes=_PROGRESS_MIN_BYTES)
        try:
            yield
        finally:
            self._bar.close()

    def finished(self, result: dict) -> None:
        self.results[result["unit"]] = result
        self._tokens += sum(s["tokens"] for s in result["splits"].values())
        self._bar.update(result["source_bytes"])
        seconds = max(time.perf_counter() - self._started, 1e-9)
        self._bar.set_postfix(tokens_per_s=f"{self._tokens / seconds:,.0f}", refresh=False)

    def _take(self, unit: Unit, extra: dict) -> dict | None:
        return self.earlier.take(unit_key(unit, {**self.settings, **extra}), unit.index, self.out)

    def _compute(self, chosen: list[Unit], extra: dict, workers: int) -> None:
        reading = CorpusReading.of(self.cfg.corpus)  # plain data: a worker then needs no pydantic
        settings = {**self.settings, **extra}
        proto, location = self.tokenizer.model_proto, self.work.location
        run_tasks(
            process_unit,
            [(unit, reading, settings, proto, location) for unit in chosen],
            self.finished,
            executor=self.cfg.data.executor,
            workers=workers,
            scheduler=self.cfg.data.dask_scheduler,
        )

    def run(self, units: list[Unit], workers: int) -> None:
        """Every unit: those an earlier output holds are copied (a few at a time), the rest computed."""
        if len(self.earlier):
            with ThreadPoolExecutor(max_workers=_COPY_THREADS, thread_name_prefix="gptpipe-reuse") as pool:
                taken = list(pool.map(lambda unit: self._take(unit, {}), units))
        else:
            taken = [None] * len(units)
        for result in taken:
            if result is not None:
                self.finished(result)
        self._compute([unit for unit, result in zip(units, taken) if result is None], {}, workers)

    def redo(self, unit: Unit, before: dict, force: dict) -> dict:
        """``unit`` again with a repair's ``force`` (its own key): taken from an earlier output that
        made the same repair, else computed; the unrepaired result's files leave the artifact."""
        if before.get("placed"):
            for info in before["splits"].values():
                for name in info["files"]:
                    (self.out / name).unlink(missing_ok=True)
        result = self._take(unit, {"force": force})
        if result is not None:
            self.finished(result)
        else:
            self._compute([unit], {"force": force}, workers=1)
        return self.results[unit.index]


def _unit_settings(cfg: Sections, tokenizer: Tokenizer) -> dict:
    """What a work unit's result depends on besides its pieces' contents: how documents are read
    from them, the split rule, shard layout, tokenizer and the code that makes units."""
    return {
        "seed": cfg.data.seed,
        "val_fraction": cfg.data.val_fraction,
        "shard_tokens": cfg.data.shard_tokens,
        "dtype": dtype_for(tokenizer.vocab_size).name,
        "eos_id": tokenizer.eos_id,
        "tokenizer": hashlib.sha256(tokenizer.model_proto).hexdigest(),
        "text_field": cfg.corpus.text_field,
        "max_doc_bytes": cfg.corpus.max_doc_bytes,
        "code": code_version(process_unit.__module__),
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
    outputs=(
        Output(INDEX, "the shard files of each split, dtype, vocabulary size, EOS id"),
        Output(UNITS, "each work unit's key, shard files, counts and split tally: what later runs reuse"),
    ),
    run=run,
    headline=("train_tokens", "val_tokens", "units_computed", "units_reused"),
    keeps_work=True,
)
