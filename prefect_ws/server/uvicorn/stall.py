"""Abort a connection whose client stopped taking data.

asyncio pauses a protocol's writes when its transport's buffer passes the high-water mark (64 KiB)
and resumes them when the client has read enough. A buffer that stays full for the lag limit
belongs to a client that stopped reading: its connection is aborted (not closed: a close waits
for the buffer to drain), which frees its socket, its slot in the limits and its gauges.

The app closes a WebSocket client that stayed behind for the lag limit with 1013; the close
frame waits behind the unread bytes for :data:`GRACE` seconds, so that a client that reads
again learns why, before the transport is aborted.
"""

from __future__ import annotations

import asyncio
from typing import Final

from prefect_ws.server import metrics

GRACE: Final = 5.0  # seconds past the lag limit before a stalled connection is aborted


def arm(
    timer: asyncio.TimerHandle | None,
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.BaseTransport,
    seconds: float,
) -> asyncio.TimerHandle:
    """Called when writes pause: the timer that aborts ``transport`` after ``seconds``."""
    if timer is not None:
        return timer
    return loop.call_later(seconds, _abort, transport)


def disarm(timer: asyncio.TimerHandle | None) -> None:
    """Called when writes resume or the connection is lost."""
    if timer is not None:
        timer.cancel()


def _abort(transport: asyncio.BaseTransport) -> None:
    if not transport.is_closing() or transport.get_write_buffer_size():  # type: ignore[attr-defined]
        metrics.aborted("write_stalled")
        transport.abort()  # type: ignore[attr-defined]
