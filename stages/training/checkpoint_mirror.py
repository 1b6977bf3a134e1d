"""Resumable checkpoints kept beside an ``s3://`` store, so a run resumes on another machine.

With a local store a training stage's checkpoints live in the key's work directory, which every
attempt (and every node of a shared filesystem) sees. With an ``s3://`` store that directory is in
the machine's local cache, which a platform that stops the machine takes with it: a Kubernetes
pod evicted, a container stopped and removed, a spot instance reclaimed. The mirror copies each
checkpoint the run writes to ``<store>/<stage>/.checkpoints-<key>/`` and, before a run resumes,
brings back the newest one when it is newer than what the machine has.

Layout: ``step_00000050/<files>`` and then the marker ``step_00000050.done``, written last, so a
copy interrupted halfway is never taken for a checkpoint. The mirror keeps the same newest
``keep`` checkpoints the local policy keeps, and is emptied once the stage has written its model.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

from stages.storage.s3 import ObjectDirectory
from stages.training import checkpoint_format as ckpt

log = logging.getLogger("gptpipe.train")

DONE = ".done"


def mirror_uri(store: str, stage: str, key: str) -> str | None:
    """Where the checkpoints of ``stage`` at ``key`` are mirrored: beside an ``s3://`` store's
    outputs, or None for a local store (its work directory is already the shared place)."""
    if not store.startswith("s3://"):
        return None
    return f"{store.rstrip('/')}/{stage}/.checkpoints-{key}"


class CheckpointMirror:
    """The checkpoints of one run at an ``s3://`` prefix."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.objects = ObjectDirectory(self.uri)

    def steps(self, names: list[str] | None = None) -> list[str]:
        """The names (``step_…``) of the complete checkpoints in the mirror (or among ``names``, a
        listing already made), oldest first."""
        names = self.objects.names() if names is None else names
        return sorted(name[: -len(DONE)] for name in names if name.endswith(DONE) and "/" not in name)

    def push(self, directory: Path, keep: int) -> None:
        """Copy the checkpoint ``directory`` up, mark it done, and drop all but the newest ``keep``."""
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            self.objects.put_file(path, f"{directory.name}/{path.relative_to(directory).as_posix()}")
        self.objects.put_text(directory.name + DONE, "")
        for old in self.steps()[:-keep]:
            self.objects.remove(old + DONE)  # unmarked first: a half-deleted copy is never resumed
            self.objects.remove_all(under=old)

    def pull_newer(self, root: Path) -> Path | None:
        """Bring the mirror's newest checkpoint into ``root`` when the machine has none as new; its
        local directory, or None when the machine is up to date (or the mirror is empty)."""
        names = self.objects.names()  # one listing for the steps and the newest one's files
        steps = self.steps(names)
        if not steps:
            return None
        newest = steps[-1]
        local = ckpt.list_checkpoints(root) if root.is_dir() else []
        if local and local[-1][1].name >= newest:
            return None
        staging = root / f".tmp-{newest}-{uuid.uuid4().hex[:8]}"  # pruned as a leftover if this stops halfway
        prefix = newest + "/"
        for name in names:
            if name.startswith(prefix):
                target = staging / name[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.objects.get_file(name, target)
        final = root / newest
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        log.info("checkpoint %s brought back from %s", newest, self.uri)
        return final

    def clear(self) -> None:
        """Remove every mirrored checkpoint (the stage's model is written: they have done their job)."""
        self.objects.remove_all()


def drop_checkpoints(local: Path, mirror: str | None) -> None:
    """Delete a run's resumable checkpoints, here and in its mirror: the stage's model is written."""
    shutil.rmtree(local)
    if mirror:
        CheckpointMirror(mirror).clear()
