"""uvicorn's websockets-sansio protocol, with one fix: answer a handshake it cannot parse.

When the upgrade request is malformed for the websockets parser (a request line over 8 KiB,
say), ``websockets.ServerProtocol`` records the error, emits no event and sends nothing; uvicorn
0.54 then never answers, so the connection hangs until the client gives up, holding a socket
per hostile request. This subclass answers ``400 Bad Request`` with the reason and closes.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


def bad_request(reason: str) -> bytes:
    body = f"invalid WebSocket handshake: {reason}\n".encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class PrefectWsProtocol(WebSocketsSansIOProtocol):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        error = self.conn.handshake_exc
        if not self.handshake_initiated and error is not None and not self.transport.is_closing():
            cause = error.__cause__ or error
            self.transport.write(bad_request(str(cause) or type(cause).__name__))
            self.transport.close()
