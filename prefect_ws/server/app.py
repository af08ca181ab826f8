"""The serving side: a Starlette app with the stream endpoint and a health check."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from prefect_ws.backends import BackendUnavailable, Transport, create_transport
from prefect_ws.protocol import closecodes
from prefect_ws.protocol.events import frame_from_text
from prefect_ws.protocol.frames import FRAMES_EXTENSION, LISTEN_EXTENSION, coalesce, text_frame
from prefect_ws.server import metrics
from prefect_ws.server.hub import Hub, StreamClosed, Subscription
from prefect_ws.server.pages import page_routes
from prefect_ws.server.reconcile import Reconciler
from prefect_ws.server.security.auth import SUBPROTOCOL, schedule_expiry
from prefect_ws.server.security.outcome import Outcome, outcome_of
from prefect_ws.server.security.redact import redact, safe_url
from prefect_ws.server.security.stack import protect
from prefect_ws.server.sse import sse_body
from prefect_ws.server.streams import (
    InvalidRequest,
    Stream,
    StreamRequest,
    parse_seq,
    since_beyond_head,
)
from prefect_ws.server.watchdog import SendTimeout, SendWatchdog
from prefect_ws.settings import Settings, get_settings

logger = logging.getLogger("prefect_ws.server")

BACKEND_UNAVAILABLE = "backend unavailable; reconnect with since=<last seq>"
SLOW_CLIENT = "client not reading; reconnect with since=<last seq>"
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


async def _read_until_disconnect(receive: Receive, watch: _ClientWatch) -> bool:
    """Clients have nothing to say but pings (answered by the server itself): drain and ignore.

    Ends the stream through ``watch`` when the client leaves or sends too much; returns whether
    the client is still there to be sent a close frame. For servers without
    :data:`~.frames.LISTEN_EXTENSION`, where ``watch`` is not handed the messages itself.
    """
    while not watch.gone:
        watch.message(await receive())
        if watch.too_big:
            return True
    return False


class _ClientWatch:
    """What the client sends, judged as it arrives: its leaving ends the stream, and so does a
    message over ``max_bytes`` (anything else is ignored)."""

    __slots__ = ("gone", "max_bytes", "outcome", "subscription", "too_big")

    def __init__(self, subscription: Subscription, outcome: Outcome, max_bytes: int) -> None:
        self.subscription = subscription
        self.outcome = outcome
        self.max_bytes = max_bytes
        self.gone = False
        self.too_big = False

    def message(self, message: Message) -> None:
        if self.gone:
            return
        if message["type"] == "websocket.disconnect":
            self.gone = True
            self.outcome.end(message.get("code", 1005), "client disconnected", by_server=False)
            self.subscription.abort(closecodes.GOING_AWAY, "client disconnected")
            return
        size = len(message.get("text") or "") + len(message.get("bytes") or b"")
        if size > self.max_bytes and not self.too_big:
            self.too_big = True
            reason = f"client frames are limited to {self.max_bytes} bytes"
            self.subscription.abort(closecodes.MESSAGE_TOO_BIG, reason)


def _client_there(reader: asyncio.Task[bool] | _ClientWatch) -> bool:
    """Whether a close frame can still reach the client; stops the reader if it still runs."""
    if isinstance(reader, _ClientWatch):
        return not reader.gone
    if not reader.done():
        reader.cancel()
        return True
    return not reader.cancelled() and reader.exception() is None and reader.result()


class StreamEndpoint:
    """The run's events over a WebSocket: hello, replay after ``since``, then live.

    A plain ASGI app rather than a Starlette WebSocket function, so that it can send the
    pre-framed batches of :mod:`~.frames`. The connection's own task writes; what the client
    sends is judged as it arrives (:class:`_ClientWatch`), only to notice the client leaving.
    An open stream holds only what it uses: no ``WebSocket`` object, no parsed query.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state
        outcome = outcome_of(scope)
        # The client offered the protocol name next to its token: say it is spoken.
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in scope.get("subprotocols", []) else None
        try:
            request: StreamRequest | InvalidRequest = _stream_request(HTTPConnection(scope))
        except InvalidRequest as exc:
            request = exc
        if (await receive())["type"] != "websocket.connect":
            return  # gone before the handshake completed
        if isinstance(request, InvalidRequest):
            await send(_accept(subprotocol))
            outcome.accept()
            reason = _reason(str(request))
            outcome.end(closecodes.INVALID_REQUEST, reason)
            await send(
                {"type": "websocket.close", "code": closecodes.INVALID_REQUEST, "reason": reason}
            )
            return
        # Read by the checks and the handshake; an open stream never looks at them again.
        scope["headers"] = []
        prebuilt, listens, write_now = _offered(scope)
        settings: Settings = state.settings
        subscription = request.subscription(settings.client_queue_size)
        if request.filter.everything:  # live events written by the hub when the client is level
            subscription.writer = write_now
        reader: asyncio.Task[bool] | _ClientWatch | None = None
        max_bytes = settings.max_inbound_bytes
        # Closes the stream with 4401 when the client's token expires.
        expiry = schedule_expiry(scope, subscription)
        close: tuple[int, str] | None = None
        stream = Stream(state.hub, request, subscription, state.reconciler)
        watchdog: SendWatchdog = state.watchdog
        task = asyncio.current_task()
        try:
            # The hello is made before the 101, so that a server taking pre-built frames
            # writes both at once. Then each batch of events in writes of pre-built frames
            # where the server takes them (:mod:`~.frames`), else frame by frame. One write
            # blocked for longer than the watchdog's timeout ends the stream with 1013: each
            # write is timed, not the batch, since a catch-up batch of megabytes takes a slow
            # but reading client longer than that. (Written here, not in a function of its
            # own: one frame less per stream.)
            try:
                hello = await stream.hello()
                await send(_accept(subprotocol, text_frame(hello.encode()) if prebuilt else None))
                outcome.accept()
                if not prebuilt:
                    with watchdog.sending(task):
                        await send({"type": "websocket.send", "text": hello})
                del hello  # not kept for the stream's life
                reader = await _watch_client(
                    receive, send, listens, _ClientWatch(subscription, outcome, max_bytes)
                )
                while (batch := await stream.next()) is not None:
                    if prebuilt:
                        for data, count in coalesce(frame.wire for frame in batch):
                            with watchdog.sending(task):
                                await send(
                                    {"type": FRAMES_EXTENSION, "data": data, "events": count}
                                )
                            outcome.sent(count)
                    else:
                        for frame in batch:
                            with watchdog.sending(task):
                                await send({"type": "websocket.send", "text": frame.data})
                            outcome.sent(1)
                close = (closecodes.RUN_COMPLETE, "run complete")
            except StreamClosed as closed:
                close = (closed.code, closed.reason)
            except SendTimeout:
                close = (closecodes.TRY_AGAIN_LATER, SLOW_CLIENT)
            finally:
                await stream.aclose()
        except BackendUnavailable as exc:  # backend down: expected, no stack trace
            logger.warning("stream for run %s: backend unavailable (%s)", request.run_id, exc)
            close = (closecodes.TRY_AGAIN_LATER, BACKEND_UNAVAILABLE)
        except (WebSocketDisconnect, OSError):
            pass  # the client went away mid-send
        except Exception:
            logger.exception("stream for run %s failed", request.run_id)
            close = (closecodes.INTERNAL_ERROR, "internal error; reconnect with since=<last seq>")
        finally:
            outcome.sent(subscription.written)
            subscription.writer = None  # the protocol's method: no cycle through its listener
            if expiry is not None:
                expiry.cancel()
            client_there = reader is None or _client_there(reader)
        if close is not None:
            outcome.end(close[0], close[1])
            if client_there:
                with contextlib.suppress(Exception):
                    if not outcome.accepted:  # ended before its hello: a close needs the 101
                        await send(_accept(subprotocol))
                    await send(
                        {"type": "websocket.close", "code": close[0], "reason": _reason(close[1])}
                    )


