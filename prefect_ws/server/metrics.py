"""Prometheus metrics: what operators alert on (connections, refusals, lag, delivery latency).

No metric has a run id label: runs are unbounded, and one time series per run would grow a
Prometheus server without limit. Labels only take values from small fixed sets.

The metric objects are process-wide so that the hub, the access log and the protocols count with one
call each; every app gets its own registry holding them plus the gauges read from its own state
(active runs, lagging clients, backend reconnects) at scrape time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from prefect_ws.protocol.events import Frame, event_age

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

CONNECTIONS_OPEN = Gauge(
    "prefect_ws_connections_open", "Streams open now.", ["transport"], registry=None
)
CONNECTIONS = Counter("prefect_ws_connections", "Streams accepted.", ["transport"], registry=None)
REFUSALS = Counter(
    "prefect_ws_refusals",
    "Requests refused before the upgrade, by reason (auth and limits).",
    ["reason"],
    registry=None,
)
CLOSES = Counter(
    "prefect_ws_closes",
    "WebSocket streams closed by the server, by close code (1013: closed for slowness).",
    ["code"],
    registry=None,
)
ABORTS = Counter(
    "prefect_ws_aborts",
    "Connections aborted below the app, by reason (write_stalled: a client that stopped reading).",
    ["reason"],
    registry=None,
)
EVENTS_RECEIVED = Counter(
    "prefect_ws_events_received",
    "Events published to this process by the backend (live), before fan-out.",
    registry=None,
)
LATENCY_SAMPLE: Final = 16  # parsing every batch's ts would cost more than its send
EVENTS_DELIVERED = Counter(
    "prefect_ws_events_delivered",
    "Events handed to clients, by path: live or replay (from history).",
    ["path"],
    registry=None,
)
REPLAYS = Counter(
    "prefect_ws_replays",
    "Catch-ups from history: joins with since, resyncs after overflow or a backend reconnect.",
    registry=None,
)
LATENCY = Histogram(
    "prefect_ws_delivery_latency_seconds",
    "Publish (event ts) to hand-off to the client's writer, live events only; "
    f"sampled: the newest event of one live hand-off in {LATENCY_SAMPLE}.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=None,
)
_CLOSE_CODES: Final = frozenset({1000, 1001, 1008, 1009, 1011, 1013, 4400, 4401, 4404})


def connection_opened(transport: str) -> None:
    CONNECTIONS.labels(transport).inc()
    CONNECTIONS_OPEN.labels(transport).inc()


def connection_closed(transport: str) -> None:
    CONNECTIONS_OPEN.labels(transport).dec()


def refused(reason: str) -> None:
    REFUSALS.labels(reason).inc()


def aborted(reason: str) -> None:
    ABORTS.labels(reason).inc()


def closed(code: int) -> None:
    # Unknown codes share one label value, so a client cannot mint new series.
    CLOSES.labels(str(code) if code in _CLOSE_CODES else "other").inc()


def received(count: int) -> None:
    EVENTS_RECEIVED.inc(count)


def replay_started() -> None:
    REPLAYS.inc()


_DELIVERED_LIVE = EVENTS_DELIVERED.labels("live")  # label lookups cost microseconds per call
_DELIVERED_REPLAY = EVENTS_DELIVERED.labels("replay")
_live_deliveries = itertools.count()


def delivered_replay(count: int) -> None:
    _DELIVERED_REPLAY.inc(count)


def delivered_live(frames: list[Frame], clients: int = 1) -> None:
    """Counts a live delivery (of the same frames to ``clients`` clients) and, for one call
    in :data:`LATENCY_SAMPLE`, observes the latency of its newest frame."""
    _DELIVERED_LIVE.inc(len(frames) * clients)
    if next(_live_deliveries) % LATENCY_SAMPLE:
        return
    latency = event_age(frames[-1].data)
    if latency is not None:
        LATENCY.observe(latency)


class _AppState(Collector):
    """Gauges read from one app's live state at scrape time."""

    def __init__(self, state: Any) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        hub = getattr(self._state, "hub", None)
        runs = list(getattr(hub, "runs", {}).values())
        yield GaugeMetricFamily(
            "prefect_ws_runs_active", "Runs this process is subscribed to.", value=len(runs)
        )
        lagging = sum(
            1
            for channel in runs
            for subscription in list(channel.subscriptions)
            if getattr(subscription, "behind_since", None) is not None
        )
        yield GaugeMetricFamily(
            "prefect_ws_clients_lagging", "Clients catching up after overflowing.", value=lagging
        )
        backend = getattr(getattr(self._state, "transport", None), "backend", None)
        yield CounterMetricFamily(
            "prefect_ws_backend_reconnects",
            "Times the backend subscription reconnected (Redis restarts, dropped connections).",
            value=int(getattr(backend, "reconnects", 0) or 0),
        )


_SHARED: Final = (
    CONNECTIONS_OPEN,
    CONNECTIONS,
    REFUSALS,
    CLOSES,
    ABORTS,
    EVENTS_RECEIVED,
    EVENTS_DELIVERED,
    REPLAYS,
    LATENCY,
)


def registry_for(state: Any) -> CollectorRegistry:
    """A registry with the process-wide metrics and the gauges of one app's ``state``."""
    registry = CollectorRegistry(auto_describe=True)
    for metric in _SHARED:
        registry.register(metric)
    registry.register(_AppState(state))
    return registry


async def livez(request: Request) -> Response:
    """``GET /livez``: the process answers. Unlike ``/healthz`` (readiness: 503 while the backend
    is unreachable) it never fails for Redis, so an orchestrator does not restart healthy
    replicas during a Redis outage they will recover from by themselves."""
    return Response('{"status":"alive"}', media_type="application/json")


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics`` in the Prometheus text format."""
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = request.app.state.metrics_registry = registry_for(request.app.state)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)
