"""Child servers for the tests that start their own (moto S3, the killable TCP proxy): start one
and wait until it answers, stop it. Shared by tests/integration/ and tests/reliability/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def start_process(
    command: list[str], health: str | None = None, env: dict | None = None, timeout: float = 90
) -> subprocess.Popen:
    """A child server; waits for its health URL (or a 'ready' line on stdout) before returning."""
    from flows.cli.services import wait_healthy

    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )
    if health is not None:
        assert wait_healthy(health, timeout, proc), (
            f"{command[0]} did not start: {proc.stdout.read()[-2000:] if proc.poll() is not None else ''}"
        )
    else:
        assert proc.stdout.readline().strip() == b"ready"
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


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
