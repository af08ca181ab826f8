"""Support for attacking a real server: a uvicorn thread whose log lines are kept, raw sockets
that speak just enough HTTP/WebSocket to misbehave, and the server's own gauges."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import uvicorn
from conftest import free_port

from prefect_ws.backends.memory import MemoryBackend
from prefect_ws.protocol.events import Draft
from prefect_ws.server.uvicorn.config import running_in_thread, uvicorn_config
from prefect_ws.settings import Settings

# Loggers a server writes to; uvicorn's do not propagate to the root logger.
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "prefect_ws", "websockets", "")


class LogLines(logging.Handler):
    """Every record the server logs, formatted as an operator would read it (with tracebacks)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        kept_by = record.__dict__.setdefault("kept_by", set())
        if id(self) in kept_by:
            return  # seen on another logger it propagated through
        kept_by.add(id(self))
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def tracebacks(self, start: int = 0) -> list[str]:
        """Lines with a stack trace, from line ``start`` on (``len(lines)`` before an attack)."""
        return [line for line in self.lines[start:] if "Traceback (most recent call last)" in line]

    def server_errors(self, start: int = 0) -> list[str]:
        return [line for line in self.lines[start:] if line.startswith(("ERROR", "CRITICAL"))]


@dataclass
class RunningServer:
    host: str
    port: int
    settings: Settings
    app: Any
    server: uvicorn.Server
    log: LogLines = field(default_factory=LogLines)

    @property
    def ws(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"

    def gauge(self, transport: str) -> float:
        """``prefect_ws_connections_open`` for ``transport``, as /metrics shows it."""
        text = httpx.get(f"{self.http}/metrics", timeout=5, headers=self.admin).text
        match = re.search(
            rf'^prefect_ws_connections_open\{{transport="{transport}"\}} (\S+)$', text, re.M
        )
        return float(match.group(1)) if match else 0.0

    @property
    def admin(self) -> dict[str, str]:
        keys = self.settings.api_keys
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}

    def ws_transports(self) -> list[Any]:
        """The transports of the server's open WebSocket connections."""
        return [
            conn.transport
            for conn in list(self.server.server_state.connections)
            if hasattr(conn, "conn") and hasattr(conn, "writable")
        ]

    def publish(self, run_id: str, drafts: list[Draft]) -> None:
        """Publish to the in-process memory:// store the server reads."""
        import asyncio

        asyncio.run(MemoryBackend(self.settings.broadcast_url).publish(run_id, drafts))


@contextlib.contextmanager
def running_server(settings: Settings, **overrides: Any) -> Iterator[RunningServer]:
    """uvicorn in a thread with prefect-ws' config; every log line it writes is kept."""
    port = free_port()
    config = uvicorn_config(settings, host="127.0.0.1", port=port, **overrides)
    server = uvicorn.Server(config)
    running = RunningServer("127.0.0.1", port, settings, config.app, server)
    # After the config (uvicorn's log config replaces its loggers' handlers), before the start
    # (the app's start-up lines count too).
    loggers = [logging.getLogger(name) for name in SERVER_LOGGERS]
    for logger in loggers:
        logger.addHandler(running.log)
    try:
        with running_in_thread(server, name="attacked-server"):
            yield running
    finally:
        for logger in loggers:
            logger.removeHandler(running.log)


def rss() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)


# -- raw sockets ----------------------------------------------------------------------------------


def raw_socket(
    server: RunningServer, *, rcvbuf: int | None = None, timeout: float = 5
) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # before connect: the window is negotiated in the handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((server.host, server.port))
    return sock


def read_head(sock: socket.socket, limit: int = 65536) -> bytes:
    """The response head (up to the blank line), read byte by byte so that nothing after it
    (a WebSocket's first frames) is consumed; less if the server closes first."""
    data = bytearray()
    while not data.endswith(b"\r\n\r\n") and len(data) < limit:
        byte = sock.recv(1)
        if not byte:
            break
        data += byte
    return bytes(data)


def read_all(sock: socket.socket, deadline: float = 10) -> bytes:
    """Everything until the server closes (EOF or reset), bounded in time."""
    data = b""
    sock.settimeout(deadline)
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def ws_request(path: str, headers: dict[str, str] | None = None, host: str = "127.0.0.1") -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def ws_close_code(sock: socket.socket, deadline: float = 10) -> int | None:
    """Read a WebSocket's answer until its first close frame (or EOF): the close code."""
    data = b""
    sock.settimeout(deadline)
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while (code := close_code_of(data)) is None:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        else:
            return code
    return close_code_of(data)


def close_code_of(data: bytes) -> int | None:
    """The code of the first close frame in server bytes that follow a 101 head."""
    body = data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else data
    while len(body) >= 2:
        opcode, size = body[0] & 0x0F, body[1] & 0x7F
        offset = 2
        if size == 126:
            size, offset = struct.unpack("!H", body[2:4])[0], 4
        elif size == 127:
            size, offset = struct.unpack("!Q", body[2:10])[0], 10
        if len(body) < offset + size:
            return None  # incomplete
        if opcode == 0x8:
            return int(struct.unpack("!H", body[offset : offset + 2])[0]) if size >= 2 else 1005
        body = body[offset + size :]
    return None


def wait_for(check: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll ``check()`` until true; returns the seconds it took, fails with ``what`` otherwise."""
    started = time.monotonic()
    last: Any = None
    while time.monotonic() - started < timeout:
        last = check()
        if last is True:
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s (last seen: {last!r})")
