"""The guard: every request is checked before a WebSocket is upgraded or a stream starts.

A pure ASGI middleware, so a refusal costs no upgrade, no subscription and no task: the client
gets a plain HTTP answer with a short reason (the ASGI ``websocket.http.response`` extension,
which uvicorn implements), and the refusal is counted by reason. In order:

1. handshake rate per client address (``limits``, moving window) -> 429
2. origin allow-list for browsers (WebSocket handshakes and ``/api/`` requests) -> 403
3. credentials (API key or run-scoped token) -> 401; a token for another run -> 403
4. streams per process -> 503, per client address -> 429
5. runs streamed per process -> 503

An accepted stream carries its :class:`~.auth.Principal` in the scope (the stream
endpoint closes it when its token expires), is counted while open and gets one access log line
when it starts and one when it ends.

:func:`handshake_timeout_protocol` is the guard's first line, below ASGI: a client that does
not finish its request headers in time (slowloris) is disconnected.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Collection
from contextvars import ContextVar
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from prefect_ws.protocol.events import canonical_run_id
from prefect_ws.protocol.frames import FRAMES_EXTENSION
from prefect_ws.server import metrics
from prefect_ws.server.accesslog import AccessLog, client_address
from prefect_ws.server.security.auth import (
    BEARER_PROTOCOL_PREFIX,
    PRINCIPAL_SCOPE_KEY,
    SUBPROTOCOL,
    Authenticator,
    AuthError,
    Principal,
    extract_credential,
    is_loopback,
    strip_credentials,
)
from prefect_ws.settings import Settings

RUN_PATH: Final = re.compile(r"^/api/v2/workflows/runs/(?P<run>[^/]*)(?P<rest>/.*)?$")
SSE_SUFFIX: Final = "/events/stream"
_EVENT_PREFIX: Final = '{"v":'
_SSE_END: Final = re.compile(rb'event: end\ndata: \{"code": (\d+), "reason": "([^"]*)"\}')
MAX_HEADER_BYTES: Final = 16_384  # uvicorn's h11 has no limit on complete header blocks
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


_DENIED: ContextVar[bool] = ContextVar("prefect_ws_denied", default=False)
_UVICORN_NO_HANDSHAKE: Final = "ASGI callable returned without completing handshake."


class _DenialIsAHandshake(logging.Filter):
    """uvicorn (0.54, websockets-sansio) logs an ERROR after every ``websocket.http.response``
    denial as if the app had forgotten to answer; drop that line for the guard's own refusals."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == _UVICORN_NO_HANDSHAKE and _DENIED.get())


