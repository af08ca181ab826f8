"""uvicorn's h11 protocol with deadlines and limits a public server needs.

- every request's head (and body) must arrive within ``handshake_timeout`` of the connection's
  start or of the previous response: uvicorn times out idle keep-alive connections, but a client
  dribbling one byte at a time (slowloris) resets that timer with each byte;
- a request head over :data:`MAX_HEAD_BYTES` is answered ``431`` (h11 would say 400);
- a WebSocket upgrade must be HTTP/1.1 (RFC 6455 section 4.1): anything else gets ``400``;
- a write buffer full for ``max_lag_seconds`` plus :data:`~.stall.GRACE` aborts the connection
  (:mod:`.stall`): an SSE client that stopped reading;
- a closed connection's transport is freed by reference counting (:mod:`.release`).

A WebSocket upgrade that arrives whole in one read is handed to the WebSocket protocol without
h11: that protocol parses the request anyway (uvicorn gives it the head h11 parsed, rebuilt as
bytes), and h11's parse plus the rebuilding were ~10 % of a handshake's server CPU. Which
requests qualify is decided as uvicorn decides an upgrade (``Upgrade: websocket`` and an
``upgrade`` token in ``Connection``); any other request, or a head in pieces, goes to h11.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from prefect_ws.server import metrics
from prefect_ws.server.security.headers import MAX_HEADER_BYTES
from prefect_ws.server.uvicorn import stall
from prefect_ws.server.uvicorn.release import ReleasesTransport

# uvicorn's h11 parses header blocks up to this size, so that the header check answers 431 with
# its reason for anything between MAX_HEADER_BYTES and this; larger is answered here.
MAX_HEAD_BYTES: Final = 4 * MAX_HEADER_BYTES
_INCOMPLETE: Final = (h11.IDLE, h11.SEND_BODY)


def _plain_answer(status: int, phrase: str, reason: str) -> bytes:
    body = json.dumps({"error": reason, "status": status}).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class PrefectWsHttpProtocol(ReleasesTransport, stall.AbortsStalledWrites, H11Protocol):
    header_deadline: float = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.head_bytes = 0
        self.deadline: asyncio.TimerHandle | None = None
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self.deadline = self.loop.call_later(self.header_deadline, self._deadline_expired)

    def _disarm_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _deadline_expired(self) -> None:
        self.deadline = None
        upgraded = self.transport.get_protocol() is not self
        waiting = self.conn.their_state in _INCOMPLETE
        if waiting and not upgraded and not self.transport.is_closing():
            metrics.refused("handshake_timeout")
            self.transport.abort()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_deadline()  # the next request on this keep-alive connection

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            head = None if self.head_bytes or len(data) > MAX_HEAD_BYTES else _upgrade_head(data)
            if head is not None:
                self._hand_over(head)
                return
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                metrics.refused("headers_too_large")
                reason = "request headers too large"
                self.transport.write(_plain_answer(431, "Request Header Fields Too Large", reason))
                self.transport.close()
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self.head_bytes = 0

    def handle_websocket_upgrade(self, event: Any) -> None:
        # The WebSocket protocol takes over: its timers are its own.
        self._disarm_deadline()
        if event.http_version != b"1.1":
            metrics.refused("http_version")
            self.transport.write(
                _plain_answer(400, "Bad Request", "WebSocket upgrades need HTTP/1.1")
            )
            self.transport.close()
            return
        super().handle_websocket_upgrade(event)

    def _hand_over(self, head: bytes) -> None:
        """What uvicorn's ``handle_websocket_upgrade`` does once h11 has parsed the head."""
        self._disarm_deadline()
        self.connections.discard(self)
        protocol = self.ws_protocol_class(  # type: ignore[call-arg, misc]
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        protocol.connection_made(self.transport)
        protocol.data_received(head)
        self.transport.set_protocol(protocol)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)


def _upgrade_head(data: bytes) -> bytes | None:
    """``data`` with lower-case header names if it is one whole HTTP/1.1 ``GET`` head, nothing
    after it, asking for a WebSocket upgrade (its last ``Upgrade`` header is ``websocket``, its
    last ``Connection`` header has the token ``upgrade``, as uvicorn's h11 protocol requires);
    else None. ASGI header names are lower-case: h11 makes them so, and uvicorn's WebSocket
    protocols pass on the names they parse as they are.

    The WebSocket protocol validates the rest (answering 400 to what it cannot parse), but not
    what h11 checks of a request's framing: a head without exactly one ``Host``, or with a body
    (``Content-Length``, ``Transfer-Encoding``), is left to h11.
    """
    if not data.startswith(b"GET ") or data.find(b"\r\n\r\n") != len(data) - 4:
        return None
    request_line, *headers = data[:-4].split(b"\r\n")
    if not request_line.endswith(b" HTTP/1.1"):
        return None
    lines = [request_line]
    upgrade = connection = None
    hosts = 0
    for header in headers:
        name, colon, value = header.partition(b":")
        name = name.lower()
        lines.append(name + colon + value)
        if name == b"upgrade":
            upgrade = value
        elif name == b"connection":
            connection = value
        elif name == b"host":
            hosts += 1
        elif name in (b"content-length", b"transfer-encoding"):
            return None
    if (
        hosts != 1
        or upgrade is None
        or connection is None
        or upgrade.strip().lower() != b"websocket"
        or b"upgrade" not in (token.strip().lower() for token in connection.split(b","))
    ):
        return None
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def http_protocol(*, header_deadline: float, max_lag_seconds: float) -> type[PrefectWsHttpProtocol]:
    """:class:`PrefectWsHttpProtocol` with the server's deadlines."""
    return type(
        "PrefectWsHttpProtocol",
        (PrefectWsHttpProtocol,),
        {"header_deadline": header_deadline, "max_stall": max_lag_seconds + stall.GRACE},
    )
