"""Artifact stores: where finished stage outputs live, keyed by ``<stage>/<key>/``.

A store only ever shows complete outputs. The local store builds an output in a hidden
work directory (``.work-<key>``) beside its final place and renames it when the manifest is
written, so a crash leaves a hidden directory that nothing reads as finished, never a half
artifact. Only its ``checkpoints/`` survive, so a rerun resumes training where it stopped.

The S3 store (``s3://bucket/prefix``) builds in the same kind of local work directory, then
uploads every file and the manifest *last*: an output without its manifest is invisible to
``find``, so an upload cut short (endpoint down, process killed) is simply rebuilt next time.
Its local cache doubles as the materialized copy: downloads are verified against the
manifest's sha256 before a stage reads them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

from stages.core.errors import ArtifactError
from stages.storage.artifacts import CHECKPOINTS, MANIFEST, ArtifactRef, Manifest, read_manifest, verify


class Store(Protocol):
    def find(self, stage: str, key: str) -> Manifest | None: ...

    def ref(self, manifest: Manifest) -> ArtifactRef: ...

    def scratch(self, stage: str, key: str) -> Path: ...

    def commit(self, scratch: Path, manifest: Manifest) -> ArtifactRef: ...

    def discard(self, scratch: Path) -> None: ...

    def materialize(self, ref: ArtifactRef) -> Path: ...


class LocalStore:
    """A directory on local disk (or a mounted volume)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def location(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def find(self, stage: str, key: str) -> Manifest | None:
        final = self.location(stage, key)
        if not (final / MANIFEST).is_file():
            return None
        return read_manifest(final)

    def ref(self, manifest: Manifest) -> ArtifactRef:
        return ArtifactRef(manifest.stage, str(self.location(manifest.stage, manifest.key)), manifest.digest)

    def scratch(self, stage: str, key: str) -> Path:
        """The stage's work directory for this key: stable across attempts, so an interrupted
        stage finds its resumable ``checkpoints/`` again; anything else left by a crash is wiped."""
        work = self.root / stage / f".work-{key}"
        work.mkdir(parents=True, exist_ok=True)
        for leftover in work.iterdir():
            if leftover.name != CHECKPOINTS:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        return work

    def commit(self, scratch: Path, manifest: Manifest) -> ArtifactRef:
        (scratch / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        final = self.location(manifest.stage, manifest.key)
        if final.exists():  # an older copy without a manifest, or a concurrent twin: replace it
            shutil.rmtree(final)
        scratch.rename(final)
        return self.ref(manifest)

    def discard(self, scratch: Path) -> None:
        """Drop a failed attempt's files, keeping resumable checkpoints for the next attempt."""
        for leftover in scratch.iterdir() if scratch.is_dir() else ():
            if leftover.name != CHECKPOINTS or not any(leftover.iterdir()):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        if scratch.is_dir() and not any(scratch.iterdir()):
            scratch.rmdir()

    def materialize(self, ref: ArtifactRef) -> Path:
        path = Path(ref.uri)
        manifest = verify(path)
        if manifest.digest != ref.digest:
            raise ArtifactError(
                f"{path}: content digest {manifest.digest[:12]}… differs from the reference {ref.digest[:12]}…; "
                "the artifact was replaced — rerun the stage that produced it"
            )
        return path


def ref_from_path(path: str | Path) -> ArtifactRef:
    """Reference to an existing artifact (e.g. ``--input tokenizer=runs/store/...`` or ``s3://…/tokenizer/<key>``)."""
    if str(path).startswith("s3://"):
        uri = str(path).rstrip("/")
        parent, _, key = uri.rpartition("/")
        store_uri, _, stage = parent.rpartition("/")
        manifest = S3Store(store_uri).find(stage, key) if store_uri.startswith("s3://") else None
        if manifest is None:
            raise ArtifactError(
                f"{uri}: no finished artifact there (expected s3://bucket/prefix/<stage>/<key> with a manifest)"
            )
        return ArtifactRef(manifest.stage, uri, manifest.digest)
    directory = Path(path).expanduser().resolve()
    manifest = read_manifest(directory)
    return ArtifactRef(manifest.stage, str(directory), manifest.digest)


def default_s3_cache(uri: str) -> Path:
    """Where an S3 store keeps local copies: ``$GPTPIPE_S3_CACHE`` or ``~/.cache/gptpipe/s3``, per bucket/prefix."""
    from stages.storage.s3 import cache_root, split_uri

    bucket, prefix = split_uri(uri)
    return cache_root() / "stores" / bucket / (prefix or "_root")


class S3Store:
    """``s3://bucket/prefix``: outputs at ``<prefix>/<stage>/<key>/``, manifest uploaded last.

    Work directories and downloaded copies live in a local ``LocalStore`` (the cache), so a
    stage's resumable checkpoints and the atomic-rename rules are the same as on disk.
    """

    def __init__(self, uri: str, cache_dir: str | Path | None = None, client=None):
        from stages.storage import s3

        self.bucket, self.prefix = s3.split_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.cache = LocalStore(cache_dir or default_s3_cache(uri))
        self._client = client

    @property
    def client(self):
        from stages.storage import s3

        if self._client is None:
            self._client = s3.client()
        return self._client

    def _object(self, stage: str, key: str, rel: str = "") -> str:
        parts = [self.prefix, stage, key, rel] if self.prefix else [stage, key, rel]
        return "/".join(p for p in parts if p)

    def location(self, stage: str, key: str) -> str:
        return f"s3://{self.bucket}/{self._object(stage, key)}"

    def _fail(self, exc: BaseException, action: str, where: str) -> ArtifactError:
        from stages.storage.s3 import as_error

        return as_error(exc, action, where)

    def find(self, stage: str, key: str) -> Manifest | None:
        from stages.storage.s3 import is_missing, s3_errors

        name = self._object(stage, key, MANIFEST)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        except s3_errors() as exc:
            if is_missing(exc):
                return None
            raise self._fail(exc, "read the manifest", f"s3://{self.bucket}/{name}") from None
        return Manifest.from_json(body.decode("utf-8"), f"s3://{self.bucket}/{name}")

    def ref(self, manifest: Manifest) -> ArtifactRef:
        return ArtifactRef(manifest.stage, self.location(manifest.stage, manifest.key), manifest.digest)

    def scratch(self, stage: str, key: str) -> Path:
        return self.cache.scratch(stage, key)

    def discard(self, scratch: Path) -> None:
        self.cache.discard(scratch)

    def upload_file(self, path: Path, name: str) -> None:
        """One object (multipart above ``s3.MULTIPART_THRESHOLD``); a seam for tests that cut the line."""
        from stages.storage import s3

        self.client.upload_file(str(path), self.bucket, name, Config=s3.transfer_config())

    def commit(self, scratch: Path, manifest: Manifest) -> ArtifactRef:
        from stages.storage.s3 import s3_errors

        for rel in sorted(manifest.files):
            name = self._object(manifest.stage, manifest.key, rel)
            try:
                self.upload_file(scratch / rel, name)
            except s3_errors() as exc:
                raise self._fail(exc, "upload", f"s3://{self.bucket}/{name}") from None
        name = self._object(manifest.stage, manifest.key, MANIFEST)
        try:  # last: from this moment on the output exists for every reader
            self.client.put_object(
                Bucket=self.bucket, Key=name, Body=manifest.to_json().encode("utf-8"), ContentType="application/json"
            )
        except s3_errors() as exc:
            raise self._fail(exc, "upload", f"s3://{self.bucket}/{name}") from None
        self.cache.commit(scratch, manifest)  # the uploaded files become the local copy
        return self.ref(manifest)

    def _stage_key(self, ref: ArtifactRef) -> tuple[str, str]:
        from stages.storage.s3 import split_uri

        bucket, name = split_uri(ref.uri)
        expected = self._object(ref.stage, "")
        key = name[len(expected) :].strip("/") if name.startswith(expected) else ""
        if bucket != self.bucket or not key or "/" in key:
            raise ArtifactError(
                f"{ref.uri}: not an output of the store {self.uri}; pass a reference this store produced"
            )
        return ref.stage, key

    def materialize(self, ref: ArtifactRef) -> Path:
        """A verified local copy of ``ref``: the cached one if intact, else downloaded afresh."""
        from stages.storage.s3 import s3_errors

        stage, key = self._stage_key(ref)
        cached = self.cache.find(stage, key)
        if cached is not None and cached.digest == ref.digest:
            try:
                return self.cache.materialize(self.cache.ref(cached))
            except ArtifactError:
                pass  # damaged local copy: download it again
        manifest = self.find(stage, key)
        if manifest is None:
            raise ArtifactError(
                f"{ref.uri}: no {MANIFEST} in the bucket; the output is gone or unfinished — rerun stage '{stage}'"
            )
        if manifest.digest != ref.digest:
            raise ArtifactError(
                f"{ref.uri}: content digest {manifest.digest[:12]}… differs from the reference {ref.digest[:12]}…; "
                "the artifact was replaced — rerun the stage that produced it"
            )
        work = self.cache.root / stage / f".download-{key}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            for rel in sorted(manifest.files):
                target = work / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                name = self._object(stage, key, rel)
                try:
                    self.download_file(name, target)
                except s3_errors() as exc:
                    raise self._fail(exc, "download", f"s3://{self.bucket}/{name}") from None
            (work / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
            verify(work, manifest)  # sha256 of every file, before anything reads it
            final = self.cache.location(stage, key)
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return final

    def download_file(self, name: str, target: Path) -> None:
        from stages.storage import s3

        self.client.download_file(self.bucket, name, str(target), Config=s3.transfer_config())

    def list_outputs(self, stage: str) -> dict[str, bool]:
        """``{key: complete}`` for every output prefix of ``stage`` (complete = has a manifest)."""
        from stages.storage.s3 import s3_errors

        found: dict[str, bool] = {}
        base = self._object(stage, "") + "/"
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    key, _, rel = item["Key"][len(base) :].partition("/")
                    found[key] = found.get(key, False) or rel == MANIFEST
        except s3_errors() as exc:
            raise self._fail(exc, "list", f"s3://{self.bucket}/{base}") from None
        return found


def open_store(uri: str) -> Store:
    """The store for a recipe's ``artifacts.store`` value: a local directory or ``s3://bucket/prefix``."""
    if uri.startswith("s3://"):
        return S3Store(uri)
    return LocalStore(uri)


def describe_store(uri: str) -> str:
    """Where outputs go, for report cards: an s3:// URI as given, a local path resolved."""
    return uri.rstrip("/") if uri.startswith("s3://") else str(Path(uri).expanduser().resolve())
