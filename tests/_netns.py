"""Machines for multi-node tests: Linux network namespaces that look like separate hosts.

Each "node" is a network namespace with its own interface and address on a private bridge, its
own hosts file (``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``) and
its own hostname (a UTS namespace per command) — what pods or VMs have. They share this machine's
filesystem, so a store directory is one that every node sees, as a shared volume would be.

    with Nodes(2) as nodes:
        node = nodes.popen(0, [sys.executable, "-m", "stages", ...], env=env, log=path)

Needs root (``ip netns``), which CI has; ``unavailable()`` says why not elsewhere. Addresses are
192.168.251.0/24 on a bridge this harness makes: no traffic leaves the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SUBNET = "192.168.251"
NETNS_ETC = Path("/etc/netns")


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "unshare", "hostname") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (iproute2, util-linux, hostname)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Nodes:
    """``count`` nodes named ``node1``…, at ``192.168.251.1``…, on one bridge (names unique per process)."""

    def __init__(self, count: int):
        self.count = count
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"gpbr{tag}"
        self.namespaces = [f"gpn{tag}x{i + 1}" for i in range(count)]
        self.hostnames = [f"node{i + 1}" for i in range(count)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]

    def __enter__(self) -> Nodes:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{address} {name}\n" for address, name in zip(self.addresses, self.hostnames)
        )
        for i, ns in enumerate(self.namespaces):
            veth = f"{ns}v"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)

    def command(self, node: int, argv: list[str]) -> list[str]:
        """``argv`` run on node ``node`` (0-based): in its namespace, under its own hostname."""
        ns, name = self.namespaces[node], self.hostnames[node]
        return ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]

    def popen(self, node: int, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start ``argv`` on ``node`` in a session of its own, its output to ``log``."""
        with open(log, "wb") as out:
            return subprocess.Popen(
                self.command(node, argv), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def close(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
