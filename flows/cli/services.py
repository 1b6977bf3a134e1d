"""Local shared services without Docker: a Prefect server, an MLflow server and an S3 endpoint.

``gptpipe services up`` starts a small supervisor process in the background. The supervisor
starts three children on 127.0.0.1 — ``moto_server`` (S3 API, in memory), ``mlflow server``
(SQLite backend, artifacts proxied into ``s3://<bucket>/mlartifacts``) and ``prefect server``
— restarts any that dies, and stops them all when it receives SIGTERM (``services down``).
Everything lives under one directory (``--home``, default ``runs/services``)::

    state.json        ports, pids, bucket (written by the supervisor)
    env.sh            `source` it: PREFECT_API_URL, MLFLOW_TRACKING_URI, S3 endpoint, test keys
    logs/*.log        one log per service, plus supervisor.log
    prefect/ mlflow/  the servers' databases

moto keeps objects in memory: a restart empties the bucket (the supervisor re-creates it).
The Docker Compose equivalent with MinIO and Postgres lives in ``infra/``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from stages.core.errors import GptpipeError

DEFAULT_HOME = "runs/services"
DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000, "prefect": 4200}
START_ORDER = ("s3", "mlflow", "prefect")  # MLflow writes artifacts into the bucket: S3 first
# Placeholder keys for the local moto endpoint only; real AWS keys never pass through here.
LOCAL_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
MAX_RESTARTS = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this environment (prefect, mlflow, moto_server)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


@dataclass
class Layout:
    """Ports, bucket and paths of one services home."""

    home: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    bucket: str = "gptpipe"
    names: tuple[str, ...] = START_ORDER  # which services run (all three unless told otherwise)

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def prefect_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    def client_env(self) -> dict[str, str]:
        """What a gptpipe process (or a Prefect worker) needs to use these services."""
        return {
            "PREFECT_API_URL": self.prefect_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "AWS_ENDPOINT_URL_S3": self.s3_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            **LOCAL_KEYS,
        }

    def health_url(self, name: str) -> str:
        return {
            "s3": f"{self.s3_url}/",
            "mlflow": f"{self.mlflow_url}/health",
            "prefect": f"{self.prefect_url}/health",
        }[name]

    def command(self, name: str) -> list[str]:
        port = str(self.ports[name])
        if name == "s3":
            return [_bin("moto_server"), "-H", "127.0.0.1", "-p", port]
        if name == "mlflow":
            db = (self.home / "mlflow" / "mlflow.db").as_posix()
            return [
                _bin("mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                port,
                "-w",
                "1",
                "--backend-store-uri",
                f"sqlite:///{db}",
                "--artifacts-destination",
                f"s3://{self.bucket}/mlartifacts",
            ]
        return [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", port]

    def service_env(self, name: str) -> dict[str, str]:
        env = {**os.environ, **LOCAL_KEYS}
        if name == "mlflow":
            # The server proxies artifacts into the bucket; one job consumer keeps it light.
            env.update(MLFLOW_S3_ENDPOINT_URL=self.s3_url, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        if name == "prefect":
            env.update(PREFECT_HOME=str(self.home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
            env.pop("PREFECT_API_URL", None)
        return env

    def save(self, pids: dict[str, int], supervisor: int) -> None:
        state = {
            "ports": self.ports,
            "bucket": self.bucket,
            "pids": pids,
            "supervisor": supervisor,
            "services": list(self.names),
        }
        tmp = self.home / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        tmp.replace(self.home / "state.json")

    def write_env(self) -> Path:
        lines = [f"export {k}={v}" for k, v in self.client_env().items()]
        lines.append(f"# then: gptpipe run --set artifacts.store=s3://{self.bucket}/store")
        path = self.home / "env.sh"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


def load_state(home: Path) -> dict | None:
    path = home / "state.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as dead
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(url):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


# --------------------------------------------------------------------------- the supervisor


def create_bucket(layout: Layout) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=layout.s3_url,
        region_name="us-east-1",
        aws_access_key_id=LOCAL_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_KEYS["AWS_SECRET_ACCESS_KEY"],
    )
    names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if layout.bucket not in names:
        s3.create_bucket(Bucket=layout.bucket)


def supervise(layout: Layout, poll: float = 1.0) -> int:
    """Start the services, restart any that exits, stop them all on SIGTERM/SIGINT."""
    (layout.home / "logs").mkdir(parents=True, exist_ok=True)
    for sub in ("prefect", "mlflow"):
        (layout.home / sub).mkdir(exist_ok=True)
    children: dict[str, subprocess.Popen] = {}
    restarts = dict.fromkeys(layout.names, 0)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start(name: str) -> None:
        log = open(layout.home / "logs" / f"{name}.log", "ab")
        children[name] = subprocess.Popen(
            layout.command(name),
            env=layout.service_env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=layout.home,
        )
        log.close()
        if name == "s3":  # the bucket must exist before MLflow stores artifacts in it
            if wait_healthy(layout.health_url("s3"), 60, children[name]):
                create_bucket(layout)
        layout.save({n: p.pid for n, p in children.items()}, os.getpid())
        print(f"started {name} (pid {children[name].pid}) on port {layout.ports[name]}", flush=True)

    for name in layout.names:
        start(name)
    while not stopping:
        time.sleep(poll)
        for name in layout.names:
            if stopping or children[name].poll() is None:
                continue
            if restarts[name] >= MAX_RESTARTS:
                print(f"{name} exited {restarts[name]} times; not restarting (see logs/{name}.log)", flush=True)
                continue
            restarts[name] += 1
            print(
                f"{name} exited with {children[name].returncode}; restarting ({restarts[name]}/{MAX_RESTARTS})",
                flush=True,
            )
            start(name)
    for proc in children.values():  # SIGTERM, not SIGINT: a Prefect server may ignore the first SIGINT
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 15
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    (layout.home / "state.json").unlink(missing_ok=True)
    print("all services stopped", flush=True)
    return 0


# --------------------------------------------------------------------------- up / down / status


def _layout(home: Path, state: dict) -> Layout:
    names = tuple(state.get("services") or START_ORDER)
    return Layout(home, {k: int(v) for k, v in state["ports"].items()}, state["bucket"], names)


def up(
    home: str | Path = DEFAULT_HOME,
    ports: dict[str, int] | None = None,
    bucket: str = "gptpipe",
    timeout: float = 180.0,
    extra_env: dict[str, str] | None = None,
    names: tuple[str, ...] = START_ORDER,
) -> Layout:
    """Start the supervisor (unless one runs for ``home``) and wait until every service answers.

    A port of 0 picks a free one. Returns the layout (ports, URLs, client environment).
    """
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    state = load_state(home)
    if state and alive(state.get("supervisor")):
        layout = _layout(home, state)
    else:
        chosen = {**DEFAULT_PORTS, **(ports or {})}
        names = tuple(n for n in START_ORDER if n in names)
        layout = Layout(home, {k: (v or free_port()) for k, v in chosen.items()}, bucket, names)
        for name, port in layout.ports.items():
            if name not in layout.names:
                continue
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    raise GptpipeError(
                        f"services: port {port} for {name} is already in use; pick another with --{name}-port"
                    )
        (home / "logs").mkdir(exist_ok=True)
        log = open(home / "logs" / "supervisor.log", "ab")
        command = [
            sys.executable,
            "-m",
            "flows.cli.services",
            "supervise",
            "--home",
            str(home),
            "--bucket",
            bucket,
            "--services",
            ",".join(layout.names),
            *[f"--{k}-port={v}" for k, v in layout.ports.items()],
        ]
        supervisor = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(extra_env or {})},
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        log.close()
        layout.save({}, supervisor.pid)
    deadline = time.monotonic() + timeout
    for name in layout.names:
        if not wait_healthy(layout.health_url(name), max(1.0, deadline - time.monotonic())):
            raise GptpipeError(
                f"services: {name} did not become healthy at {layout.health_url(name)} within "
                f"{timeout:.0f}s; see {home / 'logs' / (name + '.log')}"
            )
    while time.monotonic() < deadline:  # the supervisor records pids once each service is set up
        state = load_state(home) or {}
        if all(state.get("pids", {}).get(name) for name in layout.names):
            break
        time.sleep(0.2)
    layout.write_env()
    return layout


def down(home: str | Path = DEFAULT_HOME, timeout: float = 30.0) -> bool:
    """Stop the supervisor and its services; True if something was running."""
    home = Path(home).expanduser().resolve()
    state = load_state(home)
    if not state:
        return False
    supervisor = state.get("supervisor")
    if alive(supervisor):
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.2)
    for pid in [supervisor, *state.get("pids", {}).values()]:  # whatever survived the grace period
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    (home / "state.json").unlink(missing_ok=True)
    return True


def status(home: str | Path = DEFAULT_HOME) -> dict[str, dict]:
    """``{service: {port, pid, running, healthy, url}}`` plus the supervisor."""
    home = Path(home).expanduser().resolve()
    state = load_state(home)
    if not state:
        return {}
    layout = _layout(home, state)
    report = {"supervisor": {"pid": state.get("supervisor"), "running": alive(state.get("supervisor"))}}
    for name in layout.names:
        pid = state.get("pids", {}).get(name)
        report[name] = {
            "port": layout.ports[name],
            "pid": pid,
            "running": alive(pid),
            "healthy": healthy(layout.health_url(name)),
            "url": layout.health_url(name),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.cli.services supervise --home DIR ...``: the supervisor's own entry point."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.cli.services")
    parser.add_argument("action", choices=["supervise"])
    parser.add_argument("--home", required=True)
    parser.add_argument("--bucket", default="gptpipe")
    parser.add_argument("--services", default=",".join(START_ORDER))
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=port)
    args = parser.parse_args(argv)
    ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
    names = tuple(n for n in START_ORDER if n in args.services.split(","))
    return supervise(Layout(Path(args.home).resolve(), ports, args.bucket, names))


if __name__ == "__main__":
    sys.exit(main())
