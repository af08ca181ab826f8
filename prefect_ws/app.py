"""The serving side: a Starlette app with the stream endpoint and a health check."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from prefect_ws import closecodes
from prefect_ws.auth import schedule_expiry
from prefect_ws.events import frame_from_text
from prefect_ws.guard import protect
from prefect_ws.hub import Hub, StreamClosed
from prefect_ws.pages import page_routes
from prefect_ws.settings import Settings, get_settings
from prefect_ws.sse import sse_body
from prefect_ws.streaming import (
    InvalidRequest,
    StreamRequest,
    open_stream,
    parse_seq,
    since_beyond_head,
)
from prefect_ws.transport import Transport, create_transport

logger = logging.getLogger("prefect_ws.server")

BACKEND_UNAVAILABLE = "backend unavailable; reconnect with since=<last seq>"
STREAM_PATH = "/api/v2/workflows/runs/{run_id:path}/stream"
EVENTS_PATH = "/api/v2/workflows/runs/{run_id:path}/events"
SSE_PATH = "/api/v2/workflows/runs/{run_id:path}/events/stream"


def _stream_request(connection: HTTPConnection, last_event_id: str | None = None) -> StreamRequest:
    settings: Settings = connection.app.state.settings
    return StreamRequest.parse(
        connection.path_params["run_id"],
        connection.query_params,
        connection.query_params.getlist("step"),
        max_wait=settings.max_wait_seconds,
        last_event_id=last_event_id,
    )


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8; a longer one would fail the close itself."""
    data = text.encode("utf-8")
    return text if len(data) <= 123 else data[:120].decode("utf-8", "ignore") + "..."


async def _read_until_disconnect(websocket: WebSocket, max_bytes: int) -> tuple[int, str] | None:
    """Clients have nothing to say but pings (answered by the server itself): drain and ignore."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        size = len(message.get("text") or "") + len(message.get("bytes") or b"")
        if size > max_bytes:
            return closecodes.MESSAGE_TOO_BIG, f"client frames are limited to {max_bytes} bytes"


async def _write(
    websocket: WebSocket, stream: AsyncIterator[tuple[int | None, str]], send_timeout: float
) -> tuple[int, str]:
    """Send the stream; a send blocked for over ``send_timeout`` ends it with 1013.

    A watchdog task checks the send in progress a few times per ``send_timeout``, instead of
    a timer per frame: arming and cancelling one per send showed in the fan-out profiles.
    """
    sending_since = 0.0  # monotonic start of the send in progress; 0: not sending
    expired = False
    writer = asyncio.current_task()
    assert writer is not None

    async def watch() -> None:
        nonlocal expired
        while True:
            await asyncio.sleep(send_timeout / 4)
            if sending_since and time.monotonic() - sending_since > send_timeout:
                expired = True
                writer.cancel()
                return

    watchdog = asyncio.create_task(watch())
    try:
        async for _, text in stream:
            sending_since = time.monotonic()
            await websocket.send_text(text)
            sending_since = 0.0
    except StreamClosed as closed:
        return closed.code, closed.reason
    except asyncio.CancelledError:
        if not expired:
            raise
        return closecodes.TRY_AGAIN_LATER, "client not reading; reconnect with since=<last seq>"
    finally:
        watchdog.cancel()
    return closecodes.RUN_COMPLETE, "run complete"


async def stream_endpoint(websocket: WebSocket) -> None:
    """The run's events over a WebSocket: hello, replay after ``since``, then live."""
    hub: Hub = websocket.app.state.hub
    settings: Settings = websocket.app.state.settings
    try:
        request = _stream_request(websocket)
    except InvalidRequest as exc:
        await websocket.accept()
        await websocket.close(closecodes.INVALID_REQUEST, _reason(str(exc)))
        return
    await websocket.accept()
    subscription = request.subscription(settings.client_queue_size)
    stream = open_stream(hub, request, subscription)
    reader = asyncio.create_task(_read_until_disconnect(websocket, settings.max_inbound_bytes))
    writer = asyncio.create_task(_write(websocket, stream, settings.max_lag_seconds))
    expiry = schedule_expiry(websocket.scope, subscription)  # closes 4401 when the token expires
    close: tuple[int, str] | None = None
    try:
        done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, writer):
            task.cancel()
        results = await asyncio.gather(reader, writer, return_exceptions=True)
        await stream.aclose()  # type: ignore[attr-defined]
        if expiry is not None:
            expiry.cancel()
    if writer in done and not isinstance(results[1], BaseException):
        close = results[1]
    elif reader in done and isinstance(results[0], tuple):
        close = results[0]
    elif isinstance(results[1], RedisError):  # Redis down: expected, no stack trace
        logger.warning("stream for run %s: backend unavailable (%s)", request.run_id, results[1])
        close = (closecodes.TRY_AGAIN_LATER, BACKEND_UNAVAILABLE)
    elif isinstance(results[1], Exception) and not isinstance(
        results[1], WebSocketDisconnect | OSError
    ):
        logger.error("stream for run %s failed", request.run_id, exc_info=results[1])
        close = (closecodes.INTERNAL_ERROR, "internal error; reconnect with since=<last seq>")
    if close is not None and websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            await websocket.close(close[0], _reason(close[1]))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def events_endpoint(request: Request) -> Response:
    """``GET .../events?since=N&limit=M``: the stored events as JSON, paginated by ``seq``."""
    settings: Settings = request.app.state.settings
    transport: Transport = request.app.state.transport
    try:
        stream_request = _stream_request(request)
        limit = parse_seq(request.query_params.get("limit") or "100", "limit")
        if not 1 <= limit <= settings.history_page_max:
            raise InvalidRequest(f"invalid limit: expected 1 to {settings.history_page_max}")
    except InvalidRequest as exc:
        return _error(400, str(exc))
    try:
        return await _history_page(transport, settings, stream_request, limit)
    except RedisError as exc:
        logger.warning("history for run %s: backend unavailable (%s)", stream_request.run_id, exc)
        return _error(503, BACKEND_UNAVAILABLE)


