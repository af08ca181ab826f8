"""One structured log line per stream connect and disconnect, and per refusal; the metrics.

uvicorn's own access line shows the path and query (where a browser's token may sit) and
nothing about how a stream ended. These lines carry what an operator needs instead: run id,
client address, duration, close code and reason, events sent; as ``key=value`` text or JSON.
Values come from clients, so text values are quoted and escaped: no injected line breaks.

:class:`AccessLogMiddleware` is the outermost of prefect-ws' middlewares: it puts an
:class:`~prefect_ws.server.security.outcome.Outcome` in each request's scope, the checks and
endpoints fill it in, and it writes the lines and counts the metrics from it alone.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

from starlette.types import ASGIApp, Receive, Scope, Send

from prefect_ws.protocol.events import utc_timestamp
from prefect_ws.server import metrics
from prefect_ws.server.security.outcome import OUTCOME_SCOPE_KEY, Outcome, describe
from prefect_ws.server.security.redact import redact
from prefect_ws.settings import Settings

logger = logging.getLogger("prefect_ws.access")

_PLAIN: Final = re.compile(r"^[A-Za-z0-9_.:/\[\]*-]{1,200}$")


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    text = str(value)
    return text if _PLAIN.match(text) else json.dumps(text[:200])


class AccessLog:
    """Writes connect/disconnect lines to the ``prefect_ws.access`` logger."""

    def __init__(
        self, *, enabled: bool = True, json_lines: bool = False, level: str = "INFO"
    ) -> None:
        self.enabled = enabled
        self.json_lines = json_lines
        logger.setLevel(level)
        _json_to_stderr(json_lines)

    def connect(self, **fields: Any) -> None:
        self._write("connect", fields)

    def disconnect(self, **fields: Any) -> None:
        self._write("disconnect", fields)

    def refuse(self, **fields: Any) -> None:
        self._write("refuse", fields)

    def _write(self, event: str, fields: dict[str, Any]) -> None:
        if not self.enabled or not logger.isEnabledFor(logging.INFO):
            return
        if self.json_lines:
            line = json.dumps(
                {"ts": utc_timestamp(), "level": "INFO", "event": event, **fields},
                separators=(",", ":"),
                default=str,
            )
        else:
            line = " ".join([event, *(f"{k}={_text_value(v)}" for k, v in fields.items())])
        logger.info(line)


class _BareJsonHandler(logging.Handler):
    """stderr, message only: each line is one JSON object a log shipper can parse as is."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(record.getMessage() + "\n")  # looked up now: stderr may be swapped
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _json_to_stderr(enabled: bool) -> None:
    # JSON lines must not be wrapped in another formatter's prefix (Prefect's, uvicorn's);
    # text lines go wherever the process's logging config sends them.
    ours = [h for h in logger.handlers if isinstance(h, _BareJsonHandler)]
    if enabled and not ours:
        logger.addHandler(_BareJsonHandler())
    elif not enabled:
        for handler in ours:
            logger.removeHandler(handler)
    logger.propagate = not enabled


def client_address(scope: Mapping[str, Any]) -> str | None:
    client = scope.get("client")
    if not client:
        return None
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class AccessLogMiddleware:
    """Writes each request's :class:`Outcome`: connect/disconnect/refuse lines and metrics."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.log = AccessLog(
            enabled=settings.access_log, json_lines=settings.log_json, level=settings.log_level
        )

    def _run(self, outcome: Outcome) -> str | None:
        if outcome.run is not None or outcome.raw_run is None:
            return outcome.run
        return redact(outcome.raw_run)

    def _accepted(self, outcome: Outcome) -> None:
        metrics.connection_opened(outcome.transport)
        self.log.connect(run=self._run(outcome), client=outcome.client, transport=outcome.transport)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        outcome = scope[OUTCOME_SCOPE_KEY] = describe(scope)
        client = outcome.client = client_address(scope)
        started = time.monotonic()
        outcome.on_accept = self._accepted
        outcome.on_finish = []
        try:
            await self.app(scope, receive, send)
        finally:
            for finish in outcome.on_finish:
                finish(outcome)
            if outcome.refusal is not None:
                metrics.refused(outcome.refusal)
                self.log.refuse(
                    run=self._run(outcome),
                    client=client,
                    status=outcome.status,
                    reason=outcome.reason,
                )
            elif outcome.accepted:
                metrics.connection_closed(outcome.transport)
                if outcome.by_server and outcome.code is not None and outcome.transport == "ws":
                    metrics.closed(outcome.code)
                self.log.disconnect(
                    run=self._run(outcome),
                    client=client,
                    transport=outcome.transport,
                    duration=round(time.monotonic() - started, 3),
                    code=outcome.code,
                    reason=outcome.reason or "client disconnected",
                    events=outcome.events,
                )
