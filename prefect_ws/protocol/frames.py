"""WebSocket frames built once per event and written as they are.

Without permessage-deflate (prefect-ws turns it off) the bytes of a server's text frame depend
on the payload alone: no mask, no per-connection state. So each event is framed once per
process and the same bytes go to every client watching the run, and a client that is behind
gets its whole backlog in one ``write()``. Serialising a frame and writing it, once per event
per client, was most of the server's time in the fan-out profiles (docs/benchmarks.md §3).

Servers that can take such pre-framed bytes say so with the ASGI extension
:data:`FRAMES_EXTENSION` in the connection scope and accept the send message
``{"type": FRAMES_EXTENSION, "data": <bytes>, "events": <count>}``; prefect-ws' own uvicorn
protocol (:mod:`~prefect_ws.server.uvicorn.wsprotocol`) does. Elsewhere the app sends text
messages one by one. The extension's value may hold ``"write_now"``: a callable that writes
such bytes at once, from any task, when the connection takes them without waiting, and
returns whether it did (the hub writes a level client's live events with it). Its
``websocket.accept`` may carry pre-built frames under the extension's name: they are written
with the 101 response in one ``write()`` (a stream's hello goes so).

:data:`LISTEN_EXTENSION`, from the same protocol: the send message
``{"type": LISTEN_EXTENSION, "listener": <callable>}`` hands every later receive message
(``websocket.receive``, ``websocket.disconnect``) to ``listener`` as it arrives, instead of
keeping it for ``receive()``: an app with nothing to read but the client leaving needs no task
waiting in ``receive()`` for each connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

FRAMES_EXTENSION: Final = "prefect_ws.frames"
LISTEN_EXTENSION: Final = "prefect_ws.listen"


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame (RFC 6455 §5.2) carrying ``payload`` (UTF-8)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


WRITE_SIZE: Final = 64 * 1024  # asyncio's default high-water mark for a transport's buffer


def coalesce(frames: Iterable[bytes], limit: int = WRITE_SIZE) -> Iterator[tuple[bytes, int]]:
    """``(data, count)``: consecutive frames joined into writes of about ``limit`` bytes.

    Bounded so that the sender still waits for the socket between writes: one write of a whole
    history page would sit in the transport's buffer at once, per client.
    """
    parts: list[bytes] = []
    size = 0
    for frame in frames:
        parts.append(frame)
        size += len(frame)
        if size >= limit:
            yield b"".join(parts), len(parts)
            parts, size = [], 0
    if parts:
        yield (parts[0] if len(parts) == 1 else b"".join(parts)), len(parts)
