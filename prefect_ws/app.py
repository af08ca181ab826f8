"""The serving side: a Starlette app with the stream endpoint and a health check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from prefect_ws import closecodes
from prefect_ws.auth import schedule_expiry
from prefect_ws.guard import protect
from prefect_ws.hub import Hub, StreamClosed, Subscription
from prefect_ws.pages import page_routes
from prefect_ws.settings import Settings, get_settings
from prefect_ws.transport import Transport, create_transport

logger = logging.getLogger("prefect_ws.server")

STREAM_PATH = "/api/v2/workflows/runs/{run_id:path}/stream"
MAX_SINCE = 2**53  # JSON-safe; larger is certainly not a seq we issued


class InvalidRequest(ValueError):
    """A client request that cannot be served as asked; the message says why."""


def parse_run_id(raw: str) -> str:
    """The canonical form of a run id (a Prefect flow run UUID), or :class:`InvalidRequest`."""
    if len(raw) > 64:
        raise InvalidRequest("invalid run id: expected a flow run UUID")
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise InvalidRequest("invalid run id: expected a flow run UUID") from None


def parse_since(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    if len(raw) > 20 or not raw.isdigit():
        raise InvalidRequest("invalid since: expected a non-negative integer seq")
    value = int(raw)
    if value > MAX_SINCE:
        raise InvalidRequest("invalid since: larger than any seq")
    return value


async def _read_until_disconnect(websocket: WebSocket, max_bytes: int) -> tuple[int, str] | None:
    """Clients have nothing to say but pings (answered by the server itself): drain and ignore."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        size = len(message.get("text") or "") + len(message.get("bytes") or b"")
        if size > max_bytes:
            return closecodes.MESSAGE_TOO_BIG, f"client frames are limited to {max_bytes} bytes"


async def _write(websocket: WebSocket, hub: Hub, subscription: Subscription, send_timeout: float) -> tuple[int, str]:
    try:
        async for frame in hub.frames(subscription):
            await asyncio.wait_for(websocket.send_text(frame.data), send_timeout)
    except StreamClosed as closed:
        return closed.code, closed.reason
    except TimeoutError:
        return closecodes.TRY_AGAIN_LATER, "client not reading; reconnect with since=<last seq>"
    return closecodes.RUN_COMPLETE, "run complete"


async def stream_endpoint(websocket: WebSocket) -> None:
    hub: Hub = websocket.app.state.hub
    settings: Settings = websocket.app.state.settings
    try:
        run_id = parse_run_id(websocket.path_params["run_id"])
        since = parse_since(websocket.query_params.get("since"))
    except InvalidRequest as exc:
        await websocket.accept()
        await websocket.close(closecodes.INVALID_REQUEST, str(exc))
        return
    await websocket.accept()
    subscription = Subscription(run_id, since=since, queue_size=settings.client_queue_size)
    expiry = schedule_expiry(websocket.scope, subscription)  # closes 4401 when the token expires
    close: tuple[int, str] | None = None
    async with hub.attach(subscription):
        reader = asyncio.create_task(_read_until_disconnect(websocket, settings.max_inbound_bytes))
        writer = asyncio.create_task(
            _write(websocket, hub, subscription, settings.max_lag_seconds)
        )
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            results = await asyncio.gather(reader, writer, return_exceptions=True)
        if writer in done and not isinstance(results[1], BaseException):
            close = results[1]
        elif reader in done and isinstance(results[0], tuple):
            close = results[0]
        elif isinstance(results[1], Exception) and not isinstance(
            results[1], WebSocketDisconnect | OSError
        ):
            logger.error("stream for run %s failed", run_id, exc_info=results[1])
            close = (closecodes.INTERNAL_ERROR, "internal error; reconnect with since=<last seq>")
    if expiry is not None:
        expiry.cancel()
    if close is not None and websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            await websocket.close(*close)


async def healthz(request: Request) -> JSONResponse:
    transport: Transport = request.app.state.transport
    try:
        await transport.backend.ping()
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "backend": transport.backend.name, "error": str(exc) or type(exc).__name__},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "backend": transport.backend.name})


def create_app(settings: Settings | None = None, transport: Transport | None = None) -> Starlette:
    """The prefect-ws ASGI app. Mount it, or serve it with ``prefect-ws serve``."""
    settings = settings or get_settings()
    transport = transport or create_transport(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await transport.broadcast.connect()
        try:
            await transport.backend.ping()
        except Exception as exc:
            logger.error(
                "prefect-ws: the backend at %s is unreachable (%s). Serving anyway: /healthz "
                "answers 503 and streams start once it is back.",
                settings.broadcast_url,
                exc,
            )
        hub = Hub(transport, replay_page_size=settings.replay_page_size, max_lag_seconds=settings.max_lag_seconds)
        app.state.hub = hub
        try:
            yield {}
        finally:
            await hub.close()
            await transport.broadcast.disconnect()

    app = Starlette(
        routes=[
            WebSocketRoute(STREAM_PATH, stream_endpoint),
            Route("/healthz", healthz),
            *page_routes(),
        ],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.transport = transport
    protect(app, settings)  # auth, origins, limits, CORS, /metrics: prefect_ws.guard
    return app