async def _history_page(
    transport: Transport, settings: Settings, stream_request: StreamRequest, limit: int
) -> Response:
    backend = transport.backend
    info = await backend.info(stream_request.run_id)
    if not info.known:
        return _error(404, "unknown run: no events for this run id")
    if stream_request.since > info.head:
        return _error(400, since_beyond_head(info.head).reason)
    texts: list[str] = []
    cursor = stream_request.since
    more = True
    while len(texts) < limit and more:
        page = await backend.history(stream_request.run_id, cursor, settings.replay_page_size)
        more = len(page) == settings.replay_page_size
        for text in page:
            frame = frame_from_text(text)
            cursor = frame.seq
            if stream_request.filter.matches(frame):
                texts.append(text)
                if len(texts) == limit:
                    more = cursor < info.head
                    break
    body = (
        f'{{"runId":"{stream_request.run_id}","since":{stream_request.since},'
        f'"head":{info.head},"first":{json.dumps(info.first)},'
        f'"recovered":{json.dumps(not info.missing_after(stream_request.since))},'
        f'"next":{cursor if more else "null"},"events":[{",".join(texts)}]}}'
    )
    return Response(body, media_type="application/json")


async def sse_endpoint(request: Request) -> Response:
    """The same stream as Server-Sent Events: ``id:`` is ``seq``, ``Last-Event-ID`` resumes."""
    hub: Hub = request.app.state.hub
    settings: Settings = request.app.state.settings
    try:
        stream_request = _stream_request(request, request.headers.get("last-event-id"))
    except InvalidRequest as exc:
        return _error(400, str(exc))
    if stream_request.wait is None:
        try:
            info = await hub.transport.backend.info(stream_request.run_id)
        except RedisError as exc:
            logger.warning(
                "stream for run %s: backend unavailable (%s)", stream_request.run_id, exc
            )
            return _error(503, BACKEND_UNAVAILABLE)
        if not info.known:
            return _error(404, "unknown run: no events for this run id (add wait=<seconds>)")
    subscription = stream_request.subscription(settings.client_queue_size)
    schedule_expiry(request.scope, subscription)  # `event: end` 4401 when the token expires
    body = sse_body(
        open_stream(hub, stream_request, subscription), keepalive=settings.ping_interval
    )
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def healthz(request: Request) -> JSONResponse:
    transport: Transport = request.app.state.transport
    try:
        await transport.backend.ping()
    except Exception as exc:
        return JSONResponse(
            {
                "status": "unavailable",
                "backend": transport.backend.name,
                "error": str(exc) or type(exc).__name__,
            },
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
        hub = Hub(
            transport,
            replay_page_size=settings.replay_page_size,
            max_lag_seconds=settings.max_lag_seconds,
        )
        app.state.hub = hub
        try:
            yield {}
        finally:
            await hub.close()
            await transport.broadcast.disconnect()

    app = Starlette(
        routes=[
            WebSocketRoute(STREAM_PATH, stream_endpoint),
            Route(SSE_PATH, sse_endpoint),
            Route(EVENTS_PATH, events_endpoint),
            Route("/healthz", healthz),
            *page_routes(),
        ],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.transport = transport
    protect(app, settings)  # auth, origins, limits, CORS, /metrics: prefect_ws.guard
    return app
