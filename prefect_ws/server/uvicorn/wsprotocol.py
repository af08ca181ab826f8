"""uvicorn's websockets-sansio protocol, with one extension, one fix and a smaller footprint.

The extension: pre-built frames (:mod:`prefect_ws.protocol.frames`). The scope of every connection
advertises :data:`~.frames.FRAMES_EXTENSION`, and a send message of that type writes its
bytes to the socket as they are, with the same flow control as a text message: it waits while
the write buffer is over its high-water mark.

The fix: when the upgrade request is malformed for the websockets parser (a request line over
8 KiB, say), ``websockets.ServerProtocol`` records the error, emits no event and sends nothing;
uvicorn 0.54 then never answers, so the connection hangs until the client gives up, holding a
socket per hostile request. This subclass answers ``400 Bad Request`` with the reason and closes.

The footprint: a server mostly holds idle connections, so what each one keeps matters. Measured
at 3,000 idle connections (docs/benchmarks.md §4), uvicorn's protocol kept ~15 KB per connection
that an idle stream never uses: the handshake's request and response (the websockets parser
keeps the request alive in its generator frame), an ``asyncio.Queue`` (four deques) for the one
reader of incoming messages, an ``asyncio.Event`` for flow control, a per-connection uuid.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import Protocol as FrameProtocol

from prefect_ws.protocol.frames import FRAMES_EXTENSION


def bad_request(reason: str) -> bytes:
    body = f"invalid WebSocket handshake: {reason}\n".encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class Inbox:
    """What uvicorn uses of ``asyncio.Queue`` (``put_nowait``, ``get``, ``empty``) for the one
    task that calls ``receive()``: a list made on demand and one future while it waits."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.pop(0)
        if not self._items:
            self._items = None
        return item


class Writable:
    """``asyncio.Event``'s ``set``/``clear``/``wait``/``is_set`` for flow control, holding a
    future only while the transport is paused."""

    __slots__ = ("_paused",)

    def __init__(self) -> None:
        self._paused: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._paused is None

    def set(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def clear(self) -> None:
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_future()

    async def wait(self) -> None:
        while (paused := self._paused) is not None:
            await asyncio.shield(paused)  # a cancelled sender must not cancel the others


class PrefectWsProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Writable()  # type: ignore[assignment]
        self.conn.id = None  # type: ignore[assignment]  # a uuid4, only for websockets' logs

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)  # builds the scope and schedules the app, not yet run
        scope = getattr(self, "scope", None)  # none when the handshake was refused
        if scope is not None:
            scope["extensions"][FRAMES_EXTENSION] = {}

    def start_keepalive(self) -> None:
        # uvicorn calls this right after writing the 101: the handshake's objects are done with.
        self.request = None  # type: ignore[assignment]
        self.response = None  # type: ignore[assignment]
        conn = self.conn
        # ServerProtocol.parse() keeps the request as a local of its generator for the
        # connection's life: restart parsing at the frame level. A client waits for the 101
        # before it sends frames, so the buffer is empty; if one did not, keep the old parser.
        if not conn.reader.buffer and conn.parser_exc is None:
            conn.parser = FrameProtocol.parse(conn)
            next(conn.parser)
        super().start_keepalive()

    async def send(self, message: Any) -> None:
        if message["type"] != FRAMES_EXTENSION:
            await super().send(message)
            return
        await self.writable.wait()
        if self.disconnected or self.close_sent or not self.handshake_complete:
            raise ClientDisconnected()
        self.transport.write(message["data"])

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        error = self.conn.handshake_exc
        if not self.handshake_initiated and error is not None and not self.transport.is_closing():
            cause = error.__cause__ or error
            self.transport.write(bad_request(str(cause) or type(cause).__name__))
            self.transport.close()
