"""uvicorn's websockets-sansio protocol, with one extension, some fixes and a smaller footprint.

The extension: pre-built frames (:mod:`prefect_ws.protocol.frames`). The scope of every connection
advertises :data:`~.frames.FRAMES_EXTENSION`, and a send message of that type writes its
bytes to the socket as they are, with the same flow control as a text message: it waits while
the write buffer is over its high-water mark. The extension's ``write_now(data)`` writes such
bytes from outside the connection's task, only when that needs no waiting.

The fix: when the upgrade request is malformed for the websockets parser (a request line over
8 KiB, say), ``websockets.ServerProtocol`` records the error, emits no event and sends nothing;
uvicorn 0.54 then never answers, so the connection hangs until the client gives up, holding a
socket per hostile request. This subclass answers ``400 Bad Request`` with the reason and closes.

A client that stops reading must not hold its connection, nor make the server queue bytes for it:

- a close while the client takes no data is written behind the unread bytes at once (uvicorn's
  waits for room in the write buffer, which a non-reader never makes), and the closing
  handshake's deadline aborts the transport (uvicorn's closes it, which waits for the buffer);
- a write buffer that stays over its high-water mark for ``max_lag_seconds`` plus
  :data:`~.stall.GRACE` aborts the transport (:mod:`.stall`), whatever the app is doing;
- pings get no pong while the buffer is over its high-water mark (RFC 6455 section 5.5.3 lets
  an endpoint answer only the latest ping): a ping flood from a non-reader costs nothing.

What a client can trigger at will logs one line without a traceback (invalid UTF-8: 1007), and
a refusal answered with ``websocket.http.response`` counts as a completed handshake, so uvicorn
does not log it as an app that forgot to answer.

The footprint: a server mostly holds idle connections, so what each one keeps matters. Measured
at 3,000 idle connections (docs/benchmarks.md §4), uvicorn's protocol kept ~15 KB per connection
that an idle stream never uses: the handshake's request and response (the websockets parser
keeps the request alive in its generator frame), an ``asyncio.Queue`` (four deques) for the one
reader of incoming messages, an ``asyncio.Event`` for flow control, a per-connection uuid. And a
closed connection leaves nothing to the cycle collector, which a serving process runs rarely
(:mod:`~prefect_ws.server.gctuning`): the websockets parser is closed, the transport released
(:mod:`.release`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Literal, cast

from uvicorn.config import Config
from uvicorn.protocols.utils import (
    ClientDisconnected,
    get_client_addr,
    get_path_with_query_string,
    is_ssl,
)
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request
from websockets.protocol import Protocol as FrameProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol

from prefect_ws.protocol.frames import FRAMES_EXTENSION, LISTEN_EXTENSION
from prefect_ws.server.uvicorn import stall
from prefect_ws.server.uvicorn.logs import client_noise
from prefect_ws.server.uvicorn.release import ReleasesTransport


def bad_request(reason: str) -> bytes:
    body = f"invalid WebSocket handshake: {reason}\n".encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class Inbox:
    """What uvicorn uses of ``asyncio.Queue`` (``put_nowait``, ``get``, ``empty``) for the one
    task that calls ``receive()``: a list made on demand and one future while it waits. Once
    the app asked for a listener (:data:`~.frames.LISTEN_EXTENSION`), messages go to it."""

    __slots__ = ("_items", "_listener", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._listener: Callable[[Any], None] | None = None

    @property
    def listened(self) -> bool:
        return self._listener is not None

    def listen(self, listener: Callable[[Any], None]) -> None:
        self._listener = listener
        items, self._items = self._items, None
        for item in items or ():
            listener(item)

    def put_nowait(self, item: Any) -> None:
        if self._listener is not None:
            self._listener(item)
            return
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


class PrefectWsProtocol(ReleasesTransport, stall.AbortsStalledWrites, WebSocketsSansIOProtocol):
    # What uvicorn's __init__ sets to the same value for every connection lives on the class:
    # with at most 30 attributes of its own, an instance's __dict__ takes CPython's shared-key
    # layout (~0.4 KB) instead of a table of its own (1.6 KB with uvicorn's 35 attributes).
    logger = logging.getLogger("uvicorn.error")
    close_timeout = stall.GRACE  # uvicorn: 10 s for the client's close reply
    handshake_initiated = handshake_complete = close_sent = disconnected = read_paused = False
    close_timer: asyncio.TimerHandle | None = None
    ping_timer: asyncio.TimerHandle | None = None
    pong_timer: asyncio.TimerHandle | None = None
    initial_response: tuple[int, list[tuple[str, str]], bytes] | None = None
    pending_ping_payload: bytes | None = None
    ping_sent_at = last_ping_rtt = 0.0
    curr_msg_data_type: Literal["text", "bytes"] = "bytes"
    ping_interval: float | None = None
    ping_timeout: float | None = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # WebSocketsSansIOProtocol.__init__ (uvicorn 0.54) but for the class attributes above.
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.root_path = config.root_path
        self.asgi_version = config.asgi_version
        self.app_state = app_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.default_headers = server_state.default_headers
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme: Literal["wss", "ws"] = None  # type: ignore[assignment]
        self.queue = Inbox()  # type: ignore[assignment]
        extensions = []
        if config.ws_per_message_deflate:
            extensions = [
                ServerPerMessageDeflateFactory(
                    server_max_window_bits=12,
                    client_max_window_bits=12,
                    compress_settings={"memLevel": 5},
                )
            ]
        self.conn = ServerProtocol(
            extensions=extensions, max_size=config.ws_max_size, logger=self.logger
        )
        self.conn.id = None  # type: ignore[assignment]  # a uuid4, only for websockets' logs
        self.writable = Writable()  # type: ignore[assignment]
        if config.ws_ping_interval != self.ping_interval:
            self.ping_interval = config.ws_ping_interval
        if config.ws_ping_timeout != self.ping_timeout:
            self.ping_timeout = config.ws_ping_timeout
        self.frames: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvicorn's (0.54), but for the addresses: the transport read both when it was made,
        # so its tuples are kept rather than asking the socket again (two system calls, and two
        # more tuples held for the connection's life).
        self.connections.add(self)
        self.transport = cast(asyncio.Transport, transport)
        sockname = transport.get_extra_info("sockname")
        self.server = (sockname, None) if isinstance(sockname, str) else _host_port(sockname)
        self.client = _host_port(transport.get_extra_info("peername"))
        self.scheme = "wss" if is_ssl(self.transport) else "ws"

    @property
    def inbox(self) -> Inbox:
        return cast(Inbox, self.queue)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)  # builds the scope and schedules the app, not yet run
        scope = getattr(self, "scope", None)  # none when the handshake was refused
        if scope is not None:
            extensions = scope["extensions"]
            extensions[FRAMES_EXTENSION] = {"write_now": self.write_now}
            extensions[LISTEN_EXTENSION] = {}

    def write_now(self, data: bytes) -> bool:
        """Write pre-built frames at once if the connection takes data now (open, write buffer
        under its high-water mark); False, with nothing written, otherwise."""
        if not (self.writable.is_set() and self._open()):
            return False
        self.transport.write(data)
        return True

    def start_keepalive(self) -> None:
        # uvicorn calls this right after writing the 101: the handshake's objects are done with.
        self.request = None  # type: ignore[assignment]
        self.response = None  # type: ignore[assignment]
        # So is the scope: uvicorn reads it only to log the handshake, and the app read what
        # it needed before accepting. Emptied in place, since the app's frames hold it too.
        cast(dict[str, Any], self.scope).clear()
        conn = self.conn
        # ServerProtocol.parse() keeps the request as a local of its generator for the
        # connection's life: restart parsing at the frame level. A client waits for the 101
        # before it sends frames, so the buffer is empty; if one did not, keep the old parser.
        if not conn.reader.buffer and conn.parser_exc is None:
            conn.parser = FrameProtocol.parse(conn)
            next(conn.parser)
        super().start_keepalive()

    def handle_ping(self) -> None:
        pongs = self.conn.data_to_send()
        if self.writable.is_set():
            self.transport.write(b"".join(pongs))

    def keepalive_timeout(self) -> None:
        if self.transport.get_write_buffer_size():
            self.close_sent = True
            self.transport.abort()  # the close frame would wait behind unread bytes
            return
        super().keepalive_timeout()

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "websocket.accept" and FRAMES_EXTENSION in message:
            self._accept(message)
            return
        if kind == FRAMES_EXTENSION:
            await self.writable.wait()
            if not self._open():
                raise ClientDisconnected()
            self.transport.write(message["data"])
            return
        if kind == LISTEN_EXTENSION:
            self.inbox.listen(message["listener"])
            if self.read_paused:
                self.read_paused = False
                self.transport.resume_reading()
            return
        if kind == "websocket.close" and not self.writable.is_set() and self._open():
            # The client takes no data now: put the close frame behind what it has not read
            # (a client that reads again gets it) instead of waiting for room, forever for a
            # client that stopped reading; the closing handshake's deadline aborts the rest.
            code, reason = message.get("code", 1000), message.get("reason") or ""
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.conn.send_close(code, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)
            return
        await super().send(message)
        if kind == "websocket.close" and self.close_timer is not None:
            # The closing handshake's deadline: uvicorn's transport.close() would wait for the
            # write buffer to drain, forever for a client that stopped reading.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)
        elif kind == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True  # answered (a refusal): not an app that forgot to

    def _accept(self, message: Any) -> None:
        """uvicorn's answer to ``websocket.accept`` (0.54), with the message's pre-built frames
        written in the same ``write()`` as the 101 (see :mod:`~.frames`): a client waits for
        its first frame anyway, and each write is a system call."""
        if self.handshake_complete or self.initial_response is not None:
            raise RuntimeError(f"unexpected ASGI message {message['type']!r}")
        if self.disconnected:
            raise ClientDisconnected()
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(
                '%s - "WebSocket %s" [accepted]',
                get_client_addr(self.scope),
                get_path_with_query_string(self.scope),
            )
        headers = [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in (self.default_headers + list(message.get("headers", [])))
        ]
        if message.get("subprotocol"):
            headers.append(("Sec-WebSocket-Protocol", message["subprotocol"]))
        del self.response.headers["Date"]
        self.response.headers.update(headers)
        if not self.transport.is_closing():
            self.handshake_complete = True
            self.conn.send_response(self.response)
            self.transport.write(b"".join([*self.conn.data_to_send(), message[FRAMES_EXTENSION]]))
            self.start_keepalive()

    def send_receive_event_to_app(self) -> None:
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # past the app's close: only the peer's close reply matters
        if self.curr_msg_data_type == "text":
            try:
                self.queue.put_nowait({"type": "websocket.receive", "text": data.decode()})
            except UnicodeDecodeError:
                if self.conn.state is not State.OPEN:
                    return  # already closing (the client's close came first): nothing to add
                client_noise.warning(
                    "invalid UTF-8 in a text frame from %s; closed 1007", self.peer
                )
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        else:
            self.queue.put_nowait({"type": "websocket.receive", "bytes": data})
        if not self.read_paused and not self.inbox.listened:
            self.read_paused = True
            self.transport.pause_reading()

    def _open(self) -> bool:
        return self.handshake_complete and not self.close_sent and not self.disconnected

    @property
    def peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "-"

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # The websockets parser is a generator suspended on the connection's reader, and its
        # frame holds the connection: a cycle only the collector would free (with the reader's
        # buffers). Closed, it holds nothing.
        self.conn.parser.close()
        # The scope of a handshake that never completed offers this protocol's write_now:
        # another cycle (protocol -> scope -> it). An accepted stream's scope is empty.
        scope = getattr(self, "scope", None)
        if scope:
            scope["extensions"][FRAMES_EXTENSION] = {}

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        error = self.conn.handshake_exc
        if not self.handshake_initiated and error is not None and not self.transport.is_closing():
            cause = error.__cause__ or error
            self.transport.write(bad_request(str(cause) or type(cause).__name__))
            self.transport.close()


def _host_port(address: object) -> tuple[str, int] | None:
    """An IP socket's address as ``(host, port)``, the tuple itself for IPv4; None otherwise."""
    if isinstance(address, tuple) and len(address) >= 2:
        return address if len(address) == 2 else (address[0], address[1])
    return None


def websocket_protocol(
    max_lag_seconds: float, *, ping_interval: float | None = None, ping_timeout: float | None = None
) -> type[PrefectWsProtocol]:
    """:class:`PrefectWsProtocol` aborting connections whose writes stall for longer than
    ``max_lag_seconds`` (when the app closes them with 1013) plus :data:`~.stall.GRACE`, its
    keep-alive pings (uvicorn's ``ws_ping_interval``, ``ws_ping_timeout``) on the class."""
    max_stall = max_lag_seconds + stall.GRACE
    attributes = {
        "max_stall": max_stall,
        "ping_interval": ping_interval,
        "ping_timeout": ping_timeout,
    }
    return type("PrefectWsProtocol", (PrefectWsProtocol,), attributes)
