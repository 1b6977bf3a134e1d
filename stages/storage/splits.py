"""The train/val rule: which documents are held out, for the data stage's ``val`` split and the
tokenizer's held-out sample alike.

A document's side depends on its text alone: a keyed hash of the text is a number in [0, 1),
and the document goes to ``val`` when that number is below the fraction. So the split does not
depend on file order, work units or worker count, and duplicate documents never straddle it.

Neither side is left empty when there are two documents or more: if the hash holds out none,
the lowest-scoring document goes to ``val``; if it holds out all, the highest-scoring one stays
in ``train``. A stream learns that only at its end, so readers keep a ``Tally`` per part they
read (a work unit, or the whole stream) and, when ``SplitRule.repair`` names a part, read that
part again with the returned ``force``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SPLITS = ("train", "val")


def content_score(text: str, key: bytes) -> float:
    """A stable number in [0, 1) for ``text`` under ``key``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass
class Tally:
    """Where one part of a stream sent its documents, and its candidates for ``repair``:
    the (score, ordinal) of its lowest- and highest-scoring documents."""

    train: int = 0
    val: int = 0
    lowest: tuple[float, int] | None = None
    highest: tuple[float, int] | None = None

    def add(self, score: float, ordinal: int, split: str) -> None:
        setattr(self, split, getattr(self, split) + 1)
        if self.lowest is None or score < self.lowest[0]:
            self.lowest = (score, ordinal)
        if self.highest is None or score > self.highest[0]:
            self.highest = (score, ordinal)


@dataclass(frozen=True)
class SplitRule:
    """Documents scoring below ``fraction`` under ``key`` are held out (``val``)."""

    key: bytes
    fraction: float

    @classmethod
    def seeded(cls, seed: int, fraction: float) -> SplitRule:
        """The data stage's rule: keyed by ``data.seed``."""
        return cls(int(seed).to_bytes(8, "little", signed=True), fraction)

    def score(self, text: str) -> float:
        return content_score(text, self.key)

    def split(self, score: float, ordinal: int, force: Mapping[str, int] | None = None) -> str:
        """``"val"`` or ``"train"`` for the document at ``ordinal`` of its part; ``force`` (from
        ``repair``) overrides the rule for one document."""
        force = force or {}
        if ordinal == force.get("val"):
            return "val"
        if ordinal == force.get("train"):
            return "train"
        return "val" if score < self.fraction else "train"

    def repair(self, tallies: Sequence[Tally]) -> tuple[int, dict[str, int]] | None:
        """(index of the part to read again, its ``force``) when a side came out empty, else None.

        A fraction of 0 holds out nothing; one document stays in ``train``.
        """
        if self.fraction <= 0:
            return None
        val, train = sum(t.val for t in tallies), sum(t.train for t in tallies)
        if val == 0 and train >= 2:  # a small corpus: still hold out something
            part = min((i for i, t in enumerate(tallies) if t.lowest), key=lambda i: tallies[i].lowest[0])
            return part, {"val": tallies[part].lowest[1]}
        if train == 0 and val >= 1:
            part = max((i for i, t in enumerate(tallies) if t.highest), key=lambda i: tallies[i].highest[0])
            return part, {"train": tallies[part].highest[1]}
        return None
