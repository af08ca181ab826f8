"""Who is asking: the request's credential is taken out of it, then checked -> 401/403.

Every request loses its credential first (``?token=`` in the query, ``bearer.`` subprotocols),
guarded or not, so that nothing after this point (uvicorn's own log lines, the app, a page) can
show it. Guarded requests (WebSockets, ``/api/``, ``/metrics`` when auth is on) then need a
credential that admits them: an API key, or a token for this run (401 without one, 403 for a
token of another run). The accepted :class:`~.auth.Principal` goes into the scope; the stream
endpoint closes the stream when its token expires.
"""

from __future__ import annotations

from collections.abc import Awaitable
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from prefect_ws.server.security.auth import (
    BEARER_PROTOCOL_PREFIX,
    PRINCIPAL_SCOPE_KEY,
    Authenticator,
    AuthError,
    Principal,
    extract_credential,
    strip_credentials,
)
from prefect_ws.server.security.outcome import (
    Outcome,
    Refusal,
    first_headers,
    outcome_of,
    refuse,
)
from prefect_ws.settings import Settings


class RequireCredentials:
    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.authenticator = Authenticator.from_settings(settings)

    def _principal(self, scope: Scope, outcome: Outcome, credential: str | None) -> Principal:
        try:
            principal = self.authenticator.authenticate(credential)
        except AuthError as exc:
            raise Refusal(exc.status, exc.reason, exc.metric) from None
        if outcome.raw_run is not None:
            # An invalid run id is left to the endpoint (4400 / 400) once the caller is known.
            if outcome.run is not None and not principal.allows(outcome.run):
                raise Refusal(403, "token not valid for this run", "wrong_run")
        elif not principal.is_admin:
            raise Refusal(403, "this token is scoped to one run", "wrong_run")
        return principal

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine: nothing here waits, and no frame of this layer outlives the checks.
        if scope["type"] not in ("http", "websocket"):
            return self.app(scope, receive, send)
        raw_query = scope.get("query_string", b"")
        subprotocols = list(scope.get("subprotocols", []))
        credential = extract_credential(
            first_headers(scope),
            parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True),
            subprotocols,
        )
        scope["query_string"] = strip_credentials(raw_query)
        if scope["type"] == "websocket":
            scope["subprotocols"] = [
                p for p in subprotocols if not p.startswith(BEARER_PROTOCOL_PREFIX)
            ]
        outcome = outcome_of(scope)
        checked = outcome.guarded and (scope["path"] != "/metrics" or self.authenticator.enabled)
        if checked:
            try:
                scope[PRINCIPAL_SCOPE_KEY] = self._principal(scope, outcome, credential)
            except Refusal as refusal:
                return refuse(scope, receive, send, refusal)
        return self.app(scope, receive, send)
