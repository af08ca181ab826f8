"""Which ``Host`` a request may name: the defence against DNS rebinding.

A page on ``rebind.attacker.test`` whose name resolves to this server sends ``Host:
rebind.attacker.test``, and its ``Origin`` matches that host, so a same-origin check alone lets it
read every run. Requests must name a host of this server: ``PREFECT_WS_ALLOWED_HOSTS``, by default
the bound address, ``localhost``, the loopback addresses and the host of ``PREFECT_WS_PUBLIC_URL``.
Matching is Starlette's ``TrustedHostMiddleware`` (exact names, or ``*.example.com``; the port
is ignored); a refusal is ``400 invalid host header``. The probes (``/healthz``, ``/livez``,
``/metrics``) are exempt: an orchestrator calls them by the pod's address, and they show no run.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Final
from urllib.parse import urlsplit

from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from prefect_ws.server.security.outcome import Refusal, outcome_of, refuse
from prefect_ws.settings import Settings

LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1", "[::1]")
PROBES: Final = frozenset({"/healthz", "/livez", "/metrics"})
_PASSED: Final = "prefect_ws.host_allowed"


def allowed_hosts(settings: Settings) -> list[str]:
    """``PREFECT_WS_ALLOWED_HOSTS``, or the server's own names when it is unset."""
    if settings.allowed_hosts:
        return list(settings.allowed_hosts)
    hosts = [*LOOPBACK_NAMES, settings.host]
    if ":" in settings.host:
        hosts.append(f"[{settings.host}]")
    if settings.public_url:
        name = urlsplit(settings.public_url).hostname
        if name:
            hosts += [name, f"[{name}]"] if ":" in name else [name]
    return hosts


class HostAllowList:
    """Starlette's ``TrustedHostMiddleware`` decides, its refusal recorded like every other one.

    It is asked on its own (its app only marks the scope, its refusal goes nowhere), so the
    app's messages never pass through a wrapper here. Neither awaits anything, so the question
    is answered in one step, without a frame of this layer living as long as the stream.
    """

    def __init__(self, app: ASGIApp, *, hosts: list[str]) -> None:
        self.app = app
        self._trusted = TrustedHostMiddleware(_mark, allowed_hosts=hosts, www_redirect=False)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in PROBES:
            return self.app(scope, receive, send)
        outcome_of(scope)
        if self._allowed(scope, receive):
            return self.app(scope, receive, send)
        return refuse(scope, receive, send, Refusal(400, "invalid host header", "host"))

    def _allowed(self, scope: Scope, receive: Receive) -> bool:
        answer = self._trusted(scope, receive, _drop)
        try:
            answer.send(None)
        except StopIteration:
            return bool(scope.pop(_PASSED, False))
        answer.close()
        raise RuntimeError("TrustedHostMiddleware waited for something")


async def _mark(scope: Scope, receive: Receive, send: Send) -> None:
    scope[_PASSED] = True


async def _drop(message: Any) -> None:
    """Starlette's own refusal: :func:`refuse` answers instead."""
