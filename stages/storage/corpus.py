"""Reading the pretraining corpus: ``CorpusConfig.source`` -> a stream of text documents.

A source is one of

* ``python-stdlib`` — the running interpreter's own standard-library ``.py`` files (the
  demo corpus: every Python install has it, nothing is downloaded);
* a file, a directory (walked recursively) or a glob; files are filtered by
  ``extensions`` when they come from a directory or glob;
* ``.jsonl`` files (one JSON object per line, text in ``text_field``) and ``.parquet`` files
  (text in column ``text_field``), whether named directly or found in a directory.

``_SOURCE_KINDS`` maps a source to the function that lists its files; ``list_sources`` adds their
sizes (for ``s3://``, from the bucket listing). Per piece of a file, ``_FILE_READERS`` picks how
documents are pulled out of it. Everything streams: documents come out of iterators one at a
time, Parquet one batch of the text column at a time, S3 objects through ranged GETs, so
memory does not grow with the corpus (``stages/storage/units.py`` cuts sources into pieces).

Files are visited in sorted order so the same source always yields the same documents in
the same order: the tokenizer and data stages rely on that to be reproducible. Binary
files (a NUL byte), files that are not UTF-8 and empty documents are skipped and counted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from stages.core.errors import DataError

if TYPE_CHECKING:
    from stages.core.sections import CorpusConfig

STDLIB = "python-stdlib"
# Directories of the standard library that are not the library itself: the test suite
# (huge, repetitive, full of deliberately broken files), IDLE and installed packages.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})
_RECORD_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class CorpusReading:
    """What reading documents takes from the corpus section (``CorpusConfig``), as plain data.

    The data stage hands this to its worker processes instead of the section itself: unpickling a
    pydantic model would load pydantic and the whole recipe schema into every worker (~14 MB
    resident each, measured) for three values.
    """

    source: str
    text_field: str
    max_doc_bytes: int

    @classmethod
    def of(cls, cfg: CorpusConfig) -> CorpusReading:
        return cls(cfg.source, cfg.text_field, cfg.max_doc_bytes)


@dataclass
class CorpusStats:
    """What reading the source did: shown in errors and reported as stage metrics."""

    source: str = ""
    files: int = 0  # files that contributed at least one document
    scanned: int = 0  # files opened
    skipped_binary: int = 0
    skipped_non_utf8: int = 0
    skipped_empty: int = 0  # empty files and empty JSONL/Parquet records
    truncated: int = 0  # documents cut to max_doc_bytes
    capped: bool = False  # reading stopped at max_bytes
    bytes: int = 0  # UTF-8 bytes of all documents kept
    documents: int = 0

    def as_metrics(self, prefix: str = "corpus_") -> dict[str, int]:
        """Numeric stats with a prefix, ready for a stage's summary metrics."""
        return {f"{prefix}{k}": int(v) for k, v in asdict(self).items() if k != "source"}


# --------------------------------------------------------------------------- listing files


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _list_stdlib(cfg: CorpusConfig) -> list[Path]:
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(
            f"corpus.source={STDLIB!r}: the standard library is not at {root}; point corpus.source at your own text"
        )
    found = []
    # os.walk lets us prune skipped directories (site-packages can be far larger than the stdlib).
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS]
        found.extend(Path(folder, name) for name in names if name.endswith(".py"))
    # Sort by relative path so the order does not depend on where Python is installed.
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _wanted(path: Path, cfg: CorpusConfig) -> bool:
    name = path.name.lower()
    return any(name.endswith(ext.lower()) for ext in cfg.extensions)


def _list_directory(cfg: CorpusConfig) -> list[Path]:
    root = Path(cfg.source).expanduser()
    return sorted(
        (p for p in root.rglob("*") if p.is_file() and _wanted(p, cfg)),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def _list_glob(cfg: CorpusConfig) -> list[Path]:
    paths = (Path(p) for p in glob.glob(str(Path(cfg.source).expanduser()), recursive=True))
    return sorted((p for p in paths if p.is_file() and _wanted(p, cfg)), key=lambda p: p.as_posix())


def _list_file(cfg: CorpusConfig) -> list[Path]:
    # A file named directly is read whatever its suffix: the user chose it.
    return [Path(cfg.source).expanduser()]


def _list_s3(cfg: CorpusConfig) -> list[Path]:
    """``s3://`` sources are listed by ``list_sources`` and streamed; there are no local files."""
    return []


def _is_glob(source: str) -> bool:
    return any(ch in source for ch in "*?[")


def source_kind(source: str) -> str:
    """Which lister handles ``source``: 'stdlib', 's3', 'file', 'dir' or 'glob'."""
    if source == STDLIB:
        return "stdlib"
    if source.startswith("s3://"):
        return "s3"
    path = Path(source).expanduser()
    if path.is_file():
        return "file"
    if path.is_dir():
        return "dir"
    if _is_glob(source):
        return "glob"
    raise DataError(
        f"corpus.source={source!r}: no such file or directory (expected '{STDLIB}', a file, a directory, a glob or s3://…)"
    )


_SOURCE_KINDS: dict[str, Callable[[CorpusConfig], list[Path]]] = {
    "stdlib": _list_stdlib,
    "s3": _list_s3,
    "file": _list_file,
    "dir": _list_directory,
    "glob": _list_glob,
}


def list_files(cfg: CorpusConfig) -> list[Path]:
    """The files a source covers, in the deterministic order they are read."""
    return _SOURCE_KINDS[source_kind(cfg.source)](cfg)


# --------------------------------------------------------------------------- sources and pieces


@dataclass(frozen=True)
class Source:
    """One file or object of the corpus, as the listing knows it (nothing is read yet)."""

    location: str  # a local path or s3://bucket/key
    size: int

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.location).suffix.lower()