class Refusal(Exception):
    def __init__(self, status: int, reason: str, metric: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.metric = metric


def _headers(scope: Scope) -> dict[str, str]:
    # Repeated headers: the first wins (an attacker's duplicate Origin does not override).
    result: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        result.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return result


class Guard:
    """ASGI middleware enforcing auth, origins and limits before any stream starts."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        active_runs: Callable[[], Collection[str]] = lambda: (),
    ) -> None:
        self.app = app
        self.settings = settings
        self.authenticator = Authenticator.from_settings(settings)
        self.active_runs = active_runs
        self.access_log = AccessLog(
            enabled=settings.access_log, json_lines=settings.log_json, level=settings.log_level
        )
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._rates = parse_many(settings.handshake_rate)
        self._origins = {origin.rstrip("/").lower() for origin in settings.allowed_origins}
        self.open_total = 0
        self.open_per_ip: Counter[str] = Counter()

    # -- checks ---------------------------------------------------------------------------

    def _per_address(self, ip: str) -> bool:
        """Per-address limits skip loopback clients unless PREFECT_WS_LIMIT_LOOPBACK is set."""
        return self.settings.limit_loopback or not is_loopback(ip)

    def _check_rate(self, ip: str) -> None:
        if not self._per_address(ip):
            return
        for rate in self._rates:
            if not self._limiter.hit(rate, "handshake", ip):
                raise Refusal(429, "too many handshakes from this address", "rate_limited")

    def _check_origin(self, headers: dict[str, str]) -> None:
        origin = headers.get("origin")
        if origin is None or "*" in self._origins:
            return  # not a browser (browsers always send Origin on WebSocket and CORS requests)
        normalized = origin.rstrip("/").lower()
        if self._origins:
            if normalized in self._origins:
                return
        else:
            parts = urlsplit(normalized)
            host = headers.get("host", "").lower()
            if parts.scheme in ("http", "https") and parts.netloc and parts.netloc == host:
                return
        raise Refusal(403, "origin not allowed", "origin")

    def _authenticate(
        self, credential: str | None, run: str | None, raw_run: str | None
    ) -> Principal:
        try:
            principal = self.authenticator.authenticate(credential)
        except AuthError as exc:
            raise Refusal(exc.status, exc.reason, exc.metric) from None
        if raw_run is not None:
            # An invalid run id is left to the endpoint (4400 / 400) once the caller is known.
            if run is not None and not principal.allows(run):
                raise Refusal(403, "token not valid for this run", "wrong_run")
        elif not principal.is_admin:
            raise Refusal(403, "this token is scoped to one run", "wrong_run")
        return principal

    def _check_capacity(self, ip: str, run: str | None) -> None:
        if self.open_total >= self.settings.max_connections:
            raise Refusal(503, "server at its connection limit", "max_connections")
        if self.open_per_ip[ip] >= self.settings.max_connections_per_ip and self._per_address(ip):
            raise Refusal(429, "too many connections from this address", "max_connections_per_ip")
        if run is not None:
            runs = self.active_runs()
            if run not in runs and len(runs) >= self.settings.max_runs:
                raise Refusal(503, "server at its run limit", "max_runs")

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        guarded = kind == "websocket" or path.startswith("/api/") or path == "/metrics"
        if not guarded:
            # Pages read ?token= in the browser; the server never needs it, so no log gets it.
            scope["query_string"] = strip_credentials(scope.get("query_string", b""))
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        raw_query = scope.get("query_string", b"")
        subprotocols = list(scope.get("subprotocols", [])) if kind == "websocket" else []
        credential = extract_credential(
            headers, parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True), subprotocols
        )
        # Before anything can log the URL: the token never reaches a log line or the app.
        scope["query_string"] = strip_credentials(raw_query)
        if kind == "websocket":
            scope["subprotocols"] = [
                p for p in subprotocols if not p.startswith(BEARER_PROTOCOL_PREFIX)
            ]
        match = RUN_PATH.match(path)
        raw_run = match.group("run")[:200] if match else None  # logged: bounded
        run = canonical_run_id(raw_run) if raw_run is not None else None
        streaming = kind == "websocket" or path.endswith(SSE_SUFFIX)
        ip = scope["client"][0] if scope.get("client") else "-"
        principal: Principal | None = None
        try:
            if sum(len(k) + len(v) for k, v in scope.get("headers", [])) > MAX_HEADER_BYTES:
                raise Refusal(431, "request headers too large", "headers_too_large")
            if _CONTROL.search(path):
                # Decoded %0d%0a and friends: no route has them, and no log line should either.
                raise Refusal(400, "invalid characters in the request path", "invalid_path")
            if kind == "websocket" or path.startswith("/api/"):
                self._check_rate(ip)
                self._check_origin(headers)
            if path != "/metrics" or self.authenticator.enabled:
                principal = self._authenticate(credential, run, raw_run)
            if streaming:
                self._check_capacity(ip, run)
        except Refusal as refusal:
            metrics.refused(refusal.metric)
            self.access_log.refuse(
                run=run or raw_run,
                client=client_address(scope),
                status=refusal.status,
                reason=refusal.reason,
            )
            await self._deny(scope, receive, send, refusal)
            return
        scope[PRINCIPAL_SCOPE_KEY] = principal
        if not streaming:
            await self.app(scope, receive, send)
            return
        await self._stream(scope, receive, send, ip, run or raw_run)

    async def _stream(
        self, scope: Scope, receive: Receive, send: Send, ip: str, run: str | None
    ) -> None:
        transport = "ws" if scope["type"] == "websocket" else "sse"
        offered_subprotocol = SUBPROTOCOL in scope.get("subprotocols", [])
        started = time.monotonic()
        state: dict[str, Any] = {"sent": 0, "code": None, "reason": None, "accepted": False}
        client = client_address(scope)

        async def guarded_send(message: Message) -> None:
            mtype = message["type"]
            if mtype == FRAMES_EXTENSION:
                state["sent"] += message["events"]
            elif mtype == "websocket.send":
                if (message.get("text") or "").startswith(_EVENT_PREFIX):
                    state["sent"] += 1  # events only, not control frames such as hello
            elif mtype == "websocket.accept":
                if offered_subprotocol and not message.get("subprotocol"):
                    message = {**message, "subprotocol": SUBPROTOCOL}
                state["accepted"] = True
                self.access_log.connect(run=run, client=client, transport=transport)
            elif mtype == "websocket.close":
                if state["code"] is None:
                    code = int(message.get("code", 1000))
                    state["code"], state["reason"] = code, message.get("reason") or ""
                    metrics.closed(code)
            elif mtype == "http.response.start":
                state["accepted"] = message.get("status") == 200
                state["code"] = message.get("status")
                if state["accepted"]:
                    self.access_log.connect(run=run, client=client, transport=transport)
            elif mtype == "http.response.body":
                body = message.get("body", b"")
                state["sent"] += body.count(b"\nid:") + body.startswith(b"id:")
                end = _SSE_END.search(body)
                if end and state["code"] in (None, 200):
                    state["code"], state["reason"] = int(end.group(1)), end.group(2).decode()
            await send(message)

        async def guarded_receive() -> Message:
            message = await receive()
            if (
                message["type"] in ("websocket.disconnect", "http.disconnect")
                and state["code"] is None
            ):
                state["code"] = message.get("code", 1005 if transport == "ws" else None)
                state["reason"] = "client disconnected"
            return message

        self.open_total += 1
        self.open_per_ip[ip] += 1
        metrics.connection_opened(transport)
        try:
            await self.app(scope, guarded_receive, guarded_send)
        finally:
            self.open_total -= 1
            self.open_per_ip[ip] -= 1
            if self.open_per_ip[ip] <= 0:
                del self.open_per_ip[ip]
            metrics.connection_closed(transport)
            if state["accepted"]:
                self.access_log.disconnect(
                    run=run,
                    client=client,
                    transport=transport,
                    duration=round(time.monotonic() - started, 3),
                    code=state["code"],
                    reason=state["reason"],
                    events=state["sent"],
                )

    async def _deny(self, scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
        body = json.dumps({"error": refusal.reason, "status": refusal.status}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if refusal.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="prefect-ws"'))
        if refusal.status in (429, 503):
            headers.append((b"retry-after", b"1"))
        if scope["type"] == "http":
            await send(
                {"type": "http.response.start", "status": refusal.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": body})
            return
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            _DENIED.set(True)  # read by _DenialIsAHandshake in this same task
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": refusal.status,
                    "headers": headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # servers without the extension answer a close before accept with a plain 403
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.reason})


def handshake_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request headers take over ``seconds``.

    uvicorn times out idle keep-alive connections but not a request that never finishes, so a
    client sending one header byte at a time (slowloris) would hold a socket forever.
    """

    class HandshakeTimeoutProtocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._handshake_timer = self.loop.call_later(seconds, self._handshake_expired)

        def connection_lost(self, exc: Exception | None) -> None:
            self._handshake_timer.cancel()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self, event: Any) -> None:
            # The WebSocket protocol takes over: a pending timer would keep this object (and its
            # request, ~4 KB) alive for ``seconds`` after every upgrade.
            self._handshake_timer.cancel()
            super().handle_websocket_upgrade(event)

        def _handshake_expired(self) -> None:
            upgraded = self.transport.get_protocol() is not self
            if self.cycle is None and not upgraded and not self.transport.is_closing():
                metrics.refused("handshake_timeout")
                self.transport.close()

    return HandshakeTimeoutProtocol


def protect(app: Starlette, settings: Settings) -> None:
    """Put the guard, CORS and ``/metrics`` on a prefect-ws app (called by ``create_app``).

    CORS is outermost so that refusals carry CORS headers and a browser page can read why it was
    refused; preflight requests are answered before the guard (they carry no credentials).
    """

    def active_runs() -> Collection[str]:
        hub = getattr(app.state, "hub", None)
        return hub.runs.keys() if hub is not None else ()

    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DenialIsAHandshake) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_DenialIsAHandshake())
    app.router.routes.append(Route("/metrics", metrics.metrics_endpoint, methods=["GET"]))
    app.router.routes.append(Route("/livez", metrics.livez, methods=["GET"]))
    app.add_middleware(Guard, settings=settings, active_runs=active_runs)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=["*"] if "*" in settings.allowed_origins else settings.allowed_origins,
            allow_methods=["GET"],
            allow_headers=["Authorization", "Last-Event-ID"],
            max_age=600,
        )
