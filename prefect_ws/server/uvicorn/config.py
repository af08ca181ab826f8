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
from prefect_ws.server.uvicorn.http import MAX_HEAD_BYTES, PrefectWsHttpProtocol, http_protocol
from prefect_ws.server.uvicorn.wsprotocol import PrefectWsProtocol, websocket_protocol
from prefect_ws.settings import Settings


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for prefect-ws, but for the app and its two protocol classes.

    permessage-deflate is off: ~200-byte JSON events gain little from it while it doubles CPU
    and memory per connection (measured on uvicorn 0.54 / websockets 16). Inbound frames are
    capped small: clients have nothing to send but pings. ``X-Forwarded-For`` is believed only
    from ``PREFECT_WS_FORWARDED_ALLOW_IPS`` (none by default): otherwise any client could pick
    the address its limits count against.
    """
    logs.install()
    forwarded = settings.forwarded_allow_ips
    return {
        "ws_per_message_deflate": False,
        "ws_max_size": settings.max_inbound_bytes,
        "ws_ping_interval": settings.ping_interval,
        "ws_ping_timeout": settings.ping_timeout,
        "lifespan": "on",
        "log_level": settings.log_level.lower(),
        "access_log": False,
        # On shutdown uvicorn closes every WebSocket with 1012 (service restart); clients
        # resume with since=<last seq> on any process.
        "timeout_graceful_shutdown": 5,
        # Let h11 finish parsing header blocks well past the header check's limit, so that it
        # answers 431 with a reason; the protocol answers 431 past this.
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES + 1,
        "proxy_headers": bool(forwarded),
        "forwarded_allow_ips": ",".join(forwarded) if forwarded else None,
    }


def protocol_classes(
    settings: Settings,
) -> tuple[type[PrefectWsHttpProtocol], type[PrefectWsProtocol]]:
    """uvicorn's HTTP and WebSocket protocols with the settings' deadlines: h11 with a deadline
    for every request's headers (slowloris), 431 and non-readers cut off; websockets-sansio
    answering unparsable handshakes and cutting off non-readers."""
    return (
        http_protocol(
            header_deadline=settings.handshake_timeout, max_lag_seconds=settings.max_lag_seconds
        ),
        websocket_protocol(
            settings.max_lag_seconds,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
        ),
    )


def uvicorn_config(settings: Settings, *, host: str, port: int, **overrides: Any) -> uvicorn.Config:
    """uvicorn's config for one prefect-ws process serving ``create_app(settings)``."""
    options = uvicorn_options(settings)
    options["http"], options["ws"] = protocol_classes(settings)
    options.update(host=host, port=port, **overrides)
    return uvicorn.Config(create_app(settings), **options)


def workers_config(
    settings: Settings, *, host: str, port: int, workers: int, **overrides: Any
) -> uvicorn.Config:
    """uvicorn's config for ``workers`` processes on one port (uvicorn's process supervisor).

    uvicorn binds the socket once and starts each worker as a fresh (spawned) process, passing
    it this config by pickling: the app factory and the HTTP protocol go by import string
    (:mod:`.worker`), and every worker reads its settings from the environment, which must
    hold the same ``PREFECT_WS_*`` values as ``settings``.
    """
    options = uvicorn_options(settings)
    # How long a new worker may take to be ready before a rolling restart gives up, and a
    # worker may take to answer the supervisor before it is killed: uvicorn's 5 s is less than
    # a worker's start-up (importing Prefect and the app) on a busy host.
    options["timeout_worker_healthcheck"] = 30
    options.update(host=host, port=port, workers=workers, factory=True, **overrides)
    options["http"] = "prefect_ws.server.uvicorn.worker:HttpProtocol"
    options["ws"] = "prefect_ws.server.uvicorn.worker:WebSocketProtocol"
    return uvicorn.Config("prefect_ws.server.uvicorn.worker:create_worker_app", **options)


def serve_workers(
    settings: Settings, *, host: str, port: int, workers: int, **overrides: Any
) -> None:
    """Run ``workers`` processes on ``host:port`` until SIGINT/SIGTERM (see workers_config).

    uvicorn's supervisor binds the socket once and shares it: the kernel hands each new
    connection to one worker, which then holds it; a dead worker is replaced; SIGHUP replaces
    them one by one, each new one ready before an old one stops.
    """
    from uvicorn.supervisors import Multiprocess

    config = workers_config(settings, host=host, port=port, workers=workers, **overrides)
    config.configure_logging()
    Multiprocess(config, sockets=[config.bind_socket()]).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_in_thread(server: uvicorn.Server, name: str = "prefect-ws-server") -> Iterator[None]:
    """Run ``server`` in a daemon thread for the block, from the moment it listens."""
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            config = server.config
            raise RuntimeError(f"prefect-ws server did not start on {config.host}:{config.port}")
        time.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_in_thread(
    settings: Settings, *, host: str = "127.0.0.1", port: int | None = None, **overrides: Any
) -> Iterator[str]:
    """Serve in a background thread; yields the ``ws://host:port`` base URL. For demos and tests."""
    port = port or free_port(host)
    server = uvicorn.Server(uvicorn_config(settings, host=host, port=port, **overrides))
    with running_in_thread(server):
        yield f"ws://{host}:{port}" if ":" not in host else f"ws://[{host}]:{port}"
