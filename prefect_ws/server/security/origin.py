"""Which browser pages may connect: ``PREFECT_WS_ALLOWED_ORIGINS``, else the same origin -> 403.

Browsers always send ``Origin`` on WebSocket handshakes and CORS requests; a request without
one is not from a browser page and is left to the credentials check. The same-origin rule
compares with the ``Host`` the request names, which :mod:`.hosts` has already limited to this
server's own names (a rebinding page's ``Host`` is refused there).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Scope

from prefect_ws.server.security.outcome import Check, Outcome, Refusal, first_headers
from prefect_ws.settings import Settings


class OriginCheck(Check):
    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        super().__init__(app)
        self._origins = {origin.rstrip("/").lower() for origin in settings.allowed_origins}

    def check(self, scope: Scope, outcome: Outcome) -> None:
        if not (scope["type"] == "websocket" or scope["path"].startswith("/api/")):
            return
        headers = first_headers(scope)
        origin = headers.get("origin")
        if origin is None or "*" in self._origins:
            return
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
