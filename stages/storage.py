"""Artifact stores: where finished stage outputs live, keyed by ``<stage>/<key>/``.

A store only ever shows complete outputs. The local store builds an output in a hidden
temporary directory beside its final place and renames it when the manifest is written,
so a crash leaves a ``.tmp-*`` directory that nothing reads, never a half artifact.
An S3 store (uploads first, manifest last) slots in behind the same methods.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from stages.artifacts import MANIFEST, ArtifactRef, Manifest, read_manifest, verify
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
        parent = self.root / stage
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=parent))

    def commit(self, scratch: Path, manifest: Manifest) -> ArtifactRef:
        (scratch / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        final = self.location(manifest.stage, manifest.key)
        if final.exists():  # an older copy without a manifest, or a concurrent twin: replace it
            shutil.rmtree(final)
        scratch.rename(final)
        return self.ref(manifest)

    def discard(self, scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)

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
