"""Stop requests to a training run, however a platform delivers them, turned into one flag.

* Kubernetes eviction, ``docker``/``podman stop``: SIGTERM, then SIGKILL after a grace period;
* Modal, Ctrl-C: SIGINT;
* AWS spot: a notice at the instance-metadata ``spot/instance-action`` path, two minutes ahead;
* a machine that vanishes: SIGKILL — nothing to catch; the last periodic checkpoint is what lands.

``PreemptionGuard`` (entered by the training loop) catches SIGTERM and SIGINT and, when
``GPTPIPE_PREEMPTION_NOTICE_URL`` names a notice endpoint, polls it every
``GPTPIPE_PREEMPTION_POLL_S`` seconds (default 5) in a background thread, so a slow or dead
endpoint never holds up a step. Any of them sets the flag; the loop reads it at each step boundary,
writes a checkpoint and raises ``Preempted``, whose message says what stopped it and that a rerun
resumes. A second SIGINT raises ``KeyboardInterrupt`` at once (a person pressing Ctrl-C twice).
``forward_stop`` passes SIGTERM and SIGINT on to a stage running in a process of its own (torchrun).

A stop request is process-wide and never withdrawn: a process that was asked to stop is going
away, so nothing in it may start the work again (``stop_reason`` tells the flow's retry policy).
Signals reach only the main thread: elsewhere the guard installs no handler (the notice is still
polled), and a signal keeps its usual meaning.

This module imports no torch: the flow's retry policy and the CLI read it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from stages.core.errors import ConfigError, TrainingError

log = logging.getLogger("gptpipe.train")

NOTICE_URL_ENV = "GPTPIPE_PREEMPTION_NOTICE_URL"  # e.g. http://169.254.169.254/latest/meta-data/spot/instance-action
NOTICE_POLL_ENV = "GPTPIPE_PREEMPTION_POLL_S"
DEFAULT_POLL_S = 5.0  # what AWS recommends for the spot notice
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_reasons: list[str] = []  # why this process was asked to stop, oldest first


class Preempted(TrainingError):
    """A stop request (SIGTERM, SIGINT, a preemption notice) ended training after a checkpoint was
    written; rerunning resumes from it."""

    transient = True  # an orchestrator outside this process may retry: the retry resumes, it does not repeat


def request_stop(reason: str) -> None:
    """Record that this process was asked to stop (a signal's name, or the notice)."""
    _reasons.append(reason)


def stop_reason() -> str | None:
    """Why this process was asked to stop, or None; once set it stays set."""
    return _reasons[0] if _reasons else None


# --- the notice -------------------------------------------------------------------------------

# Instance-metadata endpoints are link-local: a proxy from the environment would only get in the way.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _metadata_token(url: str, timeout: float) -> str | None:
    """An IMDSv2 session token for an EC2 instance-metadata URL, or None (IMDSv1, or not EC2)."""
    parts = urlsplit(url)
    if "/latest/meta-data/" not in parts.path:
        return None
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.netloc}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
    )
    try:
        with _DIRECT.open(request, timeout=timeout) as answer:
            return answer.read(256).decode("ascii").strip() or None
    except (OSError, ValueError, UnicodeError):
        return None


def read_notice(url: str, timeout: float = 2.0) -> str | None:
    """The preemption notice at ``url`` as a reason line, or None while there is none.

    The EC2 ``spot/instance-action`` path answers 404 until the notice, then
    ``{"action": "terminate", "time": "2026-12-07T13:30:00Z"}``. An endpoint that does not
    answer is no notice: the next poll asks again.
    """
    token = _metadata_token(url, timeout)
    headers = {"X-aws-ec2-metadata-token": token} if token else {}
    try:
        with _DIRECT.open(urllib.request.Request(url, headers=headers), timeout=timeout) as answer:
            body = answer.read(4096)
    except (OSError, ValueError):  # urllib's HTTPError (the 404) and URLError are OSErrors
        return None
    try:
        notice = json.loads(body)
    except ValueError:
        notice = None
    if not isinstance(notice, dict):
        return f"a preemption notice from {url}"
    return f"a spot interruption notice ({notice.get('action', '?')} at {notice.get('time', '?')})"


def poll_interval() -> float:
    """``GPTPIPE_PREEMPTION_POLL_S`` in seconds (default 5)."""
    raw = os.environ.get(NOTICE_POLL_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_POLL_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{NOTICE_POLL_ENV}={raw!r}: use a number of seconds > 0 (default {DEFAULT_POLL_S:g})")
    return seconds


class NoticeWatcher:
    """Polls ``url`` every ``every_s`` seconds in a daemon thread; calls ``on_notice(reason)`` once."""

    def __init__(self, url: str, every_s: float, on_notice: Callable[[str], None]):
        self.url, self.every_s, self.on_notice = url, every_s, on_notice
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gptpipe-preemption-notice", daemon=True)

    def _watch(self) -> None:
        while not self._closed.is_set():
            reason = read_notice(self.url, timeout=min(2.0, self.every_s))
            if reason is not None and not self._closed.is_set():
                self.on_notice(reason)
                return
            self._closed.wait(self.every_s)

    def start(self) -> NoticeWatcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()  # a poll in flight ends within its timeout; the daemon thread never holds the exit


@contextlib.contextmanager
def forward_stop(child: subprocess.Popen) -> Iterator[None]:
    """SIGTERM and SIGINT to this process, recorded and passed on to ``child`` (the stage's own
    process: torchrun passes them to every rank, which checkpoints), while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: FrameType | None) -> None:
        request_stop(signal.Signals(signum).name)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


# --- the guard --------------------------------------------------------------------------------


class PreemptionGuard:
    """SIGTERM, SIGINT and the notice (with ``watch_notice``) as one flag, for the length of a ``with``."""

    def __init__(self, watch_notice: bool = True) -> None:
        self._previous: dict[int, Any] = {}
        self._seen: set[int] = set()
        self._watcher: NoticeWatcher | None = None
        self._url = os.environ.get(NOTICE_URL_ENV, "").strip() if watch_notice else ""
        self._every_s = poll_interval() if self._url else DEFAULT_POLL_S

    @property
    def requested(self) -> bool:
        return stop_reason() is not None

    @property
    def reason(self) -> str | None:
        return stop_reason()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        again = signum in self._seen
        self._seen.add(signum)
        request_stop(signal.Signals(signum).name)
        previous = self._previous.get(signum)
        if again and signum == signal.SIGINT:  # Ctrl-C twice: out now
            if callable(previous):
                previous(signum, frame)  # Python's own handler raises KeyboardInterrupt
            # Started with SIGINT ignored (a background job of a shell): no handler to chain to.
            raise KeyboardInterrupt

    def _notice(self, reason: str) -> None:
        log.warning("%s: stopping after this step", reason)
        request_stop(reason)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        if self._url:
            self._watcher = NoticeWatcher(self._url, self._every_s, self._notice).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
