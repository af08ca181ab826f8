"""Server-Sent Events framing for proxies that break WebSockets.

Events are sent with ``id: <seq>`` so a reconnecting ``EventSource`` resumes with
``Last-Event-ID``; the ``hello`` frame and the end of the stream are named events (``hello``,
``end``) that ``onmessage`` handlers never see. A comment line keeps idle connections open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import cast

from prefect_ws.backends import BackendUnavailable
from prefect_ws.protocol import closecodes
from prefect_ws.protocol.events import Frame
from prefect_ws.server.hub import StreamClosed
from prefect_ws.server.security.outcome import Outcome
from prefect_ws.server.streams import Stream

RETRY_MS = 2000
_END = object()


def format_item(item: str | list[Frame]) -> str:
    """The hello frame's text, or a batch of events: one SSE event each."""
    if isinstance(item, str):
        return f"event: hello\ndata: {item}\n\n"
    return "".join([f"id: {frame.seq}\ndata: {frame.data}\n\n" for frame in item])


def format_end(code: int, reason: str) -> str:
    return f"event: end\ndata: {json.dumps({'code': code, 'reason': reason})}\n\n"


async def sse_body(stream: Stream, *, keepalive: float, outcome: Outcome) -> AsyncIterator[str]:
    """The response body; a producer task feeds a one-slot queue so idle time can send pings.

    The events sent and the end of the stream are reported in ``outcome``."""
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=1)

    async def produce() -> None:
        try:
            await queue.put(await stream.hello())
            while (batch := await stream.next()) is not None:
                await queue.put(batch)
            await queue.put(StreamClosed(closecodes.RUN_COMPLETE, "run complete"))
        except StreamClosed as closed:
            await queue.put(closed)
        except BackendUnavailable:  # backend down: the client reconnects with Last-Event-ID
            await queue.put(StreamClosed(closecodes.TRY_AGAIN_LATER, "backend unavailable"))

    producer = asyncio.create_task(produce())
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), keepalive)
            except TimeoutError:
                if producer.done() and queue.empty():
                    producer.result()  # surface a crash
                    return
                yield ": keepalive\n\n"
                continue
            if isinstance(item, StreamClosed):
                outcome.end(item.code, item.reason)
                yield format_end(item.code, item.reason)
                return
            yield format_item(cast(str | list[Frame], item))
            if isinstance(item, list):
                outcome.sent(len(item))
    finally:
        producer.cancel()
        with contextlib.suppress(BaseException):
            await producer
        with contextlib.suppress(BaseException):
            await stream.aclose()
