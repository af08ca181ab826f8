"""Support for the delivery tests: publish straight to Redis, run servers, record WS/SSE streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from prefect_ws.backends import RedisBackend, create_backend
from prefect_ws.protocol.events import Draft, encode, frame_from_text
from prefect_ws.settings import Settings

VENV_BIN = Path(sys.executable).parent

# Test clients all come from 127.0.0.1: lift the per-address limits the guard applies.
OPEN_LIMITS: dict[str, Any] = {
    "max_connections_per_ip": 100_000,
    "max_connections": 100_000,
    "handshake_rate": "1000000/minute",
    "access_log": False,
}


def settings_for(url: str, prefix: str, **overrides: Any) -> Settings:
    return Settings(broadcast_url=url, redis_prefix=prefix, **{**OPEN_LIMITS, **overrides})


def new_run_id() -> str:
    return str(uuid.uuid4())


STEPS = ("prepare", "left", "right")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_draft(run_id: str, n: int, size: int = 0) -> Draft:
    """The n-th log line of a synthetic run; its step and level cycle so filters have work."""
    message = f"line {n}" + ("x" * max(0, size - 8) if size else "")
    return encode(
        run_id,
        "step_log",
        {
            "stepId": STEPS[n % 3],
            "level": LEVELS[n % 4],
            "message": message,
            "logger": "test",
        },
    )


def complete_draft(run_id: str) -> Draft:
    return encode(run_id, "run_complete", {"status": "completed", "duration": 1.0, "steps": {}})


async def publish_logs(
    backend: RedisBackend,
    run_id: str,
    count: int,
    *,
    batch: int = 50,
    pause: float = 0.0,
    start: int = 0,
    size: int = 0,
    complete: bool = True,
) -> None:
    """``count`` log events in batches (one Lua call each), then ``run_complete``."""
    for first in range(start, start + count, batch):
        last = min(first + batch, start + count)
        await backend.publish(run_id, [log_draft(run_id, n, size) for n in range(first, last)])
        if pause:
            await asyncio.sleep(pause)
    if complete:
        await backend.publish(run_id, [complete_draft(run_id)])


@contextlib.asynccontextmanager
async def redis_backend(settings: Settings) -> Any:
    """The backend of ``settings.broadcast_url`` (one Redis or a Redis Cluster), connected."""
    backend = create_backend(settings)
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.disconnect()


def stream_url(base: str, run_id: str, query: str = "") -> str:
    url = f"{base}/api/v2/workflows/runs/{run_id}/stream"
    return f"{url}?{query}" if query else url


def http_base(ws_base: str) -> str:
    return "http" + ws_base[2:]


@dataclass
class Received:
    """What one client saw: the hello frame, every event's seq (and text), how it ended."""

    hello: dict[str, Any] | None = None
    seqs: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    code: int | None = None
    reason: str | None = None
    asked: int = 0  # the `since` the client asked for

    def assert_exactly(self, first: int, last: int) -> None:
        assert self.seqs == list(range(first, last + 1)), _describe(self.seqs, first, last)


def _describe(seqs: list[int], first: int, last: int) -> str:
    expected = set(range(first, last + 1))
    got = set(seqs)
    dups = len(seqs) - len(got)
    missing = sorted(expected - got)[:10]
    extra = sorted(got - expected)[:10]
    return (
        f"expected {first}..{last}: got {len(seqs)} events, {dups} duplicates, "
        f"missing {missing}, unexpected {extra}, first {seqs[:3]}, last {seqs[-3:]}"
    )


async def receive(
    url: str,
    *,
    timeout: float = 60.0,
    open_timeout: float = 20.0,
    keep_text: bool = False,
    stop_after: int | None = None,
    received: Received | None = None,
) -> Received:
    """Read a WebSocket stream to its end (or ``stop_after`` events, then disconnect).

    ``open_timeout`` bounds the handshake alone; ``timeout`` the whole stream.
    """
    out = received or Received()
    async with asyncio.timeout(timeout):
        async with connect(
            url, compression=None, max_size=2**24, open_timeout=open_timeout
        ) as websocket:
            try:
                async for message in websocket:
                    assert isinstance(message, str)
                    if message.startswith('{"type":"hello"'):
                        assert out.hello is None, "hello must come once, first"
                        out.hello = json.loads(message)
                        continue
                    assert out.hello is not None, "an event before hello"
                    out.seqs.append(frame_from_text(message).seq)
                    if keep_text:
                        out.texts.append(message)
                    if stop_after is not None and len(out.seqs) >= stop_after:
                        # Drop the connection like a network failure would (a polite close
                        # would first wait for the frames already in flight).
                        websocket.transport.abort()
                        return out
            except ConnectionClosed:
                pass
            out.code = websocket.close_code
            out.reason = websocket.close_reason
    return out


