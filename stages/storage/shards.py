"""Token shard format: flat little-endian uint16/uint32 files plus ``shards.json``.

Layout of a data artifact::

    shards.json          {"dtype": "uint16", "vocab_size": ..., "eos_id": ...,
                          "splits": {"train": {"files": [...], "tokens": N, "documents": D, "bytes": B}, ...}}
    train_000000_000.bin ...  documents back to back, each followed by the separator (EOS) id;
    val_000000_000.bin ...    one or more files per work unit and split (<split>_<unit>_<part>), in order

``bytes`` is the UTF-8 size of the split's text, so bits-per-byte can be computed from a
token-level loss. Readers memory-map the files: nothing is loaded whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.core.errors import DataError

INDEX = "shards.json"


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class ShardWriter:
    """Append token arrays to ``<split>_NNN.bin`` files, starting a new file every ``shard_tokens``."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, prefix: str | None = None):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, np.dtype(dtype), shard_tokens
        self.prefix = prefix or split  # a work unit's files carry its number: train_000012_000.bin
        self.files: list[str] = []
        self.tokens = 0
        self._in_current = 0
        self._handle = None

    def _roll(self) -> None:
        if self._handle is not None:
            self._handle.close()
        name = f"{self.prefix}_{len(self.files):03d}.bin"
        self.files.append(name)
        self._handle = open(self.out / name, "wb")
        self._in_current = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and int(ids.max()) > np.iinfo(self.dtype).max:
            shard = self.out / f"{self.prefix}_{len(self.files):03d}.bin"
            raise DataError(
                f"{shard}: token id {int(ids.max())} does not fit shard dtype {self.dtype} "
                f"(max {np.iinfo(self.dtype).max}); use uint32 shards for this vocabulary"
            )
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._handle is None or self._in_current >= self.shard_tokens:
                self._roll()
            room = self.shard_tokens - self._in_current
            chunk, ids = ids[:room], ids[room:]
            self._handle.write(chunk.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self._in_current += chunk.size
            self.tokens += chunk.size

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_index(directory: Path) -> dict:
    path = Path(directory) / INDEX
    if not path.is_file():
        raise DataError(f"{directory}: no {INDEX}; not a gptpipe data artifact")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); rerun the data stage") from None
    missing = [k for k in ("dtype", "vocab_size", "eos_id", "splits") if not isinstance(index, dict) or k not in index]
    if missing:
        raise DataError(f"{path}: not a gptpipe shard index (missing {', '.join(missing)}); rerun the data stage")
    return index


class TokenShards:
    """One split of a data artifact, memory-mapped, addressable as one long token stream."""

    def __init__(self, directory: str | Path, split: str):
        directory = Path(directory)
        index = read_index(directory)
        if split not in index["splits"]:
            raise DataError(f"{directory}: split {split!r} not in {sorted(index['splits'])}")
        info = index["splits"][split]
        self.split = split
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.vocab_size = int(index["vocab_size"])
        self.eos_id = int(index["eos_id"])
        if self.dtype.kind != "u" or self.vocab_size > np.iinfo(self.dtype).max + 1:
            # A forced or edited dtype would silently wrap ids above its range into wrong tokens.
            raise DataError(
                f"{directory / INDEX}: dtype {self.dtype.name} cannot hold vocab_size {self.vocab_size} "
                f"ids; rerun the data stage (it picks {dtype_for(self.vocab_size).name} for this vocabulary)"
            )
        self.num_bytes = int(info.get("bytes", 0))
        self.documents = int(info.get("documents", 0))
        self.arrays = [np.memmap(directory / name, dtype=self.dtype, mode="r") for name in info["files"]]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.num_tokens = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start+length)`` of the stream as int64, crossing shard files if needed."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"window {start}+{length} outside {self.num_tokens} tokens")
        parts = []
        while length > 0:
            shard = int(np.searchsorted(self.offsets, start, side="right") - 1)
            local = start - int(self.offsets[shard])
            take = min(length, len(self.arrays[shard]) - local)
            parts.append(np.asarray(self.arrays[shard][local : local + take], dtype=np.int64))
            start, length = start + take, length - take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @property
    def bytes_per_token(self) -> float:
        return self.num_bytes / max(self.num_tokens, 1)
