"""``prefect-ws serve --workers N``: N processes on one port, one stream for every client.

A real ``prefect-ws serve`` with two workers under uvicorn's supervisor, real Redis, real
clients: clients spread over both workers see identical byte sequences; a rolling restart
(SIGHUP) and a shutdown (SIGTERM) close them with 1012, and they resume with ``since``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from typing import Any

import psutil
import pytest
from conftest import free_port
from delivery_support import (
    VENV_BIN,
    Received,
    ServerProcess,
    new_run_id,
    publish_logs,
    receive,
    redis_backend,
    settings_for,
    stream_url,
)

from prefect_ws.clients.follow import follow_messages
from prefect_ws.settings import Settings, available_cores

# Each worker is a fresh interpreter importing the app: on a loaded 2-core box, start-up alone
# has taken over 20 s.
STARTUP_SECONDS = 90.0


def _workers(server: ServerProcess) -> dict[int, int]:
    """Worker pid -> client connections it holds (the supervisor's children on the port)."""
    assert server.proc is not None
    out: dict[int, int] = {}
    for child in psutil.Process(server.proc.pid).children():
        try:
            conns = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        mine = [c for c in conns if c.laddr and c.laddr.port == server.port]
        if any(c.status == psutil.CONN_LISTEN for c in mine):
            out[child.pid] = sum(c.status == psutil.CONN_ESTABLISHED for c in mine)
    return out


async def _until(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last seen {value!r}")
        await asyncio.sleep(0.1)


class Follower:
    """A resuming client (``follow_messages``): every event's text, and each outage's code."""

    def __init__(self, base: str, run_id: str) -> None:
        self.texts: list[str] = []
        self.seqs: list[int] = []
        self.reconnects: list[int] = []
        self.task = asyncio.create_task(self._run(base, run_id))

    async def _run(self, base: str, run_id: str) -> None:
        def note(code: int, _reason: str) -> None:
            self.reconnects.append(code)

        async for text, event in follow_messages(base, run_id, wait=60, on_reconnect=note):
            self.texts.append(text)
            self.seqs.append(event["seq"])


@pytest.mark.timeout(300)
def test_two_workers_one_stream_and_a_rolling_restart_resumes(
    redis_url: str, redis_prefix: str
) -> None:
    settings = settings_for(redis_url, redis_prefix)
    server = ServerProcess(redis_url, redis_prefix, free_port(), PREFECT_WS_WORKERS="2")

    async def main() -> tuple[list[Follower], int, set[int]]:
        run_id = new_run_id()
        followers: list[Follower] = []
        # Connect until both workers serve some of the run's clients (the kernel picks).
        for _ in range(40):
            followers.append(Follower(server.base, run_id))
            await _until(lambda: sum(_workers(server).values()) == len(followers), "a connection")
            if len(followers) >= 6 and all(_workers(server).values()):
                break
        spread = _workers(server)
        assert len(spread) == 2 and all(spread.values()), spread
        restarted = asyncio.Event()
        async with redis_backend(settings) as backend:

            async def publish() -> int:
                """Log lines until the workers are replaced, 500 more, then run_complete."""
                count = 0
                while not restarted.is_set():
                    await publish_logs(backend, run_id, 10, start=count, complete=False)
                    count += 10
                    await asyncio.sleep(0.01)
                await publish_logs(backend, run_id, 500, start=count, batch=10, pause=0.01)
                return count + 500

            publishing = asyncio.create_task(publish())
            await asyncio.sleep(1.0)
            assert server.proc is not None
            server.proc.send_signal(signal.SIGHUP)  # replace the workers one by one
            await _until(lambda: not set(_workers(server)) & set(spread), "new workers", 150)
            restarted.set()
            events = await publishing
        await asyncio.wait_for(asyncio.gather(*(f.task for f in followers)), 60)
        return followers, events, set(_workers(server))

    try:
        server.start(timeout=STARTUP_SECONDS)
        followers, events, after = asyncio.run(main())
    finally:
        log = server.stop()
    assert len(after) == 2
    reference = followers[0]
    assert reference.seqs == list(range(1, events + 2))
    assert json.loads(reference.texts[-1])["type"] == "run_complete"
    for follower in followers:
        assert follower.texts == reference.texts  # identical bytes, whichever worker
        # Closed with 1012 (service restart) and resumed: once, or twice when it resumed on
        # the old worker that was replaced next.
        assert follower.reconnects in ([1012], [1012, 1012]), follower.reconnects
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.timeout(240)
def test_shutdown_closes_every_client_with_1012(redis_url: str, redis_prefix: str) -> None:
    settings = settings_for(redis_url, redis_prefix)
    server = ServerProcess(redis_url, redis_prefix, free_port(), PREFECT_WS_WORKERS="2")

    async def main() -> list[Received]:
        run_id = new_run_id()
        async with redis_backend(settings) as backend:
            await publish_logs(backend, run_id, 10, complete=False)  # a run still going
        outs = [Received() for _ in range(6)]
        clients = [
            asyncio.create_task(receive(stream_url(server.base, run_id), received=out))
            for out in outs
        ]
        await _until(lambda: all(len(out.seqs) == 10 for out in outs), "every client's replay")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        return list(await asyncio.wait_for(asyncio.gather(*clients), 30))

    try:
        server.start(timeout=STARTUP_SECONDS)
        results = asyncio.run(main())
        assert server.proc is not None
        assert server.proc.wait(timeout=30) == 0
    finally:
        log = server.stop()
    for result in results:
        assert result.code == 1012, (result.code, result.reason)  # resume with since=10
    assert "Traceback" not in log, log[-3000:]


def test_workers_refuse_memory_with_a_reason() -> None:
    out = subprocess.run(
        [str(VENV_BIN / "prefect-ws"), "serve", "--workers", "2", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=STARTUP_SECONDS,
        env={**os.environ, "PREFECT_WS_BROADCAST_URL": "memory://"},
    )
    assert out.returncode == 2
    assert "memory:// keeps each run inside one process" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_workers_setting() -> None:
    assert Settings().workers == 1
    assert Settings(workers="auto").workers == available_cores() >= 1
    assert Settings(workers="3").workers == 3
    with pytest.raises(ValueError, match="workers"):
        Settings(workers="0")
