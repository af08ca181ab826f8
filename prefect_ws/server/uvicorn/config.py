"""Running the app under uvicorn with WebSocket settings that suit a fan-out stream."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from prefect_ws.server.app import create_app
from prefect_ws.server.uvicorn import logs
from prefect_ws.server.uvicorn.http import MAX_HEAD_BYTES, http_protocol
from prefect_ws.server.uvicorn.wsprotocol import websocket_protocol
from prefect_ws.settings import Settings


def uvicorn_config(settings: Settings, *, host: str, port: int, **overrides: Any) -> uvicorn.Config:
    """uvicorn's config for prefect-ws.

    permessage-deflate is off: ~200-byte JSON events gain little from it while it doubles CPU
    and memory per connection (measured on uvicorn 0.54 / websockets 16). Inbound frames are
    capped small: clients have nothing to send but pings. ``X-Forwarded-For`` is believed only
    from ``PREFECT_WS_FORWARDED_ALLOW_IPS`` (none by default): otherwise any client could pick
    the address its limits count against.
    """
    logs.install()
    forwarded = settings.forwarded_allow_ips
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        # websockets-sansio, answering unparsable handshakes, cutting off non-readers
        "ws": websocket_protocol(settings.max_lag_seconds),
        "ws_per_message_deflate": False,
        "ws_max_size": settings.max_inbound_bytes,
        "ws_ping_interval": settings.ping_interval,
        "ws_ping_timeout": settings.ping_timeout,
        "lifespan": "on",
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "timeout_graceful_shutdown": 5,
        # h11 with a deadline for every request's headers (slowloris), 431 and non-readers
        "http": http_protocol(
            header_deadline=settings.handshake_timeout, max_lag_seconds=settings.max_lag_seconds
        ),
        # Let h11 finish parsing header blocks well past the header check's limit, so that it
        # answers 431 with a reason; the protocol answers 431 past this.
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES + 1,
        "proxy_headers": bool(forwarded),
        "forwarded_allow_ips": ",".join(forwarded) if forwarded else None,
    }
    options.update(overrides)
    return uvicorn.Config(create_app(settings), **options)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(
    settings: Settings, *, host: str = "127.0.0.1", port: int | None = None, **overrides: Any
) -> Iterator[str]:
    """Serve in a background thread; yields the ``ws://host:port`` base URL. For demos and tests."""
    port = port or free_port(host)
    server = uvicorn.Server(uvicorn_config(settings, host=host, port=port, **overrides))
    thread = threading.Thread(target=server.run, name="prefect-ws-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"prefect-ws server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"ws://{host}:{port}" if ":" not in host else f"ws://[{host}]:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
