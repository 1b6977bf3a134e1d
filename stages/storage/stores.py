"""Artifact stores: where finished stage outputs live, keyed by ``<stage>/<key>/``.

A store only ever shows complete outputs, and a finished output is immutable: nothing in
this module deletes, replaces or writes into it once its manifest is there. A commit that
finds its key already finished throws its own copy away and returns the manifest that is
there (two runs of one content key built the same thing; the first one to finish wins).

Local store, per stage::

    <key>/                          finished output (manifest.json written last)
    .work-<key>/                    the lease holder's work directory: stable across attempts,
                                    so its checkpoints/ resume a failed or killed attempt
    .work-<key>-<host>-<pid>-<rnd>/ a private work directory of a writer without the lease
    <root>/.leases/<stage>/<key>.json   who holds the key's lease (see ``stages.storage.lease``)

``scratch(stage, key)`` hands out ``.work-<key>`` only to the holder of the key's lease — the
caller's (``lease=``), or one it claims itself and keeps alive until ``commit``/``discard`` —
so no run ever wipes another's files; a writer that cannot get the lease builds in a private
directory nobody else touches (and resumes nothing). The holder wipes what a previous holder
left in ``.work-<key>`` except ``checkpoints/``, which it resumes from. Publication is one
``rename`` of the work directory onto ``<key>``, which fails (and is then a lost race, not an
error) when a finished ``<key>`` is already there.

S3 store (``s3://bucket/prefix``), per stage::

    <key>/manifest.json             written last, with If-None-Match: * (exactly one writer wins)
    <key>/<digest>/<file>           the files, under the digest of the manifest that lists them
    <prefix>/.leases/<stage>/<key>.json

Files go up under ``<digest>`` — the sha256 over the output's (path, sha256) list that the
manifest carries — not directly under ``<key>``. Two writers of one key therefore never write
different bytes to one object name: with identical outputs they write identical objects
(harmless, even under a reader); with different ones they write disjoint folders. The manifest
PUT is conditional, so exactly one writer publishes; a loser deletes its folder only when its
digest differs from the winner's, i.e. only objects that no published manifest lists. No copy
step, no pointer outside the manifest: a reader downloads ``<key>/<manifest.digest>/<file>``
(outputs written before this layout, with files directly under ``<key>/``, are read as they are).
An upload cut short leaves objects without a manifest, which ``find`` never reports; the next
attempt rebuilds. The store builds in a local work directory of its cache (a ``LocalStore``, with
the same per-machine leases and resumable checkpoints), which becomes the local copy on success;
downloads are verified against the manifest's sha256 before a stage reads them.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stages.core.errors import ArtifactError
from stages.storage.artifacts import CHECKPOINTS, MANIFEST, ArtifactRef, Manifest, read_manifest, verify
from stages.storage.lease import (
    DEFAULT_LEASE_S,
    KeepAlive,
    Lease,
    LeaseBackend,
    LeaseHolder,
    LeaseLost,
    LeaseRecord,
    LocalLeases,
    S3Leases,
    claim,
    current_holder,
    lost_condition,
)

log = logging.getLogger("gptpipe.store")


class Store(Protocol):
    def find(self, stage: str, key: str) -> Manifest | None: ...

    def ref(self, manifest: Manifest) -> ArtifactRef: ...

    @property
    def leases(self) -> LeaseBackend: ...

    def claim(
        self, stage: str, key: str, holder: LeaseHolder | None = None, lease_s: float | None = None
    ) -> Lease | None: ...

    def lease_holder(self, stage: str, key: str) -> LeaseRecord | None: ...

    def resume_dir(self, stage: str, key: str) -> Path: ...

    def scratch(self, stage: str, key: str, lease: Lease | None = None) -> Path: ...

    def publish(self, scratch: Path, manifest: Manifest) -> Manifest: ...

    def commit(self, scratch: Path, manifest: Manifest) -> ArtifactRef: ...

    def discard(self, scratch: Path) -> None: ...

    def materialize(self, ref: ArtifactRef) -> Path: ...


def _tag() -> str:
    """``<host>-<pid>-<random>``: a name no other writer (process, thread, machine) makes."""
    host = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _taken(exc: OSError) -> bool:
    """``rename`` onto a directory that exists and is not empty."""
    return exc.errno in {errno.EEXIST, errno.ENOTEMPTY}


def _clear(directory: Path, keep: str | None = None) -> None:
    for leftover in directory.iterdir():
        if leftover.name == keep and leftover.is_dir() and any(leftover.iterdir()):
            continue
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


@dataclass
class _Work:
    """A work directory this store handed out: its key, and the lease that makes it ours (None: private)."""

    stage: str
    key: str
    lease: Lease | None
    keep_alive: KeepAlive | None = None  # set when the store claimed the lease itself

    def still_held(self) -> bool:
        try:
            return self.lease is not None and self.lease.held()
        except Exception:  # cannot tell (store unreachable): treat the directory as not ours
            return False


class LocalStore:
    """A directory on local disk (or a mounted volume)."""

    def __init__(self, root: str | Path, lease_s: float = DEFAULT_LEASE_S):
        self.root = Path(root).expanduser().resolve()
        self.lease_s = lease_s
        self._work: dict[Path, _Work] = {}
        self._work_lock = threading.Lock()

    def location(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def find(self, stage: str, key: str) -> Manifest | None:
        final = self.location(stage, key)
        if not (final / MANIFEST).is_file():
            return None
        return read_manifest(final)

    def ref(self, manifest: Manifest) -> ArtifactRef:
        return ArtifactRef(manifest.stage, str(self.location(manifest.stage, manifest.key)), manifest.digest)

    # ------------------------------------------------------------------ leases and work directories

    @property
    def leases(self) -> LocalLeases:
        return LocalLeases(self.root)

    def claim(
        self, stage: str, key: str, holder: LeaseHolder | None = None, lease_s: float | None = None
    ) -> Lease | None:
        """The key's lease (see ``stages.storage.lease.claim``), or None while a live run holds it."""
        return claim(self, stage, key, holder or LeaseHolder.current(), lease_s or self.lease_s)

    def lease_holder(self, stage: str, key: str) -> LeaseRecord | None:
        return current_holder(self, stage, key)

    def resume_dir(self, stage: str, key: str) -> Path:
        """The lease holder's work directory: the same path for every attempt and every taker-over,
        so ``checkpoints/`` inside it resume whatever attempt stopped before."""
        return self.root / stage / f".work-{key}"

    def scratch(self, stage: str, key: str, lease: Lease | None = None) -> Path:
        """A work directory for building ``(stage, key)`` that no other run writes into or wipes.

        With the key's lease (``lease``, or one claimed here and renewed in the background until
        ``commit``/``discard``): ``resume_dir``, emptied of a previous attempt's files but for its
        ``checkpoints/`` (a node that joined another node's claim of its multi-node run leaves it
        as it is). Without it (a live run holds the lease): a new private directory.
        """
        keep_alive = None
        if lease is None:
            lease = self.claim(stage, key)
            keep_alive = lease.keep_alive() if lease is not None else None
        elif (lease.stage, lease.key) != (stage, key) or lease.backend.where(stage, key) != self.leases.where(
            stage, key
        ):
            raise ArtifactError(f"{lease!r} is not the lease of {self.root}/{stage}/{key}")
        elif lease.lost:
            raise LeaseLost(f"{lease!r}: lease lost; cannot build {stage}/{key} under it")
        if lease is not None:
            work = self.resume_dir(stage, key)
            work.mkdir(parents=True, exist_ok=True)
            if not lease.joined:  # the claiming node clears; a node that joined its run writes beside it
                _clear(work, keep=CHECKPOINTS)  # a previous holder's half output; its checkpoints resume
        else:
            work = self.root / stage / f".work-{key}-{_tag()}"
            work.mkdir(parents=True)
            log.info("%s/%s: another run holds the lease; building in the private %s", stage, key, work.name)
        with self._work_lock:
            self._work[work] = _Work(stage, key, lease, keep_alive)
        return work

    def _done(self, scratch: Path) -> _Work | None:
        """Forget ``scratch``; stop renewing and release the lease this store claimed for it."""
        with self._work_lock:
            work = self._work.pop(scratch, None)
        if work is not None and work.keep_alive is not None:
            work.keep_alive.stop()
            work.lease.release()
        return work

    # ------------------------------------------------------------------ publication

    def publish(self, scratch: Path, manifest: Manifest) -> Manifest:
        """Make ``scratch`` the finished output of its key; the manifest now at the key.

        That is ``manifest``, or — if the key was finished meanwhile by another run — the one
        already there, and ``scratch`` is deleted: a finished output is never replaced.
        Raises ``LeaseLost`` (leaving everything in place) if this run's lease was taken over,
        since the work directory is then its successor's.
        """
        work = self.ensure_held(scratch)
        (scratch / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        final = self.location(manifest.stage, manifest.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(scratch, final)  # atomic; refuses a non-empty target
            published = manifest
        except OSError as exc:
            if not _taken(exc):
                raise
            existing = self.find(manifest.stage, manifest.key)
            if existing is not None:  # finished by another run: keep it, drop our copy
                log.info("%s/%s: already finished by another run; keeping that output", manifest.stage, manifest.key)
                shutil.rmtree(scratch, ignore_errors=True)
                published = existing
            elif work is not None and work.lease is not None:
                # A directory without a manifest (nobody reads it as an output); only the lease
                # holder clears it, so two writers never both move things at the final place.
                self._move_away(final)
                os.rename(scratch, final)
                published = manifest
            else:
                raise ArtifactError(
                    f"{final}: a directory without {MANIFEST} is in the way of publishing {scratch.name}; "
                    "remove it and rerun"
                ) from None
        self._done(scratch)
        return published

    def commit(self, scratch: Path, manifest: Manifest) -> ArtifactRef:
        """``publish``, as a reference to the output now at the key."""
        return self.ref(self.publish(scratch, manifest))

    def ensure_held(self, scratch: Path) -> _Work | None:
        """Raise ``LeaseLost`` if ``scratch`` is the resumable directory of a lease since taken over."""
        with self._work_lock:
            work = self._work.get(scratch)
        if work is not None and work.lease is not None and not work.still_held():
            raise LeaseLost(
                f"{scratch}: the lease on {work.stage}/{work.key} was taken over; not publishing "
                "(the run holding it now builds this output)"
            )
        return work

    def _move_away(self, path: Path) -> None:
        trash = path.parent / f".trash-{path.name}-{_tag()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def discard(self, scratch: Path) -> None:
        """Drop a failed attempt's files. The lease holder's ``checkpoints/`` stay for the next attempt;
        a private directory goes whole; a directory whose lease was lost is left to its new holder."""
        with self._work_lock:
            work = self._work.get(scratch)
        if work is None:  # not handed out by this store object: the old rule, keep checkpoints
            if scratch.is_dir():
                _clear(scratch, keep=CHECKPOINTS)
                with_checkpoints = any(scratch.iterdir())
                if not with_checkpoints:
                    scratch.rmdir()
            return
        if work.lease is None:
            shutil.rmtree(scratch, ignore_errors=True)
        elif work.lease.joined:
            pass  # the directory of a multi-node run: the node that claimed the key tidies it
        elif work.still_held() and scratch.is_dir():
            _clear(scratch, keep=CHECKPOINTS)
            if not any(scratch.iterdir()):
                scratch.rmdir()
        self._done(scratch)

    def drop(self, scratch: Path) -> None:
        """Delete a work directory whose output is not needed (the key was finished by another run)."""
        with self._work_lock:
            work = self._work.get(scratch)
        if work is None or work.lease is None or work.still_held():
            shutil.rmtree(scratch, ignore_errors=True)
        self._done(scratch)

    def install(self, downloaded: Path, manifest: Manifest) -> Path:
        """Put a verified download at its key (a cache's copy); an intact copy already there stays."""
        final = self.location(manifest.stage, manifest.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                os.rename(downloaded, final)
                return final
            except OSError as exc:
                if not _taken(exc):
                    raise
            try:
                if verify(final).digest == manifest.digest:
                    shutil.rmtree(downloaded, ignore_errors=True)
                    return final
            except ArtifactError:
                pass
            self._move_away(final)  # a damaged or outdated local copy
        raise ArtifactError(f"{final}: could not install the downloaded copy (the place keeps changing); rerun")

    def materialize(self, ref: ArtifactRef) -> Path:
        path = Path(ref.uri)
        manifest = verify(path)
        if manifest.digest != ref.digest:
            raise ArtifactError(
                f"{path}: content digest {manifest.digest[:12]}… differs from the reference {ref.digest[:12]}…; "
                "the artifact was replaced — rerun the stage that produced it"
            )
        return path


def s3_output_manifest(uri: str) -> Manifest | None:
    """The manifest of the output at ``s3://bucket/prefix/<stage>/<key>``; None when there is none (only
    the manifest is read: no weights or shards are downloaded)."""
    parent, _, key = uri.rstrip("/").rpartition("/")
    store_uri, _, stage = parent.rpartition("/")
    return S3Store(store_uri).find(stage, key) if store_uri.startswith("s3://") else None


def ref_from_path(path: str | Path) -> ArtifactRef:
    """Reference to an existing artifact (e.g. ``--input tokenizer=runs/store/...`` or ``s3://…/tokenizer/<key>``)."""
    if str(path).startswith("s3://"):
        uri = str(path).rstrip("/")
        manifest = s3_output_manifest(uri)
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
    """``s3://bucket/prefix``: outputs at ``<prefix>/<stage>/<key>/``, manifest uploaded last and
    conditionally (see the module docstring for the layout).

    Work directories and downloaded copies live in a local ``LocalStore`` (the cache), so a
    stage's resumable checkpoints, its per-machine work-directory leases and the atomic-rename
    rules are the same as on disk. ``claim`` takes the key's lease in the bucket, for every machine.
    """

    def __init__(self, uri: str, cache_dir: str | Path | None = None, client=None, lease_s: float = DEFAULT_LEASE_S):
        from stages.storage import s3

        self.bucket, self.prefix = s3.split_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.cache = LocalStore(cache_dir or default_s3_cache(uri), lease_s=lease_s)
        self.lease_s = lease_s
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

    # ------------------------------------------------------------------ leases and work directories

    @property
    def leases(self) -> S3Leases:
        return S3Leases(lambda: self.client, self.bucket, self.prefix)

    def claim(
        self, stage: str, key: str, holder: LeaseHolder | None = None, lease_s: float | None = None
    ) -> Lease | None:
        """The key's lease in the bucket (see ``stages.storage.lease.claim``), or None while a live run holds it."""
        return claim(self, stage, key, holder or LeaseHolder.current(), lease_s or self.lease_s)

    def lease_holder(self, stage: str, key: str) -> LeaseRecord | None:
        return current_holder(self, stage, key)

    def resume_dir(self, stage: str, key: str) -> Path:
        """The local work directory whose ``checkpoints/`` resume on this machine (the cache's)."""
        return self.cache.resume_dir(stage, key)

    def scratch(self, stage: str, key: str, lease: Lease | None = None) -> Path:
        """A local work directory for ``(stage, key)``: the cache's resumable one if this process
        gets the machine-local lease on it, else a private one. ``lease`` (the bucket's lease, if
        the caller holds it) is checked, not needed: the local directory has its own lease."""
        if lease is not None and lease.backend.where(stage, key) != self.leases.where(stage, key):
            raise ArtifactError(f"{lease!r} is not the lease of {self.location(stage, key)}")
        return self.cache.scratch(stage, key)

    def discard(self, scratch: Path) -> None:
        self.cache.discard(scratch)

    # ------------------------------------------------------------------ publication

    def upload_file(self, path: Path, name: str) -> None:
        """One object (multipart above ``s3.MULTIPART_THRESHOLD``); a seam for tests that cut the line."""
        from stages.storage import s3

        self.client.upload_file(str(path), self.bucket, name, Config=s3.transfer_config())

    def publish(self, scratch: Path, manifest: Manifest) -> Manifest:
        """Upload ``scratch`` and publish it; the manifest now at the key (``manifest``, or the one
        another run published first — then our uploads are deleted unless they are that output's)."""
        from stages.storage.s3 import s3_errors

        stage, key = manifest.stage, manifest.key
        existing = self.find(stage, key)
        if existing is None:
            self.cache.ensure_held(scratch)  # the local directory is still ours, not a successor's
            uploaded = []
            for rel in sorted(manifest.files):
                name = self._object(stage, key, f"{manifest.digest}/{rel}")
                try:
                    self.upload_file(scratch / rel, name)
                except s3_errors() as exc:
                    raise self._fail(exc, "upload", f"s3://{self.bucket}/{name}") from None
                uploaded.append(name)
            self.cache.ensure_held(scratch)
            existing = self._put_manifest(manifest)  # last: from here on the output exists for every reader
            if existing is not None and existing.digest != manifest.digest:
                self._delete(uploaded)  # only objects no published manifest lists
        if existing is not None:
            log.info("%s: already finished by another run; keeping that output", self.location(stage, key))
            self.cache.drop(scratch)
            return existing
        try:
            self.cache.publish(scratch, manifest)  # the uploaded files become the local copy
        except LeaseLost:  # another process on this machine took the work directory: no local copy
            self.cache.discard(scratch)
        return manifest

    def commit(self, scratch: Path, manifest: Manifest) -> ArtifactRef:
        """``publish``, as a reference to the output now at the key."""
        return self.ref(self.publish(scratch, manifest))

    def _put_manifest(self, manifest: Manifest) -> Manifest | None:
        """PUT the manifest if none is there: None when ours is published, else the manifest that is."""
        from stages.storage.s3 import S3Error, s3_errors

        name = self._object(manifest.stage, manifest.key, MANIFEST)
        for attempt in range(5):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=name,
                    Body=manifest.to_json().encode("utf-8"),
                    ContentType="application/json",
                    IfNoneMatch="*",
                )
                return None
            except s3_errors() as exc:
                if not lost_condition(exc):
                    raise self._fail(exc, "upload", f"s3://{self.bucket}/{name}") from None
            # 412: a manifest is there (maybe ours, if a retried request had landed: same digest then).
            # 409: another conditional write was in flight; if it did not land, ours may.
            existing = self.find(manifest.stage, manifest.key)
            if existing is not None:
                return existing
            time.sleep(0.2 * (attempt + 1))
        raise S3Error(f"s3://{self.bucket}/{name}: conflicting writes kept the manifest from landing; rerun", True)

    def _delete(self, names: list[str]) -> None:
        from stages.storage.s3 import s3_errors

        try:
            for start in range(0, len(names), 1000):
                batch = [{"Key": name} for name in names[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        except s3_errors() as exc:  # garbage without a manifest: harmless, only untidy
            log.warning("%s: could not delete a discarded upload (%s)", self.uri, exc)

    # ------------------------------------------------------------------ reading

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

    def files_prefix(self, manifest: Manifest) -> str:
        """Where ``manifest``'s files are: ``<key>/<digest>``, or ``<key>`` for an output written
        before files went under their digest."""
        from stages.storage.s3 import s3_errors

        by_digest = self._object(manifest.stage, manifest.key, manifest.digest)
        try:
            listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=by_digest + "/", MaxKeys=1)
        except s3_errors() as exc:
            raise self._fail(exc, "list", f"s3://{self.bucket}/{by_digest}/") from None
        return by_digest if listed.get("KeyCount", 0) else self._object(manifest.stage, manifest.key)

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
        prefix = self.files_prefix(manifest) if manifest.files else ""
        work = self.cache.root / stage / f".download-{key}-{_tag()}"
        try:
            for rel in sorted(manifest.files):
                target = work / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                name = f"{prefix}/{rel}"
                try:
                    self.download_file(name, target)
                except s3_errors() as exc:
                    raise self._fail(exc, "download", f"s3://{self.bucket}/{name}") from None
            work.mkdir(parents=True, exist_ok=True)
            (work / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
            verify(work, manifest)  # sha256 of every file, before anything reads it
            return self.cache.install(work, manifest)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def download_file(self, name: str, target: Path) -> None:
        from stages.storage import s3

        self.client.download_file(self.bucket, name, str(target), Config=s3.transfer_config())


def open_store(uri: str) -> Store:
    """The store for a recipe's ``artifacts.store`` value: a local directory or ``s3://bucket/prefix``."""
    if uri.startswith("s3://"):
        return S3Store(uri)
    return LocalStore(uri)


def describe_store(uri: str) -> str:
    """Where outputs go, for report cards: an s3:// URI as given, a local path resolved."""
    return uri.rstrip("/") if uri.startswith("s3://") else str(Path(uri).expanduser().resolve())
