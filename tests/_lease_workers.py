"""Real processes racing for one key of a store (local directory or s3://), for tests/test_lease.py
and tests/integration/test_s3_store.py.

``race(uri, mode, ...)`` starts the workers, lets them all go at once (a file appears; each
polls it every half millisecond), collects one JSON line from each and only then lets them exit — so a winner is
alive, holding what it won, while the others try. Run as a script, this module is one worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def race(uri: str, mode: str, workdir: Path, count: int = 4, *args: str, env: dict | None = None) -> list[dict]:
    """``count`` workers doing ``mode`` on ``uri`` at the same moment; their reports, in start order."""
    go, done = workdir / "go", workdir / "done"
    for flag in (go, done):
        flag.unlink(missing_ok=True)
    environment = {**(env or os.environ), "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, uri, mode, str(go), str(done), str(i), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=environment,
        )
        for i in range(count)
    ]
    try:
        for worker in workers:  # every worker is spinning on the go file once it says so
            line = worker.stdout.readline().strip()
            assert line == "ready", (line, worker.stderr.read() if worker.poll() is not None else "")
        go.touch()
        reports = []
        for worker in workers:
            line = worker.stdout.readline()
            assert line, worker.stderr.read()
            reports.append(json.loads(line))
        done.touch()
        for worker in workers:
            assert worker.wait(60) == 0, worker.stderr.read()
        return reports
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def _manifest(work: Path, stage: str, key: str):
    from stages.storage.artifacts import Manifest, files_digest, hash_files

    files = hash_files(work)
    return Manifest(
        stage=stage, key=key, config={}, inputs={}, code_version="t", files=files, digest=files_digest(files)
    )


def main(uri: str, mode: str, go: str, done: str, index: str, *args: str) -> None:
    from stages.storage.lease import LeaseHolder
    from stages.storage.stores import open_store

    stage, key = "race", "k"
    store = open_store(uri)
    if mode in {"claim", "commit"}:
        store.find(stage, key)  # the first request (client set-up, connection) before the start
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.0005)
    if mode == "claim":  # args: lease_s
        lease = store.claim(stage, key, LeaseHolder.current(f"worker-{index}"), float(args[0]))
        report = {"won": lease is not None}
    elif mode == "scratch":
        work = store.scratch(stage, key)
        (work / f"mine-{index}.txt").write_text(index)
        report = {"scratch": str(work)}
    elif mode == "commit":  # args: "same" (every worker builds the same bytes) or "own"
        work = store.scratch(stage, key)
        (work / "out.txt").write_text("same output\n" if args[0] == "same" else f"output of worker {index}\n")
        mine = _manifest(work, stage, key)
        published = store.publish(work, mine)
        report = {"mine": mine.digest, "published": published.digest}
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(report), flush=True)
    while not os.path.exists(done):
        time.sleep(0.01)
    if mode == "scratch":  # each checks its own files survived the others, then cleans up
        assert (work / f"mine-{index}.txt").read_text() == index
        store.discard(work)


if __name__ == "__main__":
    main(*sys.argv[1:])
