"""Content digests of corpus pieces: what a work unit is made of, whatever its path.

A data work unit (``stages/storage/units.py``) is keyed by the digests of its pieces, not by
their locations, so a later run over a grown or moved corpus recognizes the units it has seen.
A piece's digest covers exactly what reading it depends on:

* a whole file: the sha256 of its bytes;
* a byte range of a JSONL file: the bytes the reader consumes — from the byte before the range
  (it finishes the line that byte is on) to the end of the line holding the range's last byte
  — so appending records to a large JSONL file changes only its last range;
* Parquet row groups: the sha256 of the whole file (read once per file) and the groups' numbers;
* an ``s3://`` object (or a range of one): its ETag, size and the range — the bucket's own hash
  of the bytes, taken from the listing, so nothing is downloaded to digest it. An object
  uploaded again with the same bytes may get another ETag (multipart, SSE-KMS): its units are
  then computed again, never reused wrongly.

Each digest also names the reader (text, JSONL, Parquet) and whether the piece opens its file,
since the same bytes read another way give other documents or stats. Local files are hashed in
a few threads (sha256 releases the GIL), a batch at a time, so a capped corpus hashes only the
pieces the cap reaches.
"""

from __future__ import annotations

import hashlib
import posixpath
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, BinaryIO

from stages.storage.corpus import Piece, open_binary

_CHUNK = 1 << 20
_BATCH = 64  # pieces hashed ahead at a time


def _suffix(piece: Piece) -> str:
    """``piece.suffix`` without a ``PurePosixPath`` (whose parts churn the interpreter's interned strings)."""
    return posixpath.splitext(piece.location)[1].lower()


def _reader(suffix: str) -> str:
    return suffix.lstrip(".") if suffix in (".jsonl", ".parquet") else "text"


def _sha256_stream(handle: BinaryIO, limit: int | None = None) -> Any:
    digest = hashlib.sha256()
    remaining = limit
    while remaining is None or remaining > 0:
        chunk = handle.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
        if not chunk:
            break
        digest.update(chunk)
        if remaining is not None:
            remaining -= len(chunk)
    return digest


def _jsonl_range(piece: Piece) -> str:
    """sha256 of the bytes reading the JSONL lines that start in ``[start, stop)`` consumes."""
    at = max(piece.start - 1, 0)
    with open_binary(piece.location, piece.source_size) as handle:
        handle.seek(at)
        digest = _sha256_stream(handle, None if piece.stop is None else piece.stop - at)
        if piece.stop is not None:
            handle.seek(piece.stop - 1)
            if handle.read(1) not in (b"\n", b""):
                digest.update(handle.readline())  # the last line read runs past the range
    return digest.hexdigest()


class PieceDigests:
    """Digests of one corpus source's pieces; ``threads`` hash local files side by side."""

    def __init__(self, source: str, threads: int = 1):
        self.source = source
        self.threads = max(1, threads)
        self._files: dict[str, str] = {}  # location -> sha256 of the whole file (Parquet)
        self._etags: dict[str, str] | None = None
        self._lock = threading.Lock()

    def _etag(self, location: str) -> str | None:
        """The ETag the bucket lists for an ``s3://`` object (one listing per run)."""
        if not location.startswith("s3://"):
            return None
        with self._lock:
            if self._etags is None:
                from stages.storage.s3 import list_objects, split_uri

                bucket, _ = split_uri(self.source)
                listed = list_objects(self.source, lambda key: True)
                self._etags = {f"s3://{bucket}/{item['Key']}": str(item.get("ETag", "")) for item in listed}
        return self._etags.get(location) or None

    def _whole_file(self, location: str, size: int | None) -> str:
        with self._lock:
            known = self._files.get(location)
        if known is None:
            with open_binary(location, size) as handle:
                known = _sha256_stream(handle).hexdigest()
            with self._lock:
                self._files[location] = known
        return known

    def _content(self, piece: Piece, suffix: str) -> str:
        etag = self._etag(piece.location)
        if etag is not None:
            return f"etag:{etag}:{piece.source_size}"
        if suffix == ".parquet" and piece.stop is not None:
            return self._whole_file(piece.location, piece.source_size)
        if suffix == ".jsonl" and (piece.start or piece.stop is not None):
            return _jsonl_range(piece)
        with open_binary(piece.location, piece.source_size) as handle:
            return _sha256_stream(handle).hexdigest()

    def digest(self, piece: Piece) -> str:
        """A hex sha256 naming what ``piece`` holds, the way it is read."""
        suffix = _suffix(piece)
        text = f"{_reader(suffix)}|{piece.start}|{piece.stop}|{self._content(piece, suffix)}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def of(self, pieces: Iterable[Piece]) -> Iterator[tuple[Piece, str]]:
        """Each piece with its digest, in order, hashed a batch ahead."""
        pieces = iter(pieces)
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="gptpipe-digest") as pool:
            while batch := list(islice(pieces, _BATCH)):
                yield from zip(batch, pool.map(self.digest, batch))
