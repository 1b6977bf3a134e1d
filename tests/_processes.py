"""Child servers for the tests that start their own (moto S3, the killable TCP proxy): start one
and wait until it answers, stop it. Shared by tests/integration/ and tests/reliability/."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start_process(
    command: list[str], health: str | None = None, env: dict | None = None, timeout: float = 90
) -> subprocess.Popen:
    """A child server; waits for its health URL (or a 'ready' line in its output) before returning.

    Its output goes to a log file, never a pipe: nobody reads a pipe while the tests run, and a
    server that logs every request (moto does) blocks in ``write`` once the 64 KiB pipe buffer is
    full, which hung every request thread and looked like an unreachable endpoint.
    """
    from flows.cli.services import wait_healthy

    log = tempfile.NamedTemporaryFile(prefix=f"{Path(command[0]).name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    log.close()
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    if health is not None:
        assert wait_healthy(health, timeout, proc), f"{command[0]} did not start: {_tail(proc)}"
    else:
        deadline = time.monotonic() + timeout
        while b"ready" not in proc.log_path.read_bytes().splitlines()[:1] and proc.poll() is None:
            assert time.monotonic() < deadline, f"{command[0]} printed no 'ready' line in {timeout:.0f} s"
            time.sleep(0.05)
        assert proc.poll() is None, f"{command[0]} exited {proc.returncode}: {_tail(proc)}"
    return proc


def _tail(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")[-2000:]  # type: ignore[attr-defined]


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.log_path.unlink(missing_ok=True)  # type: ignore[attr-defined]


def moto_command(port: int) -> list[str]:
    """A moto S3 server over HTTP on 127.0.0.1 (objects in memory)."""
    return [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]


# Headless Chromium as shared/docs/environment.md measured it: without the background-networking
# flags it keeps dialling Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
