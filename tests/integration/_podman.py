"""Podman as a Docker engine for the container tests: config, local base image, build, socket.

Follows ``shared/docs/environment.md``: runc instead of crun, ulimits the host can grant, a
Debian base made by ``docker/local-base.sh`` (no registry here), the host's CA bundle passed to
the build as a secret, and the local CPU torch wheel put in the build context so the image does
not download a multi-GB CUDA build.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/debian-base:bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOCAL_WHEELS = Path("/opt/wheels")


def available() -> str | None:
    """Why the container tests cannot run here, or None when they can."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman buildah fuse-overlayfs slirp4netns debootstrap runc)"
    if os.geteuid() != 0:
        return "the container tests use rootful podman (run as root, as CI does)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (needed to make the local base image)"
    return None


def podman_env(home: Path) -> dict[str, str]:
    """Environment for podman commands: containers.conf with runc and ulimits this host allows."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 1_048_576 if hard == resource.RLIM_INFINITY else hard
    conf = home / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def run(env: dict[str, str], *command: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    done = subprocess.run(list(command), env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    return done


def torch_build_args() -> list[str]:
    """Build args for torch in the test image: the local CPU wheel (linked into docker/wheels/)
    when there is one, else the CPU index."""
    wheels = sorted(LOCAL_WHEELS.glob("torch-*+cpu-*.whl")) if LOCAL_WHEELS.is_dir() else []
    if not wheels:
        return ["TORCH_VARIANT=cpu"]
    wheel = wheels[-1]
    target = ROOT / "docker" / "wheels" / wheel.name
    if not target.exists():
        try:
            os.link(wheel, target)  # same file system: no copy
        except OSError:
            shutil.copy2(wheel, target)
    version = wheel.name.split("-")[1]
    return ["TORCH_VARIANT=cpu", "TORCH_INDEX_URL=", f"TORCH_SPEC=torch=={version}"]


def build_image(
    env: dict[str, str], tag: str, extra_secret_env: dict[str, str] | None = None, pip_conf: Path | None = None
) -> str:
    """Base image (cached), then the gptpipe image via docker/build.sh --engine podman."""
    run(env, str(ROOT / "docker" / "local-base.sh"), "--engine", "podman", "--tag", BASE_IMAGE, timeout=900)
    command = [str(ROOT / "docker" / "build.sh"), "--engine", "podman", "--base-image", BASE_IMAGE, "--tag", tag]
    for arg in torch_build_args():
        command += ["--build-arg", arg]
    if CA_BUNDLE.is_file():
        command += ["--ca-bundle", str(CA_BUNDLE)]
    if pip_conf is not None:
        command += ["--pip-conf", str(pip_conf)]
    started = time.monotonic()
    done = run({**env, **(extra_secret_env or {})}, *command, timeout=1800)
    print(f"image {tag} built in {time.monotonic() - started:.0f}s")
    return done.stderr


class PodmanService:
    """``podman system service`` on a unix socket: the Docker API the Prefect docker worker talks to."""

    def __init__(self, env: dict[str, str], socket: Path, log: Path):
        self.socket = socket
        self.url = f"unix://{socket}"
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", self.url], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while not socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not create {socket}; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
