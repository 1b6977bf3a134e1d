"""Leases: which run builds a stage output, so two runs of one content key never build it together.

A lease is a small JSON record per ``(stage, key)``: who holds it (run id, host, pid), when it was
taken and when its holder last renewed it. Whoever holds it builds the output in the key's
resumable work directory (``store.resume_dir``); everybody else waits for the output
(``wait_for``) or, without a lease, builds in a private scratch directory of its own.

* **Claim** is one atomic create-if-absent — locally ``os.link`` of a finished record file (it
  fails when the name exists, also on NFS), on S3 ``PutObject`` with ``If-None-Match: *`` — so
  of any number of simultaneous claimers exactly one wins. Nothing sleeps and hopes.
* **Renew** (a heartbeat, every ``lease_s / 3`` from ``Lease.keep_alive()``) and **take over**
  replace the record only if it is still the one the caller read: locally under an ``flock``
  around read-check-replace (``os.replace`` of a whole new file), on S3 with ``If-Match: <ETag>``.
  Two takers of one stale lease therefore cannot both win, and a holder that lost its lease
  learns it at its next renewal (``LeaseLost``) instead of overwriting its successor.
* **Stale** means no heartbeat for the ``lease_s`` its holder claimed it with, or — for a holder
  on this very machine (same boot, same pid namespace) — its process is gone: a killed run is
  taken over at once, not ``lease_s`` later. Hosts are assumed to keep their clocks in step (NTP),
  i.e. skew far below ``lease_s``.
* **Release** deletes the record only if it is still ours (``If-Match`` on S3; under the flock
  locally).
* **Join**: the nodes of one multi-node run (torchrun's rendezvous across machines) are one run,
  not rivals. Their holders carry the same ``group`` (the rendezvous endpoint and id); the first
  node to arrive claims the key, every later node of the group *joins* that claim
  (``JoinedLease``: it neither renews nor releases — the claimer does), so all of them reach the
  rendezvous. A holder of another group, or of none, still waits: two runs stay single-flight.

Where the records live: ``<store>/.leases/<stage>/<key>.json`` (a local directory or the bucket
prefix), beside — never inside — the outputs and work directories.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from stages.core.errors import ArtifactError

if TYPE_CHECKING:
    from stages.storage.artifacts import Manifest

log = logging.getLogger("gptpipe.lease")

DEFAULT_LEASE_S = 60.0
LEASES = ".leases"
STALE: Literal["stale"] = "stale"


class LeaseLost(ArtifactError):
    """This run's lease was taken over (it stopped renewing for ``lease_s``) or removed."""


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds (or asks for) a lease: the pipeline run, and the process doing the work."""

    run_id: str
    host: str
    pid: int
    group: str = ""  # the nodes of one multi-node run share it, and with it the key's lease

    @classmethod
    def current(cls, run_id: str = "", group: str = "") -> LeaseHolder:
        return cls(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), group=group)


@dataclass(frozen=True)
class LeaseRecord:
    """The lease as stored: holder, times (``time.time()`` seconds) and a token unique to one claim."""

    stage: str
    key: str
    run_id: str
    host: str
    pid: int
    token: str
    lease_s: float
    started: float
    heartbeat: float
    pid_started: float = 0.0  # the holder process's start time, so a reused pid is not mistaken for it
    scope: str = ""  # machine + pid namespace of the holder: where its pid means something
    group: str = ""  # a multi-node run's rendezvous: its other nodes join this claim

    @property
    def holder(self) -> LeaseHolder:
        return LeaseHolder(self.run_id, self.host, self.pid, self.group)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> LeaseRecord:
        try:
            data = json.loads(text)
            return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
        except (ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(f"{source}: not a gptpipe lease record ({exc}); delete it to free the key") from None

    def stale(self, now: float | None = None) -> bool:
        """No heartbeat for the record's ``lease_s`` (its holder's promise), or the holder process is gone."""
        now = time.time() if now is None else now
        if now - self.heartbeat > self.lease_s:
            return True
        return self.scope == _scope() and _process_gone(self.pid, self.pid_started)

    def describe(self, now: float | None = None) -> str:
        """One line for a waiting run: ``run R on host H (pid P) for 3m12s, last heartbeat 4s ago``."""
        now = time.time() if now is None else now
        run = f"run {self.run_id}" if self.run_id else "a run"
        nodes = f" (nodes of {self.group})" if self.group else ""
        return (
            f"{run}{nodes} on {self.host} (pid {self.pid}) for {_duration(now - self.started)}, "
            f"last heartbeat {_duration(now - self.heartbeat)} ago"
        )


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@lru_cache(maxsize=1)
def _scope() -> str:
    """This machine's boot and pid namespace: two records with equal scope name comparable pids."""
    import psutil

    parts = [socket.gethostname(), str(int(psutil.boot_time()))]
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


