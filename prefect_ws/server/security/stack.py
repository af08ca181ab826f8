"""The checks every request passes before a WebSocket is upgraded or a stream starts.

One ASGI middleware per job, so that a refusal costs no upgrade, no subscription and no task:
the client gets a plain HTTP answer with a short reason (for a WebSocket, through the ASGI
``websocket.http.response`` extension, which uvicorn implements). Outermost first:

1. CORS (only with ``PREFECT_WS_ALLOWED_ORIGINS``): refusals carry CORS headers, so a browser page
   can read why it was refused; preflight requests are answered here (they carry no credentials)
2. :class:`~prefect_ws.server.accesslog.AccessLogMiddleware`: the access log and the metrics,
   from the outcome the layers below record
3. :class:`~.headers.RequestShape`: header block size -> 431, control characters in the path -> 400
4. :class:`~.hosts.HostAllowList`: ``Host`` must name this server (DNS rebinding) -> 400
5. :class:`~.rate.HandshakeRate`: handshakes per client address -> 429
6. :class:`~.origin.OriginCheck`: browser origins -> 403
7. :class:`~.credentials.RequireCredentials`: the credential leaves the request; API key or
   run-scoped token -> 401, a token for another run -> 403
8. :class:`~.capacity.StreamCapacity`: streams per process -> 503, per address -> 429, runs -> 503
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware

from prefect_ws.server.accesslog import AccessLogMiddleware
from prefect_ws.server.security.capacity import StreamCapacity
from prefect_ws.server.security.credentials import RequireCredentials
from prefect_ws.server.security.headers import RequestShape
from prefect_ws.server.security.hosts import HostAllowList, allowed_hosts
from prefect_ws.server.security.origin import OriginCheck
from prefect_ws.server.security.rate import HandshakeRate
from prefect_ws.settings import Settings


def protect(app: Starlette, settings: Settings) -> None:
    """Put the checks, the access log and CORS on a prefect-ws app (called by ``create_app``)."""

    def active_runs() -> Collection[str]:
        hub = getattr(app.state, "hub", None)
        return hub.runs.keys() if hub is not None else ()

    # add_middleware wraps what is there: innermost first.
    app.add_middleware(StreamCapacity, settings=settings, active_runs=active_runs)
    app.add_middleware(RequireCredentials, settings=settings)
    app.add_middleware(OriginCheck, settings=settings)
    app.add_middleware(HandshakeRate, settings=settings)
    app.add_middleware(HostAllowList, hosts=allowed_hosts(settings))
    app.add_middleware(RequestShape)
    app.add_middleware(AccessLogMiddleware, settings=settings)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=["*"] if "*" in settings.allowed_origins else settings.allowed_origins,
            allow_methods=["GET"],
            allow_headers=["Authorization", "Last-Event-ID"],
            max_age=600,
        )
