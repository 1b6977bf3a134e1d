"""An even sample of a corpus: the documents with the smallest content hashes that fit a budget.

Picking by hash rather than by position spreads a capped sample over the whole corpus, not its
alphabetical start, and keeps it the same for the same text. ``HashSample`` keeps such a sample
while streaming, in memory bounded by the budget; ``sample_for_training`` takes one from a list.
The tokenizer stage trains on one and measures compression on another (its held-out documents).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from stages.storage.splits import content_score

_SAMPLE_KEY = b"train-sample"


def sample_score(text: str) -> float:
    """The hash order of a training sample: smaller is picked first."""
    return content_score(text, _SAMPLE_KEY)


def sample_for_training(documents: Sequence[str], budget: int) -> list[str]:
    """At most ``budget`` UTF-8 bytes of documents, picked in hash order so a capped sample spans
    the whole corpus rather than its alphabetical start."""
    order = sorted(range(len(documents)), key=lambda i: sample_score(documents[i]))
    chosen, used = [], 0
    for i in order:
        size = len(documents[i].encode("utf-8"))
        if used + size > budget:
            if used == 0:  # one huge document: take its start rather than nothing
                chosen.append(documents[i].encode("utf-8")[:budget].decode("utf-8", errors="ignore"))
            break
        chosen.append(documents[i])
        used += size
    return chosen


class HashSample:
    """The documents with the smallest hashes whose sizes fit in ``budget`` bytes, kept while streaming.

    Equal to ``sample_for_training`` on the whole list (the longest prefix of the hash order that
    fits), in memory bounded by the budget: a max-heap holds the chosen prefix; a document that
    pushes it over the budget evicts the largest hashes, and nothing hashing above an evicted
    document can ever enter again (a prefix that did not fit before cannot fit now).
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.heap: list[tuple[float, int, str, int]] = []  # (-score, -ordinal, text, size)
        self.used = 0
        self.limit: tuple[float, int] | None = None  # (score, ordinal) of the first eviction
        self.first: tuple[float, int, str] | None = None  # smallest-hash document, cut to the budget

    def offer(self, text: str, score: float, ordinal: int, size: int) -> None:
        if self.first is None or (score, ordinal) < self.first[:2]:
            cut = text if size <= self.budget else text.encode("utf-8")[: self.budget].decode("utf-8", errors="ignore")
            self.first = (score, ordinal, cut)
        if self.limit is not None and (score, ordinal) > self.limit:
            return
        heapq.heappush(self.heap, (-score, -ordinal, text, size))
        self.used += size
        while self.used > self.budget:
            negative, neg_ordinal, _, popped = heapq.heappop(self.heap)
            self.used -= popped
            self.limit = min(self.limit or (2.0, 0), (-negative, -neg_ordinal))

    def documents(self) -> list[str]:
        """The sample in hash order (as ``sample_for_training`` returns it)."""
        if not self.heap:
            return [self.first[2]] if self.first else []
        return [text for _, _, text, _ in sorted(self.heap, key=lambda item: (-item[0], -item[1]))]