def _accept(subprotocol: str | None, frames: bytes | None = None) -> Message:
    """``websocket.accept``, with the first frames to write with the 101 where the server
    takes pre-built frames (:mod:`~.frames`)."""
    message: Message = {"type": "websocket.accept", "subprotocol": subprotocol}
    if frames is not None:
        message[FRAMES_EXTENSION] = frames
    return message


def _offered(scope: Scope) -> tuple[bool, bool, Callable[[bytes], bool] | None]:
    """What the server offers a stream: whether it takes pre-built frames, whether it hands
    the client's messages to a listener (:mod:`~.frames`), and its ``write_now``. Read once:
    an open stream keeps none of the scope."""
    extensions = scope.get("extensions") or {}
    frames = extensions.get(FRAMES_EXTENSION)
    write_now = frames.get("write_now") if frames is not None else None
    return frames is not None, LISTEN_EXTENSION in extensions, write_now


async def _watch_client(
    receive: Receive, send: Send, listens: bool, watch: _ClientWatch
) -> asyncio.Task[bool] | _ClientWatch:
    """``watch`` judges what the client sends as it arrives: as the server's listener where it
    hands messages to one (:data:`~.frames.LISTEN_EXTENSION`), else fed by a task reading them."""
    if listens:
        await send({"type": LISTEN_EXTENSION, "listener": watch.message})
        return watch
    return asyncio.create_task(_read_until_disconnect(receive, watch))


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
    except BackendUnavailable as exc:
        logger.warning("history for run %s: backend unavailable (%s)", stream_request.run_id, exc)
        return _error(503, BACKEND_UNAVAILABLE)


