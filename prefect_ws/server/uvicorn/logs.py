"""What reaches the server's log from uvicorn and websockets: no credential, and no flood.

Two filters on uvicorn's loggers (websockets logs through ``uvicorn.error`` too):

- :class:`RedactCredentials` rewrites any line that could carry a credential
  (:func:`~prefect_ws.server.security.redact.redact`): websockets logs the request line at DEBUG,
  and uvicorn the path with its query at INFO, before or beside the app;
- :class:`ClientNoise` keeps lines a client can trigger at will (a malformed request, invalid
  UTF-8) to one line each, without a traceback, at most :data:`BURST` per message per minute.

:data:`client_noise` is the logger for such lines written by prefect-ws' own protocol code.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from prefect_ws.server.security.redact import redact

BURST: Final = 5  # lines per message and minute
WINDOW: Final = 60.0
# uvicorn 0.54's and websockets 16's messages for what a client sent (websockets logs the
# first five with a traceback, at DEBUG or ERROR).
CLIENT_MESSAGES: Final = frozenset(
    {
        "Invalid HTTP request received.",
        "Unsupported upgrade request.",
        "Invalid UTF-8 sequence received from client.",
        "! invalid origin",
        "! invalid upgrade",
        "! invalid handshake",
        "opening handshake failed",
        "parser failed",
    }
)

client_noise = logging.getLogger("prefect_ws.client_errors")


class RedactCredentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class ClientNoise(logging.Filter):
    """At most :data:`BURST` lines per message per :data:`WINDOW`, one line, no traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._windows: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = record.msg if isinstance(record.msg, str) else str(record.msg)
        if record.name != client_noise.name and key not in CLIENT_MESSAGES:
            return True
        record.exc_info = record.exc_text = None
        record.stack_info = None
        now = time.monotonic()
        started, count = self._windows.get(key, (now, 0))
        if now - started > WINDOW:
            if count > BURST:
                record.msg = f"{key} ({count - BURST} similar lines suppressed)"
            started, count = now, 0
        if len(self._windows) > 100 and key not in self._windows:
            self._windows.clear()
        self._windows[key] = (started, count + 1)
        return count < BURST


_FILTERED: Final = ("uvicorn.error", "uvicorn.access", client_noise.name)


def install() -> None:
    """Put the filters on uvicorn's loggers and prefect-ws' client-error logger (once)."""
    for name in _FILTERED:
        logger = logging.getLogger(name)
        for kind in (RedactCredentials, ClientNoise):
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())
