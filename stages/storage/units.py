"""Work units: the corpus cut into runs of consecutive pieces at places its content chooses.

A unit is a run of consecutive pieces (``stages/storage/corpus.py``): whole small files grouped
together, a byte range of a large JSONL file, or a few row groups of a Parquet file. A unit ends
after a piece whose content digest (``stages/storage/piece_digests.py``) falls below that
piece's share of ``data.unit_bytes`` — on average one cut per ``unit_bytes`` of source, always
after a piece of ``unit_bytes`` or more — or once it holds ``2 * unit_bytes``. The cuts depend
on the pieces' contents and ``unit_bytes`` only: never on the corpus's total size, the number of
workers or the executor. So adding files to a corpus changes only the units around them (from
the unit where a new piece lands to the next content-defined cut, usually that one unit), and
the others keep their pieces, hence their key (``unit_key``), and are reused from an earlier
output. Concatenating the units' documents in unit order gives exactly the documents of
``iter_documents``: that is what makes the data stage's output byte-identical however it ran.

``corpus.max_bytes`` is a cap in source order, so it is resolved before any unit runs: the
units are counted in order (their text read once, in this process) until the cap falls inside
one, which gets the remaining budget (part of its key); later units are dropped, and their
pieces are never hashed. A cap is for demo recipes: a real corpus has none and pays nothing.

Finished units of this attempt live in a ``UnitDirectory``: a local directory (the stage's work
directory, kept across attempts like pretraining's checkpoints) or an ``s3://`` prefix beside
the artifact store for remote Dask workers. A unit's result JSON is written last, so its
presence means the unit is complete; a rerun skips those units.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
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
from stages.storage.piece_digests import PieceDigests

if TYPE_CHECKING:  # a worker unpickles Units, and must not load the recipe schema (pydantic) for it
    from stages.core.sections import CorpusConfig


@dataclass(frozen=True)
class Unit:
    index: int
    pieces: tuple[Piece, ...]
    budget: int | None = None  # bytes of text this unit may keep (the unit where corpus.max_bytes falls)
    digests: tuple[str, ...] = ()  # each piece's content digest (``PieceDigests``), in piece order

    @property
    def size(self) -> int:
        return sum(piece.size for piece in self.pieces)

    @property
    def name(self) -> str:
        return f"unit_{self.index:06d}"


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


def cut_after(digest: str, size: int, unit_bytes: int) -> bool:
    """Whether a unit ends after a piece of ``size`` bytes with content ``digest``: with odds
    ``size / unit_bytes`` (certainly for a piece of ``unit_bytes`` or more), drawn from the digest."""
    return int(digest[:16], 16) < size * 2**64 // unit_bytes


def plan_units(
    cfg: CorpusConfig, unit_bytes: int, sources: list[Source] | None = None, digests: PieceDigests | None = None
) -> Iterator[Unit]:
    """Consecutive pieces, cut where ``cut_after`` says or once a unit holds ``2 * unit_bytes``.

    Lazy: a piece is hashed only when the plan reaches it (``apply_cap`` may stop early).
    """
    sources = list_sources(cfg) if sources is None else sources
    digests = digests or PieceDigests(cfg.source)
    pieces = (piece for source in sources for piece in _source_pieces(source, unit_bytes))
    group: list[Piece] = []
    hashes: list[str] = []
    index = size = 0
    for piece, digest in digests.of(pieces):
        group.append(piece)
        hashes.append(digest)
        size += piece.size
        if cut_after(digest, piece.size, unit_bytes) or size >= 2 * unit_bytes:
            yield Unit(index, tuple(group), None, tuple(hashes))
            group, hashes, index, size = [], [], index + 1, 0
    if group:
        yield Unit(index, tuple(group), None, tuple(hashes))


def apply_cap(planned: Iterable[Unit], cfg: CorpusConfig, sources: list[Source]) -> list[Unit]:
    """The units ``corpus.max_bytes`` keeps, the last one carrying the bytes left for it."""
    planned = iter(planned)
    try:
        capped = cfg.max_bytes is not None
        if capped and all(s.suffix != ".parquet" for s in sources) and sum(s.size for s in sources) < cfg.max_bytes:
            capped = False  # text never grows when read (Parquet can: it is compressed), so the cap cannot be reached
        if not capped:
            return list(planned)
        units, used = [], 0
        for unit in planned:
            stats = CorpusStats()
            kept = sum(len(doc.encode("utf-8")) for doc in read_pieces(unit.pieces, CorpusReading.of(cfg), stats))
            if used + kept >= cfg.max_bytes:
                return [*units, replace(unit, budget=cfg.max_bytes - used)]
            units.append(unit)
            used += kept
        return units
    finally:
        close = getattr(planned, "close", None)
        if close is not None:
            close()  # stop hashing ahead (and its threads) where the cap fell


def unit_key(unit: Unit, settings: dict[str, Any]) -> str:
    """What a unit's result is made from: its pieces' contents (digests; their locations for a unit
    planned without them), its budget and ``settings`` (split rule, shard layout, tokenizer, code,
    a repair's ``force``). Not its position: a unit keeps its key when units before it change."""
    pieces = list(unit.digests) if unit.digests else [asdict(p) for p in unit.pieces]
    text = json.dumps({"pieces": pieces, "budget": unit.budget, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


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
