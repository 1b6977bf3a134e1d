"""Peak resident memory of this process and all its children, sampled in a background thread.

The data stages report it (and the benchmark and the memory-growth test read it) because the
promise is that memory does not grow with the corpus: the figure has to cover the worker
processes too, not only the stage's own process (``ru_maxrss`` would miss them).
"""

from __future__ import annotations

import threading

import psutil


def tree_rss(process: psutil.Process | None = None) -> int:
    """Resident bytes of ``process`` (default: this one) plus every live descendant."""
    process = process or psutil.Process()
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a worker that just exited
    return total


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.bytes``: the largest process-tree RSS seen."""

    def __init__(self, interval_s: float = 0.05, pid: int | None = None):
        self.interval_s = interval_s
        self.process = psutil.Process(pid)
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="gptpipe-rss", daemon=True)

    def _sample(self) -> None:
        while True:
            try:
                self.bytes = max(self.bytes, tree_rss(self.process))
            except psutil.NoSuchProcess:
                return
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakRSS:
        self.bytes = tree_rss(self.process)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def megabytes(self) -> float:
        return round(self.bytes / 2**20, 1)
