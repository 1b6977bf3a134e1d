"""Leases and publication in the local store: real processes, real files, no mocks.

Of several runs after one content key, exactly one holds the key's lease and builds in its
resumable work directory; the others get private ones; a stale lease goes to exactly one
taker; and a commit never replaces a finished output (readers of it see nothing change).
The same races against S3 are in tests/integration/test_s3_store.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages.core.errors import ArtifactError
from stages.storage import lease as lease_module
from stages.storage.artifacts import Manifest, files_digest, hash_files, verify
from stages.storage.lease import STALE, LeaseHolder, LeaseLost, wait_for
from stages.storage.stores import LocalStore
from tests._lease_workers import ROOT, race

STAGE, KEY = "race", "k"  # the key the workers of tests._lease_workers race for
ELSEWHERE = LeaseHolder("gone", "another-host", 1)  # a holder whose process this machine cannot see


def build(store: LocalStore, text: str, key: str = KEY, lease=None) -> tuple[Path, Manifest]:
    """A work directory from ``store`` holding one file, and the manifest of it."""
    work = store.scratch(STAGE, key, lease)
    (work / "out.txt").write_text(text)
    files = hash_files(work)
    return work, Manifest(
        stage=STAGE, key=key, config={}, inputs={}, code_version="t", files=files, digest=files_digest(files)
    )


def wins(reports: list[dict]) -> int:
    return sum(report["won"] for report in reports)


def test_of_simultaneous_claims_exactly_one_wins(tmp_path):
    for attempt in range(3):
        reports = race(str(tmp_path / f"store-{attempt}"), "claim", tmp_path, 4, "30")
        assert wins(reports) == 1, reports


def test_a_stale_lease_is_taken_over_by_exactly_one_of_several_takers(tmp_path):
    store = LocalStore(tmp_path / "store")
    # A fresh lease is nobody else's: 30 s, so that no loaded machine turns it stale between the claims.
    assert store.claim(STAGE, "fresh", ELSEWHERE, lease_s=30) is not None
    assert store.claim(STAGE, "fresh", lease_s=30) is None, "a fresh lease is nobody else's"
    assert store.claim(STAGE, KEY, ELSEWHERE, lease_s=2) is not None
    time.sleep(2.5)  # no heartbeat for longer than its 2 s: stale
    reports = race(str(store.root), "claim", tmp_path, 4, "30")
    assert wins(reports) == 1, reports
    assert store.lease_holder(STAGE, KEY).run_id.startswith("worker-")


def test_a_holder_that_died_on_this_machine_is_taken_over_at_once_a_live_one_is_not(tmp_path):
    store = LocalStore(tmp_path / "store")
    script = (
        "import sys\nfrom stages.storage.stores import LocalStore\n"
        f"lease = LocalStore({str(store.root)!r}).claim({STAGE!r}, {KEY!r}, lease_s=600)\n"
        "print(lease is not None, flush=True)\nsys.stdin.readline()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "True"
        record = store.lease_holder(STAGE, KEY)
        assert record.pid == holder.pid and not record.stale()
        assert store.claim(STAGE, KEY) is None, "its 600 s have not run out and it lives"
        assert f"on {record.host} (pid {holder.pid}) for " in record.describe()
    finally:
        holder.kill()  # gone without releasing
        holder.wait()
    assert store.lease_holder(STAGE, KEY).stale(), "a dead process on this machine renews nothing"
    assert store.claim(STAGE, KEY) is not None


def test_a_holder_that_stopped_renewing_learns_it_lost_and_cannot_free_its_successor(tmp_path):
    store = LocalStore(tmp_path)
    first = store.claim(STAGE, KEY, LeaseHolder.current("first"), lease_s=0.2)
    first.renew()
    time.sleep(0.3)
    second = store.claim(STAGE, KEY, LeaseHolder.current("second"), lease_s=30)
    assert second is not None
    with pytest.raises(LeaseLost, match="now held by run second"):
        first.renew()
    assert not first.held()
    first.release()  # no longer its record: nothing happens
    assert store.lease_holder(STAGE, KEY).token == second.record.token
    second.release()
    assert store.lease_holder(STAGE, KEY) is None


def test_keep_alive_holds_a_short_lease_until_stopped(tmp_path):
    store = LocalStore(tmp_path)
    # 2 s, renewed every 0.67 s: short enough to outlive in the test, long enough that a loaded
    # machine (another pipeline running beside the suite) does not starve the renewing thread past it.
    lease = store.claim(STAGE, KEY, lease_s=2)
    with lease.keep_alive():
        time.sleep(3)
        assert store.claim(STAGE, KEY, lease_s=30) is None
        assert lease.held()
    time.sleep(2.5)
    assert store.claim(STAGE, KEY, lease_s=30) is not None
    assert not lease.held()


def test_wait_for_returns_the_holders_output_or_stale(tmp_path):
    store = LocalStore(tmp_path)
    lease = store.claim(STAGE, KEY, LeaseHolder.current("builder"), lease_s=60)  # no renewals: outlasts a slow build

    def build_then_publish():
        time.sleep(0.6)
        work, manifest = build(store, "built\n", lease=lease)
        store.publish(work, manifest)
        lease.release()

    seen: list = []
    builder = threading.Thread(target=build_then_publish)
    builder.start()
    result = wait_for(store, STAGE, KEY, 60, lambda holder, waited: seen.append((holder, waited)), first_poll_s=0.05)
    builder.join()
    assert result != STALE and result.digest == store.find(STAGE, KEY).digest
    assert seen and seen[0][0].run_id == "builder" and seen[-1][1] > seen[0][1]
    assert seen[0][0].describe().startswith("run builder on ")

    stalled = store.claim(STAGE, "k2", LeaseHolder.current("stalled"), lease_s=0.3)  # never renewed
    started = time.monotonic()
    assert wait_for(store, STAGE, "k2", 0.3, first_poll_s=0.05) == STALE
    assert time.monotonic() - started >= 0.2
    stalled.release()
    assert wait_for(store, STAGE, "k3", 0.3) == STALE, "nobody holds it and nothing is finished: claim it"


def test_two_writers_get_different_work_directories_and_neither_wipes_the_other(tmp_path):
    store, other = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "a")  # two writers of one store
    first = store.scratch(STAGE, KEY)
    (first / "checkpoints").mkdir()
    (first / "checkpoints" / "step_1").write_text("1")
    (first / "a.txt").write_text("a")
    second = other.scratch(STAGE, KEY)
    assert first == store.resume_dir(STAGE, KEY), "the lease holder builds in the resumable directory"
    assert second != first and second.name.startswith(f".work-{KEY}-") and list(second.iterdir()) == []
    (second / "b.txt").write_text("b")
    other.discard(second)
    assert not second.exists() and (first / "a.txt").read_text() == "a"
    store.discard(first)
    assert [p.name for p in first.iterdir()] == ["checkpoints"], "a failed attempt keeps its checkpoints"
    again = other.scratch(STAGE, KEY)  # the next attempt, once the lease is free: resumes there
    assert again == first and (again / "checkpoints" / "step_1").read_text() == "1"
    other.discard(again)

    reports = race(str(tmp_path / "b"), "scratch", tmp_path, 4)
    places = [Path(report["scratch"]) for report in reports]
    assert len(set(places)) == 4, places
    assert [p.name for p in places].count(f".work-{KEY}") == 1
    assert list((tmp_path / "b" / STAGE).iterdir()) == [], "each writer found its own files and removed them"


def test_concurrent_commits_of_one_key_publish_exactly_one_output(tmp_path):
    reports = race(str(tmp_path / "store"), "commit", tmp_path, 4, "own")
    published = {report["published"] for report in reports}
    assert len(published) == 1 and published <= {report["mine"] for report in reports}, reports
    store = LocalStore(tmp_path / "store")
    assert verify(store.location(STAGE, KEY)).digest in published
    assert [p.name for p in (store.root / STAGE).iterdir()] == [KEY], "the losers' copies are gone"
    assert store.lease_holder(STAGE, KEY) is None


def test_a_commit_to_a_finished_key_keeps_it_and_its_readers_see_nothing_change(tmp_path):
    store = LocalStore(tmp_path / "store")
    first = store.publish(*build(store, "first\n"))
    final = store.location(STAGE, KEY)
    identity = (final.stat().st_ino, (final / "out.txt").stat().st_ino)
    handle = open(final / "out.txt")  # a reader halfway through a file
    assert handle.read(2) == "fi"
    stop, errors = threading.Event(), []

    def read_all_the_time():
        while not stop.is_set():
            try:
                assert verify(final).digest == first.digest
            except Exception as exc:
                errors.append(exc)

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        work, second = build(store, "second\n")  # another run of the key, other bytes
        assert second.digest != first.digest
        assert store.publish(work, second).digest == first.digest
        assert not work.exists(), "the later copy is discarded"
        reports = race(str(store.root), "commit", tmp_path, 4, "own")
        assert {report["published"] for report in reports} == {first.digest}
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert handle.read() == "rst\n"
    handle.close()
    assert (final.stat().st_ino, (final / "out.txt").stat().st_ino) == identity, "the same directory and file"
    assert [p.name for p in (store.root / STAGE).iterdir()] == [KEY]


def test_a_writer_whose_lease_was_taken_over_neither_publishes_nor_wipes_its_successors_work(tmp_path):
    store, successor = LocalStore(tmp_path), LocalStore(tmp_path)
    lease = store.claim(STAGE, KEY, lease_s=0.2)  # and then it stalls: no renewals
    work, manifest = build(store, "old\n", lease=lease)
    time.sleep(0.3)
    taken = successor.claim(STAGE, KEY, LeaseHolder.current("successor"), lease_s=30)
    assert taken is not None
    resumed = successor.scratch(STAGE, KEY, taken)
    assert resumed == work, "the taker-over finds the resumable directory"
    (resumed / "new.txt").write_text("the successor's")
    with pytest.raises(LeaseLost, match="taken over; not publishing"):
        store.publish(work, manifest)
    store.discard(work)
    assert (resumed / "new.txt").read_text() == "the successor's" and store.find(STAGE, KEY) is None


def test_only_the_lease_holder_clears_a_directory_without_manifest_at_the_final_place(tmp_path):
    store, other = LocalStore(tmp_path), LocalStore(tmp_path)
    junk = store.location(STAGE, KEY)
    junk.mkdir(parents=True)
    (junk / "half.bin").write_bytes(b"\0")
    held = build(store, "holder\n")
    private = build(other, "private\n")
    with pytest.raises(ArtifactError, match="without manifest.json is in the way"):
        other.publish(*private)
    assert store.publish(*held).digest == held[1].digest
    assert other.publish(*private).digest == held[1].digest, "then it finds the holder's output"
    assert not private[0].exists() and [p.name for p in (tmp_path / STAGE).iterdir()] == [KEY]


# --- the nodes of one multi-node run ---------------------------------------------------------------


def test_the_nodes_of_one_run_share_its_claim_while_other_runs_still_wait(tmp_path):
    """Nodes of one torchrun rendezvous (one ``group``) hold the key together: the first claims, the
    others join and neither renew nor release; a run of another group, or of none, is kept out."""
    store = LocalStore(tmp_path)
    first = store.claim(STAGE, KEY, LeaseHolder.current(group="node1:29400/run-a"), lease_s=30)
    other_node = LeaseHolder("", "node2", 1, group="node1:29400/run-a")
    joined = store.claim(STAGE, KEY, other_node, lease_s=30)
    assert first is not None and not first.joined
    assert joined is not None and joined.joined and joined.held()
    assert store.claim(STAGE, KEY, LeaseHolder.current(group="node1:29400/run-b"), lease_s=30) is None
    assert store.claim(STAGE, KEY, LeaseHolder.current(), lease_s=30) is None, "single-flight between runs holds"

    work = store.resume_dir(STAGE, KEY)
    work.mkdir(parents=True)
    (work / "rank0-wrote-this").write_text("x")
    assert store.scratch(STAGE, KEY, joined) == work
    assert (work / "rank0-wrote-this").exists(), "a joining node does not clear the run's work directory"

    joined.renew()
    joined.release()
    assert first.held(), "only the claiming node releases"
    first.release()
    assert not joined.held()


def test_a_node_that_reruns_takes_over_its_dead_claim_and_the_other_node_stays_joined(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    group = "node1:29400/rerun"
    dead = store.claim(STAGE, KEY, LeaseHolder("", "node2", 1, group=group), lease_s=30)  # never renewed
    joined = store.claim(STAGE, KEY, LeaseHolder("", "node1", 2, group=group), lease_s=30)
    assert dead is not None and joined is not None and joined.joined
    # 31 s later, without waiting them out (a real clock would make "fresh, then stale" a race with load):
    later = time.time() + 31
    monkeypatch.setattr(
        lease_module, "time", SimpleNamespace(time=lambda: later, monotonic=time.monotonic, sleep=time.sleep)
    )
    taker = store.claim(STAGE, KEY, LeaseHolder.current(group=group), lease_s=30)
    assert taker is not None and not taker.joined, "the stale record is taken over, not joined"
    assert joined.held(), "the run still holds the key: the joined node may publish"
    assert store.lease_holder(STAGE, KEY).describe().startswith(f"a run (nodes of {group}) on ")