@dataclass
class SseEvent:
    event: str | None
    id: str | None
    data: str


async def read_sse(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
    timeout: float = 60.0,
) -> tuple[int, list[SseEvent]]:
    """An SSE client: ``(status, events)``; stops at ``event: end`` or after ``stop_after`` ids."""
    events: list[SseEvent] = []
    async with asyncio.timeout(timeout):
        async with client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return response.status_code, [SseEvent("error", None, response.text)]
            kind: str | None = None
            ident: str | None = None
            data: list[str] = []
            async for line in response.aiter_lines():
                if line == "":
                    if data:
                        events.append(SseEvent(kind, ident, "\n".join(data)))
                        if kind == "end":
                            break
                        if stop_after is not None and sum(e.id is not None for e in events) >= (
                            stop_after
                        ):
                            break
                    kind, ident, data = None, None, []
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    kind = value
                elif name == "id":
                    ident = value
                elif name == "data":
                    data.append(value)
    return 200, events


# -- real server processes (`prefect-ws serve`) --------------------------------------------


class ServerProcess:
    """``prefect-ws serve`` in a subprocess, on its own port, with the test's prefix."""

    def __init__(self, broadcast_url: str, prefix: str, port: int, **env: str) -> None:
        self.port = port
        self.base = f"ws://127.0.0.1:{port}"
        self.http = f"http://127.0.0.1:{port}"
        self._env = {
            **os.environ,
            "PREFECT_WS_REDIS_PREFIX": prefix,
            "PREFECT_WS_MAX_CONNECTIONS_PER_IP": "100000",
            "PREFECT_WS_HANDSHAKE_RATE": "1000000/minute",
            "PREFECT_WS_ACCESS_LOG": "false",
            "PREFECT_WS_LOG_LEVEL": "WARNING",
            **env,
        }
        self._args = [
            str(VENV_BIN / "prefect-ws"),
            "serve",
            "--port",
            str(port),
            "--broadcast-url",
            broadcast_url,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()

    def start(self, timeout: float = 90.0) -> None:
        """Start and wait until /healthz answers 200 (a loaded machine takes seconds to import)."""
        self.proc = subprocess.Popen(
            self._args, env=self._env, stdout=subprocess.DEVNULL, stderr=self._log
        )
        deadline = time.monotonic() + timeout
        seen = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.log()
                raise RuntimeError(f"prefect-ws serve exited {self.proc.returncode}: {err[-2000:]}")
            try:
                health = httpx.get(f"{self.http}/healthz", timeout=1.0)
                if health.status_code == 200:
                    return
                seen = f"{health.status_code} {health.text[:200]}"
            except httpx.HTTPError as exc:
                seen = repr(exc)
            time.sleep(0.1)
        self.stop()  # never leave it running (with --workers, its workers too)
        raise RuntimeError(f"prefect-ws serve not healthy within {timeout} s; last seen: {seen}")

    def log(self) -> str:
        if self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> str:
        """Terminate; return what it wrote to stderr (checked for tracebacks)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        err = self.log()
        self._log.close()
        return err


@contextlib.contextmanager
def servers(
    broadcast_url: str, prefix: str, count: int, **env: str
) -> Iterator[list[ServerProcess]]:
    from conftest import free_port

    procs = [ServerProcess(broadcast_url, prefix, free_port(), **env) for _ in range(count)]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@contextlib.contextmanager
def serve_app(settings: Settings) -> Iterator[tuple[str, Any]]:
    """uvicorn in a thread, like ``serve_in_thread``, but also yields the app (for its hub)."""
    import uvicorn
    from conftest import free_port

    from prefect_ws.server.uvicorn.config import running_in_thread, uvicorn_config

    port = free_port()
    config = uvicorn_config(settings, host="127.0.0.1", port=port)
    with running_in_thread(uvicorn.Server(config), name="delivery-test-server"):
        yield f"ws://127.0.0.1:{port}", config.app


def watchers(app: Any, run_id: str) -> int:
    """Clients the in-process hub holds for the run (0 when the run is not subscribed)."""
    channel = app.state.hub.runs.get(run_id)
    return len(channel.subscriptions) if channel is not None else 0
