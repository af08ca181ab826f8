"""What became of a request: reported by the middleware or endpoint that decided it, read once.

The outermost middleware (:class:`~prefect_ws.server.accesslog.AccessLogMiddleware`) puts an
:class:`Outcome` in the scope; a check that refuses the request records the refusal there, a
stream endpoint records its acceptance, the events it sent and how it ended. The access log and
the metrics are written from it alone: nothing reads the bytes going out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final

from starlette.types import Receive, Scope, Send

from prefect_ws.protocol.events import canonical_run_id

OUTCOME_SCOPE_KEY: Final = "prefect_ws.outcome"
RUN_PATH: Final = re.compile(r"^/api/v2/workflows/runs/(?P<run>[^/]*)(?P<rest>/.*)?$")
SSE_SUFFIX: Final = "/events/stream"


@dataclass(slots=True)
class Outcome:
    """One request's fate. ``transport`` is ``ws``, ``sse`` or ``http``."""

    transport: str
    raw_run: str | None  # the run id as the path spells it (bounded), None off the run paths
    run: str | None  # its canonical form, None when it is not a run id
    ip: str
    guarded: bool  # checked for credentials, origin and rate
    status: int | None = None  # HTTP status of a refusal
    code: int | None = None  # how an accepted stream ended (close code, SSE end code)
    reason: str | None = None
    refusal: str | None = None  # the metric label of a refusal
    events: int = 0
    accepted: bool = False
    by_server: bool = False  # the server chose ``code`` (not the client leaving)
    on_accept: Callable[[Outcome], None] | None = field(default=None, repr=False)
    # What must run when the request is over, whatever ended it; None while no layer above
    # (the access log) promises to run it, so that a check holds its own frame instead.
    on_finish: list[Callable[[Outcome], None]] | None = field(default=None, repr=False)
    client: str | None = None  # the client's address as the access log shows it

    @property
    def streaming(self) -> bool:
        return self.transport != "http"

    def accept(self) -> None:
        self.accepted = True
        if self.on_accept is not None:
            self.on_accept(self)

    def sent(self, events: int) -> None:
        self.events += events

    def end(self, code: int | None, reason: str, *, by_server: bool = True) -> None:
        """The stream ended with ``code`` (the first report wins)."""
        if self.code is None and self.reason is None:
            self.code, self.reason, self.by_server = code, reason, by_server


def describe(scope: Scope) -> Outcome:
    """A new outcome for ``scope``: which transport, which run, which client address."""
    path: str = scope.get("path", "")
    kind = scope["type"]
    match = RUN_PATH.match(path)
    raw_run = match.group("run")[:200] if match else None
    run = canonical_run_id(raw_run) if raw_run is not None else None
    if run is not None and run == raw_run:
        raw_run = run  # one string, not two, for as long as the request lasts
    if kind == "websocket":
        transport = "ws"
    elif path.endswith(SSE_SUFFIX):
        transport = "sse"
    else:
        transport = "http"
    return Outcome(
        transport=transport,
        raw_run=raw_run,
        run=run,
        ip=scope["client"][0] if scope.get("client") else "-",
        guarded=kind == "websocket" or path.startswith("/api/") or path == "/metrics",
    )


def outcome_of(scope: MutableMapping[str, Any]) -> Outcome:
    """The request's outcome; one of its own when no access-log middleware runs (a bare app)."""
    outcome = scope.get(OUTCOME_SCOPE_KEY)
    if not isinstance(outcome, Outcome):
        outcome = scope[OUTCOME_SCOPE_KEY] = describe(scope)
    return outcome


class Refusal(Exception):
    """A request refused before any stream starts: HTTP ``status``, a ``reason`` safe to show."""

    def __init__(self, status: int, reason: str, metric: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.metric = metric


async def refuse(scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
    """Answer ``refusal`` as plain HTTP (also to a WebSocket handshake) and record it."""
    outcome = outcome_of(scope)
    outcome.status, outcome.reason, outcome.refusal = refusal.status, refusal.reason, refusal.metric
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
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    message = await receive()  # websocket.connect
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {"type": "websocket.http.response.start", "status": refusal.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # servers without the extension answer a close before accept with a plain 403
        await send({"type": "websocket.close", "code": 1008, "reason": refusal.reason})


class Check:
    """A one-job ASGI middleware: ``check(scope, outcome)`` raises :class:`Refusal` or returns.

    Lifespan and other scopes pass through unchecked. ``__call__`` is not a coroutine: it
    decides at once and hands back the next app's awaitable (or the refusal's), so a check
    keeps no frame alive for as long as a stream lasts.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def check(self, scope: Scope, outcome: Outcome) -> None:
        raise NotImplementedError

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] in ("http", "websocket"):
            try:
                self.check(scope, outcome_of(scope))
            except Refusal as refusal:
                return refuse(scope, receive, send, refusal)
        return self.app(scope, receive, send)


def first_headers(scope: Scope) -> dict[str, str]:
    """Headers by lower-case name; a repeated header's first value wins (an attacker's
    duplicate ``Origin`` does not override)."""
    result: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        result.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return result
