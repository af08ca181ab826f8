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


class AbortsStalledWrites(asyncio.Protocol):
    """Mixin for a uvicorn protocol: a write buffer full for ``max_stall`` seconds aborts the
    connection. Put it before the protocol class: ``class P(AbortsStalledWrites, H11Protocol)``."""

    max_stall: float = 30.0 + GRACE
    stall: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stall is None:
            self.stall = self.loop.call_later(self.max_stall, _abort, self.transport)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None


def _abort(transport: asyncio.Transport) -> None:
    if not transport.is_closing() or transport.get_write_buffer_size():
        metrics.aborted("write_stalled")
        transport.abort()
