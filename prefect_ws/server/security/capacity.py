"""How many streams, from where, of how many runs: slots taken by open streams -> 503/429.

A stream holds its slot from the check to the moment its connection is gone, whatever ended it
(the run, the client, a timeout, an aborted transport).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from prefect_ws.server.security.outcome import Outcome, Refusal, outcome_of, refuse
from prefect_ws.server.security.rate import limits_address
from prefect_ws.settings import Settings


class StreamCapacity:
    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        active_runs: Callable[[], Collection[str]] = lambda: (),
    ) -> None:
        self.app = app
        self.settings = settings
        self.active_runs = active_runs
        self.open_total = 0
        self.open_per_ip: Counter[str] = Counter()

    def check(self, outcome: Outcome) -> None:
        settings, ip = self.settings, outcome.ip
        if self.open_total >= settings.max_connections:
            raise Refusal(503, "server at its connection limit", "max_connections")
        if self.open_per_ip[ip] >= settings.max_connections_per_ip and limits_address(settings, ip):
            raise Refusal(429, "too many connections from this address", "max_connections_per_ip")
        if outcome.run is not None:
            runs = self.active_runs()
            if outcome.run not in runs and len(runs) >= settings.max_runs:
                raise Refusal(503, "server at its run limit", "max_runs")

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] not in ("http", "websocket"):
            return self.app(scope, receive, send)
        outcome = outcome_of(scope)
        if not outcome.streaming:
            return self.app(scope, receive, send)
        try:
            self.check(outcome)
        except Refusal as refusal:
            return refuse(scope, receive, send, refusal)
        self.open_total += 1
        self.open_per_ip[outcome.ip] += 1
        if outcome.on_finish is not None:
            # The access log runs it when the request is over: no frame held here meanwhile.
            outcome.on_finish.append(self._release)
            return self.app(scope, receive, send)
        return self._holding(outcome, scope, receive, send)

    def _release(self, outcome: Outcome) -> None:
        ip = outcome.ip
        self.open_total -= 1
        self.open_per_ip[ip] -= 1
        if self.open_per_ip[ip] <= 0:
            del self.open_per_ip[ip]

    async def _holding(self, outcome: Outcome, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            self._release(outcome)