@dataclass(frozen=True)
class Piece:
    """The part of a source one work unit reads: a whole file, a byte range of a JSONL file
    (the lines that *start* in ``[start, stop)``) or Parquet row groups ``[start, stop)``."""

    location: str
    size: int  # source bytes this piece covers (for progress and unit sizing)
    start: int = 0
    stop: int | None = None  # None: to the end
    source_size: int | None = None  # the whole file's size, when known (saves a HEAD per S3 piece)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.location).suffix.lower()

    @property
    def first(self) -> bool:
        """The piece that opens its file: it alone counts the file in the stats."""
        return self.start == 0


def list_sources(cfg: CorpusConfig) -> list[Source]:
    """The source's files (or objects) with their sizes, in reading order. ``s3://`` objects come
    from the bucket listing: nothing is downloaded."""
    if source_kind(cfg.source) == "s3":
        from stages.storage.s3 import list_objects

        bucket = cfg.source[len("s3://") :].partition("/")[0]
        return [
            Source(f"s3://{bucket}/{item['Key']}", int(item["Size"]))
            for item in list_objects(cfg.source, lambda key: _wanted(Path(key), cfg))
        ]
    return [Source(str(path), path.stat().st_size) for path in list_files(cfg)]


def open_binary(location: str, size: int | None = None) -> BinaryIO:
    """A local file, or an S3 object streamed with ranged GETs (``stages/storage/s3.py``)."""
    if location.startswith("s3://"):
        from stages.storage.s3 import open_object

        return open_object(location, size)
    return open(location, "rb")


def parquet_row_groups(location: str, size: int | None = None) -> list[int]:
    """Uncompressed bytes of each row group of a Parquet file (its footer only is read)."""
    import pyarrow.parquet as pq

    with open_binary(location, size) as handle:
        try:
            meta = pq.ParquetFile(handle).metadata
        except Exception as exc:
            raise DataError(f"{location}: not a readable Parquet file ({exc})") from None
        return [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]


# --------------------------------------------------------------------------- reading pieces


def _text_documents(piece: Piece, cfg: CorpusReading, stats: CorpusStats) -> Iterator[str]:
    """A plain text file is one document (read whole: it is one document, cut to max_doc_bytes later)."""
    with open_binary(piece.location, piece.source_size) as handle:
        data = handle.read()
    if not data.strip():
        stats.skipped_empty += 1
        return
    if b"\0" in data:
        stats.skipped_binary += 1
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped_non_utf8 += 1
        return
    yield text


def _jsonl_documents(piece: Piece, cfg: CorpusReading, stats: CorpusStats) -> Iterator[str]:
    path = piece.location
    with open_binary(piece.location, piece.source_size) as handle:
        if piece.start:
            # Own the lines that start at or after ``start``: finish the line that byte start-1 is on.
            handle.seek(piece.start - 1)
            handle.readline()
        number = 0
        while piece.stop is None or handle.tell() < piece.stop:
            raw = handle.readline()
            if not raw:
                break
            number += 1
            if not raw.strip():
                continue
            where = f"{path}:{number}" if not piece.start else f"{path}:{number} (counting from byte {piece.start})"
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an int too long, nesting too deep
                raise DataError(f"{where}: not a valid JSON line ({exc}); fix or remove that line") from None
            if not isinstance(record, dict) or cfg.text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{where}: no field {cfg.text_field!r} (found {keys}); set corpus.text_field to the text field"
                )
            text = record[cfg.text_field]
            if text is None or text == "":
                stats.skipped_empty += 1
                continue
            if not isinstance(text, str):
                raise DataError(f"{where}: field {cfg.text_field!r} holds {type(text).__name__}, expected a string")
            yield text


