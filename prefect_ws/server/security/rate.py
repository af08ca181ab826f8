"""Handshakes per client address (``PREFECT_WS_HANDSHAKE_RATE``, a moving window) -> 429."""

from __future__ import annotations

from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Scope

from prefect_ws.server.security.auth import is_loopback
from prefect_ws.server.security.outcome import Check, Outcome, Refusal
from prefect_ws.settings import Settings


def limits_address(settings: Settings, ip: str) -> bool:
    """Per-address limits skip loopback clients unless PREFECT_WS_LIMIT_LOOPBACK is set."""
    return settings.limit_loopback or not is_loopback(ip)


class HandshakeRate(Check):
    """WebSocket handshakes and ``/api/`` requests, counted per client address."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        super().__init__(app)
        self.settings = settings
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._rates = parse_many(settings.handshake_rate)

    def check(self, scope: Scope, outcome: Outcome) -> None:
        if not (scope["type"] == "websocket" or scope["path"].startswith("/api/")):
            return
        if not limits_address(self.settings, outcome.ip):
            return
        for rate in self._rates:
            if not self._limiter.hit(rate, "handshake", outcome.ip):
                raise Refusal(429, "too many handshakes from this address", "rate_limited")
