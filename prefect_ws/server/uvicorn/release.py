"""Free a closed connection's transport at once instead of leaving it to the cycle collector.

On Python 3.11 asyncio's socket transport keeps a bound method of itself (``_read_ready_cb``), a
reference cycle, so a closed transport, with its socket object, its extra-info dict and the
peer's address, is freed only when the cyclic garbage collector runs (Python 3.12 drops that
reference when the transport closes). A serving process runs young collections every 50,000 net
allocations (:mod:`~prefect_ws.server.gctuning`), so under connection churn thousands of closed
transports would wait for the collector at a time, and the allocator keeps such a peak
(``benchmarks/bench_soak.py`` measures RSS over connect/close cycles). Dropping the reference
once the connection is lost, as Python 3.12 does, lets reference counting free the transport. A
no-op where the attribute is absent (uvloop) or already cleared (Python 3.12+).
"""

from __future__ import annotations

import asyncio
from typing import Any


class ReleasesTransport(asyncio.Protocol):
    """Mixin for a uvicorn protocol: after ``connection_lost``, the transport's reference cycle
    is broken. Put it first: ``class P(ReleasesTransport, AbortsStalledWrites, H11Protocol)``."""

    transport: asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # asyncio calls this once the transport has stopped reading: its read callback is done.
        transport: Any = getattr(self, "transport", None)
        if getattr(transport, "_read_ready_cb", None) is not None:
            transport._read_ready_cb = None