def _parquet_documents(piece: Piece, cfg: CorpusReading, stats: CorpusStats) -> Iterator[str]:
    """Row group by row group, only the text column: memory holds one batch, not the file."""
    import pyarrow.parquet as pq  # only needed for Parquet sources; keeps imports light

    path = piece.location
    with open_binary(piece.location, piece.source_size) as raw:
        try:
            handle = pq.ParquetFile(raw, pre_buffer=False)
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        columns = handle.schema_arrow.names
        if cfg.text_field not in columns:
            raise DataError(
                f"{path}: no column {cfg.text_field!r} (columns: {columns}); set corpus.text_field to the text column"
            )
        stop = handle.metadata.num_row_groups if piece.stop is None else piece.stop
        groups = list(range(piece.start, stop))
        if not groups:
            return
        row = sum(handle.metadata.row_group(i).num_rows for i in range(piece.start))
        # One row group per request: pyarrow would otherwise coalesce them all into one read.
        batches = (
            b for g in groups for b in handle.iter_batches(row_groups=[g], columns=[cfg.text_field], batch_size=1024)
        )
        for batch in batches:
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None or value == "":
                    stats.skipped_empty += 1
                    continue
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        stats.skipped_non_utf8 += 1
                        continue
                if not isinstance(value, str):
                    raise DataError(
                        f"{path}: row {row} of column {cfg.text_field!r} holds {type(value).__name__}, expected a string"
                    )
                yield value


_FILE_READERS: dict[str, Callable[[Piece, CorpusReading, CorpusStats], Iterator[str]]] = {
    ".jsonl": _jsonl_documents,
    ".parquet": _parquet_documents,
}


def _reader_for(piece: Piece) -> Callable[[Piece, CorpusReading, CorpusStats], Iterator[str]]:
    return _FILE_READERS.get(piece.suffix, _text_documents)


def _cut_utf8(text: str, limit: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits in ``limit`` bytes."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def read_pieces(
    pieces: Iterable[Piece], cfg: CorpusReading, stats: CorpusStats, budget: int | None = None
) -> Iterator[str]:
    """The documents of ``pieces`` in order, one at a time, normalized and truncated; with a
    ``budget`` (bytes of text), reading stops once it is used up, cutting the last document.

    Every reader of the corpus goes through here, so the tokenizer (``iter_documents``) and the
    data stage's units see exactly the same documents.
    """
    used = 0
    for piece in pieces:
        if stats.capped:
            break
        stats.scanned += piece.first
        contributed = False
        for text in _reader_for(piece)(piece, cfg, stats):
            # Windows line ends become '\n' so the same text never tokenizes two ways.
            text = text.replace("\r\n", "\n")
            size = len(text.encode("utf-8"))
            if size > cfg.max_doc_bytes:
                text, size = _cut_utf8(text, cfg.max_doc_bytes), cfg.max_doc_bytes
                stats.truncated += 1
            if budget is not None and size >= budget - used:
                text = _cut_utf8(text, budget - used)
                size = len(text.encode("utf-8"))
                stats.capped = True
            if text.strip():
                used += size
                stats.bytes += size
                stats.documents += 1
                contributed = True
                yield text
            elif not stats.capped:
                stats.skipped_empty += 1  # whitespace only: nothing to learn from
            if stats.capped:
                break
        stats.files += contributed and piece.first


def whole_pieces(sources: Iterable[Source]) -> Iterator[Piece]:
    return (Piece(source.location, source.size, source_size=source.size) for source in sources)


def iter_documents(cfg: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[str]:
    """Every document of the source in a fixed order, streamed one at a time, capped at
    ``max_bytes`` when set. Raises ``DataError`` at the end when nothing usable was found."""
    stats = stats if stats is not None else CorpusStats(source=cfg.source)
    sources = list_sources(cfg)
    yield from read_pieces(whole_pieces(sources), CorpusReading.of(cfg), stats, cfg.max_bytes)
    if not stats.documents:
        raise DataError(empty_message(cfg, len(sources), stats))


def empty_message(cfg: CorpusConfig, listed: int, stats: CorpusStats) -> str:
    if listed == 0:
        where = (
            f"matched no files with extensions {cfg.extensions}"
            if source_kind(cfg.source) in ("dir", "glob")
            else "is empty"
        )
        return f"corpus.source={cfg.source!r} {where}; point it at text files or adjust corpus.extensions"
    return (
        f"corpus.source={cfg.source!r}: no usable documents in {stats.scanned} file(s) "
        f"(skipped: {stats.skipped_binary} binary, {stats.skipped_non_utf8} not UTF-8, {stats.skipped_empty} empty); "
        "point it at UTF-8 text"
    )


def fingerprint(cfg: CorpusConfig) -> str:
    """A cheap hash of what the source currently holds (paths, sizes, mtimes; interpreter for stdlib;
    object keys, sizes and ETags for s3://).

    Stage cache keys hash the config, not the files it points at: a runner can fold this in so an
    edited corpus is not served from a stale artifact.
    """
    digest = hashlib.sha256(cfg.model_dump_json().encode())
    if cfg.source == STDLIB:
        digest.update(f"{sys.version}|{stdlib_root()}".encode())
    if source_kind(cfg.source) == "s3":
        # The bucket's own listing (key, size, ETag): nothing is downloaded to fingerprint, and a
        # stage container and the orchestrator agree whatever their local caches are.
        from stages.storage.s3 import list_objects

        for item in list_objects(cfg.source, lambda key: _wanted(Path(key), cfg)):
            digest.update(f"{item['Key']}|{item['Size']}|{item.get('ETag', '')}\n".encode())
        return digest.hexdigest()[:16]
    for path in list_files(cfg):
        stat = path.stat()
        digest.update(f"{path.as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
