"""Work units: the corpus cut, deterministically, into pieces of about ``data.unit_bytes``.

A unit is a run of consecutive pieces (``stages/storage/corpus.py``): whole small files grouped
together, a byte range of a large JSONL file, or a few row groups of a Parquet file. Units
depend only on the source listing and ``unit_bytes`` — never on the number of workers or the
executor — and concatenating their documents in unit order gives exactly the documents of
``iter_documents``: that is what makes the data stage's output byte-identical however it ran.

``corpus.max_bytes`` is a cap in source order, so it is resolved before any unit runs: the
units are counted in order (their text read once, in this process) until the cap falls inside
one, which gets the remaining budget; later units are dropped. A cap is for demo recipes: a
real corpus has none and pays nothing.

Finished units live in a ``UnitDirectory``: a local directory (the stage's work directory,
kept across attempts like pretraining's checkpoints) or an ``s3://`` prefix beside the artifact
store for remote Dask workers. A unit's result JSON is written last, so its presence means
the unit is complete; a rerun skips those units.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.storage.corpus import (
    CorpusReading,
    CorpusStats,
    Piece,
    Source,
    list_sources,
    parquet_row_groups,
    read_pieces,
)

if TYPE_CHECKING:  # a worker unpickles Units, and must not load the recipe schema (pydantic) for it
    from stages.core.sections import CorpusConfig


@dataclass(frozen=True)
class Unit:
    index: int
    pieces: tuple[Piece, ...]
    budget: int | None = None  # bytes of text this unit may keep (the unit where corpus.max_bytes falls)

    @property
    def size(self) -> int:
        return sum(piece.size for piece in self.pieces)

    @property
    def name(self) -> str:
        return f"unit_{self.index:06d}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "budget": self.budget, "pieces": [asdict(p) for p in self.pieces]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Unit:
        return cls(int(data["index"]), tuple(Piece(**p) for p in data["pieces"]), data.get("budget"))


def _source_pieces(source: Source, unit_bytes: int) -> list[Piece]:
    """A source as pieces of at most about ``unit_bytes``: only JSONL and Parquet can be split."""
    if source.suffix == ".jsonl" and source.size > unit_bytes:
        return [
            Piece(
                source.location, min(unit_bytes, source.size - at), at, min(at + unit_bytes, source.size), source.size
            )
            for at in range(0, source.size, unit_bytes)
        ]
    if source.suffix == ".parquet" and source.size > unit_bytes:
        groups = parquet_row_groups(source.location, source.size)
        total = max(sum(groups), 1)
        pieces, first, acc = [], 0, 0
        for i, group_bytes in enumerate(groups):
            acc += group_bytes
            if acc >= unit_bytes * total / max(source.size, 1) or i == len(groups) - 1:
                # Sizes are in uncompressed bytes; scale back to file bytes for progress.
                pieces.append(Piece(source.location, max(1, source.size * acc // total), first, i + 1, source.size))
                first, acc = i + 1, 0
        return pieces or [Piece(source.location, source.size, source_size=source.size)]
    return [Piece(source.location, source.size, source_size=source.size)]


# A small corpus still gets this many units (of at least _MIN_UNIT_BYTES) so all workers have work.
MIN_UNITS = 32
_MIN_UNIT_BYTES = 256 * 1024


def unit_size(cfg: CorpusConfig, unit_bytes: int, sources: list[Source]) -> int:
    """``unit_bytes``, or less for a corpus too small to make ``MIN_UNITS`` units of it.

    Depends on the listing and the recipe only (never on the worker count), so the plan, and
    with it the output, stays the same wherever the stage runs.
    """
    total = sum(source.size for source in sources)
    if cfg.max_bytes is not None:
        total = min(total, cfg.max_bytes)
    return max(1, min(unit_bytes, max(_MIN_UNIT_BYTES, -(-total // MIN_UNITS))))


def plan_units(cfg: CorpusConfig, unit_bytes: int, sources: list[Source] | None = None) -> list[Unit]:
    """Consecutive pieces grouped until each unit holds at least ``unit_size`` (the last may hold less)."""
    sources = list_sources(cfg) if sources is None else sources
    unit_bytes = unit_size(cfg, unit_bytes, sources)
    units: list[Unit] = []
    group: list[Piece] = []
    size = 0
    for source in sources:
        for piece in _source_pieces(source, unit_bytes):
            group.append(piece)
            size += piece.size
            if size >= unit_bytes:
                units.append(Unit(len(units), tuple(group)))
                group, size = [], 0
    if group:
        units.append(Unit(len(units), tuple(group)))
    return units


def apply_cap(units: list[Unit], cfg: CorpusConfig) -> list[Unit]:
    """The units ``corpus.max_bytes`` keeps, the last one carrying the bytes left for it."""
    if cfg.max_bytes is None:
        return units
    pieces = [piece for unit in units for piece in unit.pieces]
    if all(piece.suffix != ".parquet" for piece in pieces) and sum(piece.size for piece in pieces) < cfg.max_bytes:
        return units  # text never grows when read (Parquet can: it is compressed), so the cap cannot be reached
    used = 0
    for i, unit in enumerate(units):
        stats = CorpusStats()
        kept = sum(len(doc.encode("utf-8")) for doc in read_pieces(unit.pieces, CorpusReading.of(cfg), stats))
        if used + kept >= cfg.max_bytes:
            return [*units[:i], Unit(unit.index, unit.pieces, cfg.max_bytes - used)]
        used += kept
    return units


def unit_signature(unit: Unit, settings: dict[str, Any]) -> str:
    """What a finished unit was made from: a result with another signature is not reused."""
    text = json.dumps({"unit": unit.to_dict(), "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class UnitDirectory:
    """Where finished units are kept: a local directory or an ``s3://`` prefix (``ObjectDirectory``)."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.remote = self.location.startswith("s3://")
        if self.remote:
            from stages.storage.s3 import ObjectDirectory

            self._objects = ObjectDirectory(self.location)
        else:
            Path(self.location).mkdir(parents=True, exist_ok=True)

    def publish(self, files: dict[str, Path], result_name: str, result: dict[str, Any]) -> None:
        """Store a unit's shard files, then its result JSON (last: it marks the unit finished)."""
        text = json.dumps(result, indent=1) + "\n"
        if self.remote:
            for name, path in files.items():
                self._objects.put_file(path, name)
            self._objects.put_text(result_name, text)
            return
        root = Path(self.location)
        for name, path in files.items():
            os.replace(path, root / name)
        partial = root / f"{result_name}.part"
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, root / result_name)

    def result(self, result_name: str) -> dict[str, Any] | None:
        if self.remote:
            text = self._objects.read_text(result_name)
        else:
            path = Path(self.location) / result_name
            text = path.read_text(encoding="utf-8") if path.is_file() else None
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None  # a torn write from a killed run: redo the unit

    def fetch(self, name: str, target: Path) -> None:
        """Move (local) or download (S3) one shard file into the artifact being built."""
        if self.remote:
            self._objects.get_file(name, target)
        else:
            os.replace(Path(self.location) / name, target)

    def clear(self) -> None:
        if self.remote:
            self._objects.remove_all()
        else:
            shutil.rmtree(self.location, ignore_errors=True)