async def _history_page(
    transport: Transport, settings: Settings, stream_request: StreamRequest, limit: int
) -> Response:
    """Up to ``limit`` matching events after ``since``. A filtered read stops after
    ``history_scan_max`` stored events whatever it found (``next`` says where to go on), so
    that one request for a rare type on a long run costs bounded server time."""
    backend = transport.backend
    info = await backend.info(stream_request.run_id)
    if not info.known:
        return _error(404, "unknown run: no events for this run id")
    if stream_request.since > info.head:
        return _error(400, since_beyond_head(info.head).reason)
    texts: list[str] = []
    cursor = stream_request.since
    scanned = 0
    more = True
    while len(texts) < limit and more and scanned < settings.history_scan_max:
        size = min(settings.replay_page_size, settings.history_scan_max - scanned)
        page = await backend.history(stream_request.run_id, cursor, size)
        scanned += len(page)
        more = len(page) == size
        for text in page:
            frame = frame_from_text(text)
            cursor = frame.seq
            if stream_request.filter.matches(frame):
                texts.append(text)
                if len(texts) == limit:
                    break
        more = cursor < info.head and (more or len(texts) == limit)
    body = (
        f'{{"runId":"{stream_request.run_id}","since":{stream_request.since},'
        f'"head":{info.head},"first":{json.dumps(info.first)},'
        f'"recovered":{json.dumps(not info.missing_after(stream_request.since))},'
        f'"epoch":{json.dumps(info.epoch)},'
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
        except BackendUnavailable as exc:
            logger.warning(
                "stream for run %s: backend unavailable (%s)", stream_request.run_id, exc
            )
            return _error(503, BACKEND_UNAVAILABLE)
        reconciler: Reconciler = request.app.state.reconciler
        if not info.known and await reconciler.lookup(stream_request.run_id) is None:
            return _error(404, "unknown run: no events for this run id (add wait=<seconds>)")
    subscription = stream_request.subscription(settings.client_queue_size)
    schedule_expiry(request.scope, subscription)  # `event: end` 4401 when the token expires
    outcome = outcome_of(request.scope)
    outcome.accept()
    body = sse_body(
        Stream(hub, stream_request, subscription, request.app.state.reconciler),
        keepalive=settings.ping_interval,
        outcome=outcome,
    )
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def healthz(request: Request) -> JSONResponse:
    """200 while streams can be served (the backend answers), else 503. ``prefect`` says whether
    run ends are reconciled with Prefect's API; an unreachable API does not stop streaming."""
    transport: Transport = request.app.state.transport
    reconciler: Reconciler | None = getattr(request.app.state, "reconciler", None)
    prefect = reconciler.status() if reconciler is not None else {"reconciling": False}
    try:
        await transport.backend.ping()
    except Exception as exc:
        return JSONResponse(
            {
                "status": "unavailable",
                "backend": transport.backend.name,
                "error": redact(str(exc)) or type(exc).__name__,
                "prefect": prefect,
            },
            status_code=503,
        )
    return JSONResponse({"status": "ok", "backend": transport.backend.name, "prefect": prefect})


class _StreamRoute:
    """The innermost middleware: a WebSocket for the stream route goes to its endpoint at once.

    Starlette's exception layer and router would otherwise each keep a frame (and the exception
    layer a ``WebSocket`` and two closures) alive for as long as the stream lasts, to handle
    exceptions the endpoint never raises. The route's own ``matches`` decides, as the router
    would (the stream route is the first); everything else goes on to the router.
    """

    def __init__(self, app: ASGIApp, *, route: WebSocketRoute) -> None:
        self.app = app
        self.route = route

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "websocket":
            match, child_scope = self.route.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                return self.route.app(scope, receive, send)
        return self.app(scope, receive, send)


class _App(Starlette):
    """Starlette, handing a WebSocket past ``ServerErrorMiddleware``, which only answers errors
    of HTTP requests: a stream's task keeps no frame of a layer it never uses. (``__call__``
    stays a coroutine function: servers tell ASGI 3 apps by it.)"""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        stack = self.middleware_stack
        if scope["type"] == "websocket" and isinstance(stack, ServerErrorMiddleware):
            stack = stack.app
        await stack(scope, receive, send)


def create_app(settings: Settings | None = None, transport: Transport | None = None) -> Starlette:
    """The prefect-ws ASGI app. Mount it, or serve it with ``prefect-ws serve``."""
    settings = settings or get_settings()
    transport = transport or create_transport(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        hub = Hub(
            transport,
            replay_page_size=settings.replay_page_size,
            max_lag_seconds=settings.max_lag_seconds,
        )
        await hub.start()
        try:
            await transport.backend.ping()
        except Exception as exc:
            logger.error(
                "prefect-ws: the backend at %s is unreachable (%s). Serving anyway: /healthz "
                "answers 503 and streams start once it is back.",
                safe_url(settings.broadcast_url),
                redact(str(exc)),
            )
        app.state.hub = hub
        app.state.reconciler = reconciler = Reconciler(
            transport.backend,
            hub.runs.keys,
            interval=settings.reconcile_interval,
            grace=settings.reconcile_grace,
            timeout=settings.prefect_api_timeout,
            max_wait=settings.max_wait_seconds,
        )
        await reconciler.start()
        app.state.watchdog = watchdog = SendWatchdog(settings.max_lag_seconds)
        watchdog.start()
        try:
            yield {}
        finally:
            await reconciler.close()
            await hub.close()
            await watchdog.stop()

    stream_route = WebSocketRoute(STREAM_PATH, StreamEndpoint())
    app = _App(
        routes=[
            stream_route,
            Route(SSE_PATH, sse_endpoint),
            Route(EVENTS_PATH, events_endpoint),
            Route("/healthz", healthz),
            Route("/metrics", metrics.metrics_endpoint, methods=["GET"]),
            Route("/livez", metrics.livez, methods=["GET"]),
            *page_routes(),
        ],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.transport = transport
    app.add_middleware(_StreamRoute, route=stream_route)  # innermost: added first
    protect(app, settings)  # hosts, limits, origins, credentials: prefect_ws.server.security
    return app