def _process_started(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _process_gone(pid: int, started: float) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return bool(started) and abs(process.create_time() - started) > 1.0  # the pid was reused
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # not ours to inspect: assume it lives
        return False


# ------------------------------------------------------------------------------------ backends


class LeaseBackend(Protocol):
    """Compare-and-swap storage of lease records; ``version`` is an opaque revision (ETag, token)."""

    def where(self, stage: str, key: str) -> str: ...

    def read(self, stage: str, key: str) -> tuple[LeaseRecord, str] | None: ...

    def create(self, record: LeaseRecord) -> str | None:
        """Store ``record`` if no record exists; its version, or None if one did."""

    def replace(self, record: LeaseRecord, version: str) -> str | None:
        """Overwrite the record only if it is still at ``version``; the new version, or None."""

    def delete(self, stage: str, key: str, version: str) -> bool:
        """Remove the record only if it is still at ``version``."""


class LocalLeases:
    """Records as files under ``<root>/.leases/<stage>/``; the version of a record is its token."""

    def __init__(self, root: Path):
        self.root = Path(root) / LEASES

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.json"

    def where(self, stage: str, key: str) -> str:
        return str(self.path(stage, key))

    def read(self, stage: str, key: str) -> tuple[LeaseRecord, str] | None:
        path = self.path(stage, key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        record = LeaseRecord.from_json(text, str(path))
        return record, record.token

    def _staged(self, record: LeaseRecord) -> Path:
        """The record written in full to a private file beside its place (published by link/replace)."""
        folder = self.root / record.stage
        folder.mkdir(parents=True, exist_ok=True)
        staged = folder / f".{record.key}.{record.token}.{uuid.uuid4().hex[:8]}.tmp"
        with open(staged, "w", encoding="utf-8") as handle:
            handle.write(record.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        return staged

    @contextlib.contextmanager
    def _guard(self, stage: str) -> Iterator[None]:
        """Mutual exclusion for read-check-replace of this stage's records (held for microseconds;
        the kernel drops an ``flock`` when its process dies, so a crash never leaves it held)."""
        import fcntl

        folder = self.root / stage
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".guard", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def create(self, record: LeaseRecord) -> str | None:
        staged = self._staged(record)
        try:
            os.link(staged, self.path(record.stage, record.key))  # atomic: fails if the name exists
        except FileExistsError:
            return None
        finally:
            staged.unlink()
        return record.token

    def replace(self, record: LeaseRecord, version: str) -> str | None:
        staged = self._staged(record)
        try:
            with self._guard(record.stage):
                current = self.read(record.stage, record.key)
                if current is None or current[1] != version:
                    return None
                os.replace(staged, self.path(record.stage, record.key))
                return record.token
        finally:
            staged.unlink(missing_ok=True)

    def delete(self, stage: str, key: str, version: str) -> bool:
        with self._guard(stage):
            current = self.read(stage, key)
            if current is None or current[1] != version:
                return False
            self.path(stage, key).unlink()
            return True


class S3Leases:
    """Records as objects ``<prefix>/.leases/<stage>/<key>.json``; the version is the ETag.

    ``If-None-Match: *`` makes creation exclusive and ``If-Match`` makes renewal, takeover and
    release conditional on the record the caller read (S3 answers 412 PreconditionFailed, or 409
    ConditionalRequestConflict while another conditional write to the key is in flight).
    """

    def __init__(self, client: Callable[[], Any], bucket: str, prefix: str):
        self._client = client
        self.bucket = bucket
        self.prefix = prefix

    def name(self, stage: str, key: str) -> str:
        return "/".join(p for p in (self.prefix, LEASES, stage, f"{key}.json") if p)

    def where(self, stage: str, key: str) -> str:
        return f"s3://{self.bucket}/{self.name(stage, key)}"

    def _call(self, action: str, stage: str, key: str, **kwargs: Any) -> Any:
        """One request; None when a condition failed (412/409/404), ``S3Error`` for real trouble."""
        from stages.storage.s3 import as_error, s3_errors

        try:
            return getattr(self._client(), action)(Bucket=self.bucket, Key=self.name(stage, key), **kwargs)
        except s3_errors() as exc:
            if lost_condition(exc):
                return None
            raise as_error(exc, "update the lease", self.where(stage, key)) from None

    def read(self, stage: str, key: str) -> tuple[LeaseRecord, str] | None:
        answer = self._call("get_object", stage, key)
        if answer is None:
            return None
        return LeaseRecord.from_json(answer["Body"].read(), self.where(stage, key)), answer["ETag"]

    def _put(self, record: LeaseRecord, **condition: str) -> str | None:
        body = record.to_json().encode("utf-8")
        answer = self._call(
            "put_object", record.stage, record.key, Body=body, ContentType="application/json", **condition
        )
        return None if answer is None else answer["ETag"]

    def create(self, record: LeaseRecord) -> str | None:
        return self._put(record, IfNoneMatch="*")

    def replace(self, record: LeaseRecord, version: str) -> str | None:
        return self._put(record, IfMatch=version)

    def delete(self, stage: str, key: str, version: str) -> bool:
        return self._call("delete_object", stage, key, IfMatch=version) is not None


def lost_condition(exc: BaseException) -> bool:
    """S3's answer to a conditional request whose condition did not hold (or whose object is gone)."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code in {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"} or status in {409, 412}


# ------------------------------------------------------------------------------------ the lease


class LeasedStore(Protocol):
    @property
    def leases(self) -> LeaseBackend: ...


class Lease:
    """A held lease. ``renew()`` heartbeats, ``release()`` frees it, ``keep_alive()`` renews in the background."""

    joined = False  # True for a node that joined another node's claim of the same run (``JoinedLease``)

    def __init__(self, backend: LeaseBackend, record: LeaseRecord, version: str):
        self.backend = backend
        self.record = record
        self.version = version
        self.lost = False
        self._lock = threading.Lock()

    @property
    def stage(self) -> str:
        return self.record.stage

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def lease_s(self) -> float:
        return self.record.lease_s

    def __repr__(self) -> str:
        return f"Lease({self.backend.where(self.stage, self.key)}, {self.record.describe()})"

    def renew(self) -> None:
        """Heartbeat; raises ``LeaseLost`` if the record is no longer ours (taken over or deleted)."""
        with self._lock:
            if self.lost:
                raise LeaseLost(f"{self.backend.where(self.stage, self.key)}: this run no longer holds the lease")
            record = replace(self.record, heartbeat=time.time())
            version = self.backend.replace(record, self.version)
            if version is None:
                self.lost = True
                now = self.backend.read(self.stage, self.key)
                who = f"now held by {now[0].describe()}" if now else "the record is gone"
                raise LeaseLost(f"{self.backend.where(self.stage, self.key)}: lease lost ({who})")
            self.record, self.version = record, version

    def held(self) -> bool:
        """Whether the stored record is still this claim's (one read; False once lost)."""
        if self.lost:
            return False
        current = self.backend.read(self.stage, self.key)
        if current is None or not self._ours(current[0]):
            self.lost = True
        return not self.lost

    def _ours(self, stored: LeaseRecord) -> bool:
        """Whether the stored record is this claim: the same token."""
        return stored.token == self.record.token

    def release(self) -> None:
        """Free the key for the next run; does nothing if the lease was already lost."""
        with self._lock:
            if not self.lost:
                self.backend.delete(self.stage, self.key, self.version)
                self.lost = True  # nothing to renew any more

    def keep_alive(self, every_s: float | None = None) -> KeepAlive:
        """Renew every ``every_s`` (default ``lease_s / 3``) on a daemon thread until ``stop()``
        (or the end of a ``with`` block). A renewal that finds the lease lost stops the thread and
        leaves ``lease.lost`` set; a failed request (endpoint down) is retried at the next tick."""
        return KeepAlive(self, every_s if every_s is not None else self.lease_s / 3)


class JoinedLease(Lease):
    """Another node's claim, joined by a node of the same multi-node run (the same ``group``).

    The claiming node renews and releases the record; a joined node only checks that its group
    still holds the key (a node that reruns after a crash may have taken the record over, with a
    new token but the same group), so any node of the run may publish the output.
    """

    joined = True

    def renew(self) -> None:
        if not self.held():
            raise LeaseLost(f"{self.backend.where(self.stage, self.key)}: the run's lease is gone")

    def _ours(self, stored: LeaseRecord) -> bool:
        """Any claim of the same multi-node run counts (a rerun node may have taken it over)."""
        return stored.group == self.record.group

    def release(self) -> None:
        """Nothing to free: the node that claimed the key releases it."""


class KeepAlive:
    def __init__(self, lease: Lease, every_s: float):
        self.lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True, name=f"lease-{lease.key}")
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.lease.renew()
            except LeaseLost as exc:
                log.warning("%s", exc)
                return
            except Exception as exc:  # the store is unreachable for now: the next tick tries again
                log.warning("lease %s/%s: renewal failed (%s); retrying", self.lease.stage, self.lease.key, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> KeepAlive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def claim(
    store: LeasedStore, stage: str, key: str, holder: LeaseHolder, lease_s: float = DEFAULT_LEASE_S
) -> Lease | None:
    """The lease on ``(stage, key)`` for ``holder``, or None while another live holder has it.

    Free key: an exclusive create. Stale lease (see ``LeaseRecord.stale``): a conditional replace
    of exactly the stale record read, so of several takers one wins. A live lease of the
    holder's own ``group`` (another node of the same multi-node run): a ``JoinedLease`` on it.
    After winning, check ``store.find`` again: the previous holder may have published just
    before letting go.
    """
    backend = store.leases
    for _ in range(3):  # compare-and-swap retries: a record released or replaced under our feet
        now = time.time()
        record = LeaseRecord(
            stage=stage,
            key=key,
            run_id=holder.run_id,
            host=holder.host,
            pid=holder.pid,
            token=uuid.uuid4().hex,
            lease_s=float(lease_s),
            started=now,
            heartbeat=now,
            pid_started=_process_started(holder.pid) if holder.pid == os.getpid() else 0.0,
            scope=_scope() if holder.pid == os.getpid() else "",
            group=holder.group,
        )
        version = backend.create(record)
        if version is not None:
            return Lease(backend, record, version)
        current = backend.read(stage, key)
        if current is None:
            continue  # released between our create and read: try the create again
        found, found_version = current
        if not found.stale():
            if holder.group and found.group == holder.group:
                log.info("%s: joining the claim of %s", backend.where(stage, key), found.describe())
                return JoinedLease(backend, found, found_version)
            return None
        version = backend.replace(record, found_version)
        if version is not None:
            log.info("%s: took over the stale lease of %s", backend.where(stage, key), found.describe())
            return Lease(backend, record, version)
        # another taker replaced it first: read again, it is fresh now (or released)
    return None


def current_holder(store: LeasedStore, stage: str, key: str) -> LeaseRecord | None:
    """The lease record on ``(stage, key)``, stale or not; None if nobody holds it."""
    found = store.leases.read(stage, key)
    return None if found is None else found[0]


class FinderStore(LeasedStore, Protocol):
    def find(self, stage: str, key: str) -> Manifest | None: ...


def wait_for(
    store: FinderStore,
    stage: str,
    key: str,
    lease_s: float = DEFAULT_LEASE_S,
    on_progress: Callable[[LeaseRecord, float], None] | None = None,
    *,
    first_poll_s: float = 0.25,
    max_poll_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Manifest | Literal["stale"]:
    """Wait while another run holds the key: its finished manifest, or ``"stale"`` once nobody
    live holds the lease any more (its holder died, stopped renewing for its ``lease_s``, or gave
    up without publishing) — then ``claim`` it yourself. Polls with backoff from ``first_poll_s``
    up to ``max_poll_s`` (default ``lease_s / 4``, at most 10 s; ``lease_s`` is the lease length
    the runs use); ``on_progress(holder, waited_s)`` after each look at a live holder."""
    started = time.monotonic()
    delay = first_poll_s
    cap = max_poll_s if max_poll_s is not None else max(first_poll_s, min(10.0, lease_s / 4))
    while True:
        manifest = store.find(stage, key)
        if manifest is not None:
            return manifest
        holder = current_holder(store, stage, key)
        if holder is None or holder.stale():
            # A holder publishes, then releases: look once more so a just-finished output is not rebuilt.
            manifest = store.find(stage, key)
            return manifest if manifest is not None else STALE
        if on_progress is not None:
            on_progress(holder, time.monotonic() - started)
        sleep(delay)
        delay = min(cap, delay * 1.5)
