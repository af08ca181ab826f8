"""uvicorn's websockets-sansio protocol, with one fix and one extension.

The extension: pre-built frames (:mod:`prefect_ws.wire`). The scope of every connection
advertises :data:`~prefect_ws.wire.FRAMES_EXTENSION`, and a send message of that type writes its
bytes to the socket as they are, with the same flow control as a text message: it waits while
the write buffer is over its high-water mark.

The fix: answer a handshake it cannot parse.

When the upgrade request is malformed for the websockets parser (a request line over 8 KiB,
say), ``websockets.ServerProtocol`` records the error, emits no event and sends nothing; uvicorn
0.54 then never answers, so the connection hangs until the client gives up, holding a socket
per hostile request. This subclass answers ``400 Bad Request`` with the reason and closes.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from prefect_ws.wire import FRAMES_EXTENSION


def bad_request(reason: str) -> bytes:
    body = f"invalid WebSocket handshake: {reason}\n".encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class PrefectWsProtocol(WebSocketsSansIOProtocol):
    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)  # builds the scope and schedules the app, not yet run
        scope = getattr(self, "scope", None)  # none when the handshake was refused
        if scope is not None:
            scope["extensions"][FRAMES_EXTENSION] = {}

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
