"""A Python client for the stream: follow a run, resuming with ``since`` after any drop.

``follow`` yields each event once, in ``seq`` order, and returns after ``run_complete``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from prefect_ws import closecodes

# Codes after which reconnecting with since=<last seq> is the right move.
RESUMABLE = frozenset(
    {
        closecodes.GOING_AWAY,
        1006,
        closecodes.INTERNAL_ERROR,
        1012,
        closecodes.TRY_AGAIN_LATER,
    }
)


class StreamError(Exception):
    """The server refused the stream; retrying unchanged will not help."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"{reason} (close code {code})")
        self.code = code
        self.reason = reason


def stream_url(base: str, run_id: str, since: int = 0) -> str:
    """``ws://host:port`` + run id -> the run's stream URL."""
    url = f"{base.rstrip('/')}/api/v2/workflows/runs/{run_id}/stream"
    return f"{url}?{urlencode({'since': since})}" if since else url


async def follow(
    base_url: str,
    run_id: str,
    *,
    since: int = 0,
    max_retries: int = 30,
    open_timeout: float = 10.0,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the run's events from ``since`` on; reconnect and resume when the connection drops."""
    last_seq = since
    failures = 0
    while True:
        try:
            async with connect(
                stream_url(base_url, run_id, last_seq),
                open_timeout=open_timeout,
                max_size=2**24,
                compression=None,
            ) as websocket:
                failures = 0
                async for message in websocket:
                    event = json.loads(message)
                    if event["seq"] <= last_seq:
                        continue
                    last_seq = event["seq"]
                    yield event
                    if event["type"] == "run_complete":
                        return
                code, reason = _close_of(websocket)
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "connection lost")
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            code, reason = 1006, str(exc)
        if code == closecodes.RUN_COMPLETE:
            return
        if code not in RESUMABLE:
            raise StreamError(code, reason)
        failures += 1
        if failures > max_retries:
            raise StreamError(code, f"gave up after {max_retries} reconnects: {reason}")
        await asyncio.sleep(min(0.1 * 2**failures, 5.0))


def _close_of(websocket: Any) -> tuple[int, str]:
    rcvd = websocket.close_code
    return (rcvd if rcvd is not None else 1006), (websocket.close_reason or "")
