"""Finished work units of a store's earlier data outputs, found by unit key.

Every data output lists its units in ``units.json`` (``UNITS``): each unit's key
(``stages/storage/units.py``'s ``unit_key``: its pieces' contents, budget, split rule, shard
layout, tokenizer and code), its shard files, token/document/byte counts, corpus stats and
split tally. A later data run in the same store reads the ``units.json`` of every *finished*
data output there — one whose manifest is written, so a half-written output, another run's
work directory or a unit in flight is never read — and takes each unit whose key it needs by
copying that unit's files into its own output under its own unit number. Each file is checked
against the earlier output's manifest (sha256) on the way; a file that is gone or does not
match makes the unit computed again, never taken. Published outputs are immutable, so two runs
reading the same one at once cannot disturb each other.

Local store: ``<store>/data/<key>/units.json`` beside the shard files. S3 store: each output's
manifest, then ``units.json`` under its files' prefix (``S3Store.files_prefix``); shard files
are downloaded (the new output is uploaded whole when published, like any output).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from stages.core.errors import ArtifactError
from stages.storage.artifacts import MANIFEST, Manifest, read_manifest, sha256_file

log = logging.getLogger("gptpipe.data")

UNITS = "units.json"
_ENTRY = ("key", "source_bytes", "splits", "stats", "tally")


def unit_entry(result: dict[str, Any]) -> dict[str, Any]:
    """What ``units.json`` keeps of a unit's result: nothing that depends on where or when it ran."""
    entry = {name: result[name] for name in _ENTRY}
    entry["stats"] = {k: v for k, v in result["stats"].items() if k != "source"}
    return entry


def renumbered(entry: dict[str, Any], index: int) -> tuple[dict[str, Any], dict[str, str]]:
    """``entry`` with its shard files named for unit ``index`` (``<split>_<unit>_<part>.bin``),
    and the renaming as {earlier name: new name}."""
    names: dict[str, str] = {}
    splits = {}
    for split, info in entry["splits"].items():
        files = []
        for name in info["files"]:
            part = name.rsplit("_", 1)[1]
            files.append(f"{split}_{index:06d}_{part}")
            names[name] = files[-1]
        splits[split] = {**info, "files": files}
    return {**entry, "splits": splits}, names


class _LocalOutput:
    def __init__(self, directory: Path, manifest: Manifest):
        self.directory, self.manifest = directory, manifest

    def fetch(self, name: str, target: Path) -> None:
        shutil.copyfile(self.directory / name, target)


class _S3Output:
    def __init__(self, store: Any, manifest: Manifest, prefix: str):
        self.store, self.manifest, self.prefix = store, manifest, prefix

    def fetch(self, name: str, target: Path) -> None:
        from stages.storage.s3 import s3_errors

        try:
            self.store.download_file(f"{self.prefix}/{name}", target)
        except s3_errors() as exc:
            raise OSError(f"s3://{self.store.bucket}/{self.prefix}/{name}: {exc}") from None


def _entries(text: bytes, manifest: Manifest, where: str) -> list[dict[str, Any]]:
    """The units of one output's ``units.json``, if it is the one its manifest lists."""
    if hashlib.sha256(text).hexdigest() != manifest.files.get(UNITS):
        log.warning("%s: does not match its manifest; not reusing its units", where)
        return []
    try:
        return list(json.loads(text)["units"])
    except (ValueError, KeyError, TypeError):
        log.warning("%s: not a readable unit list; not reusing its units", where)
        return []


class EarlierUnits:
    """The units of every finished output under ``outputs`` (``<store>/<stage>``; "" for none)."""

    def __init__(self, outputs: str = ""):
        self.outputs = outputs.rstrip("/")
        self._found: dict[str, tuple[dict[str, Any], Any]] = {}
        if self.outputs.startswith("s3://"):
            self._load_s3()
        elif self.outputs and Path(self.outputs).is_dir():
            self._load_local(Path(self.outputs))

    @classmethod
    def beside(cls, work: str) -> EarlierUnits:
        """For a stage whose work location is ``<store>/<stage>/.units-<key>`` (``executor.work_location``)."""
        return cls(work.rstrip("/").rpartition("/")[0] if work else "")

    def __len__(self) -> int:
        return len(self._found)

    def _add(self, entries: list[dict[str, Any]], output: Any) -> None:
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                self._found.setdefault(entry["key"], (entry, output))

    def _load_local(self, root: Path) -> None:
        for directory in sorted(root.iterdir()):
            listed = directory / UNITS
            if directory.name.startswith(".") or not (directory / MANIFEST).is_file() or not listed.is_file():
                continue
            try:
                manifest = read_manifest(directory)
            except ArtifactError as exc:
                log.warning("%s: %s; not reusing its units", directory, exc)
                continue
            self._add(_entries(listed.read_bytes(), manifest, str(listed)), _LocalOutput(directory, manifest))

    def _load_s3(self) -> None:
        from stages.storage.s3 import as_error, s3_errors
        from stages.storage.stores import S3Store

        store_uri, _, stage = self.outputs.rpartition("/")
        store = S3Store(store_uri)
        folder = f"{store.prefix}/{stage}/" if store.prefix else f"{stage}/"
        try:
            pages = store.client.get_paginator("list_objects_v2").paginate(
                Bucket=store.bucket, Prefix=folder, Delimiter="/"
            )
            keys = [p["Prefix"][len(folder) :].strip("/") for page in pages for p in page.get("CommonPrefixes", [])]
            for key in sorted(k for k in keys if k and not k.startswith(".")):
                manifest = store.find(stage, key)
                if manifest is None or UNITS not in manifest.files:
                    continue
                prefix = store.files_prefix(manifest)
                text = store.client.get_object(Bucket=store.bucket, Key=f"{prefix}/{UNITS}")["Body"].read()
                self._add(
                    _entries(text, manifest, f"s3://{store.bucket}/{prefix}/{UNITS}"),
                    _S3Output(store, manifest, prefix),
                )
        except s3_errors() as exc:
            raise as_error(exc, "read earlier data outputs", self.outputs) from None

    def take(self, key: str, index: int, out: Path) -> dict[str, Any] | None:
        """Unit ``key``'s files, copied into ``out`` as unit ``index``'s, and its result; None when no
        earlier output has it (or its files could not be had intact: then nothing is left in ``out``)."""
        found = self._found.get(key)
        if found is None:
            return None
        entry, output = found
        result, names = renumbered(entry, index)
        try:
            for old, new in names.items():
                output.fetch(old, out / new)
                if sha256_file(out / new) != output.manifest.files.get(old):
                    raise OSError(f"{old} does not match its manifest")
        except OSError as exc:
            log.warning("data: unit %d: could not reuse %s (%s); computing it", index, key, exc)
            for new in names.values():
                (out / new).unlink(missing_ok=True)
            return None
        return {**result, "unit": index, "reused": True, "placed": True}
