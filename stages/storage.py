"""Artifact stores: where finished stage outputs live, keyed by ``<stage>/<key>/``.

A store only ever shows complete outputs. The local store builds an output in a hidden
work directory (``.work-<key>``) beside its final place and renames it when the manifest is
written, so a crash leaves a hidden directory that nothing reads as finished, never a half
artifact. Only its ``checkpoints/`` survive, so a rerun resumes training where it stopped.
An S3 store (uploads first, manifest last) slots in behind the same methods.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

from stages.artifacts import CHECKPOINTS, MANIFEST, ArtifactRef, Manifest, read_manifest, verify
from stages.errors import ArtifactError


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
    """Reference to an existing local artifact directory (e.g. ``--input tokenizer=runs/store/...``)."""
    directory = Path(path).expanduser().resolve()
    manifest = read_manifest(directory)
    return ArtifactRef(manifest.stage, str(directory), manifest.digest)


def open_store(uri: str) -> Store:
    """The store for a recipe's ``artifacts.store`` value."""
    if uri.startswith("s3://"):
        raise ArtifactError(f"artifacts.store = {uri!r}: S3 stores are not available in this build yet; use a local path")
    return LocalStore(uri)
