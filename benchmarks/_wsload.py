"""A lean WebSocket load client, run as a separate process by the benchmarks.

A Python client built on a full WebSocket library spends ~20 us per message, so on a 2-core box
the clients, not the server, would set the numbers. This one is an ``asyncio.Protocol`` that
parses server frames straight out of the receive buffer (no task per message, no copy per
frame) and only looks at two numbers in each frame: ``"seq":`` (order, gaps) and ``"t":`` (the
publisher's ``time.time_ns()``, for latency).

Modes (``python benchmarks/_wsload.py --mode ...``):
- ``stream``: ``--count`` connections to one URL; prints ``READY ok failed`` when every one has
  its first frame, then counts until each got ``run_complete`` (or a close) or ``--deadline``.
  Latencies go to ``--lat-out`` as raw int64 nanoseconds. With ``{uuid}`` in the URL and
  ``--per-run C``, connection ``i`` watches run ``uuid.UUID(int=uuid_base + i // C)``: C clients
  on each of ``count / C`` runs.
- ``idle``: ``--count`` connections (URL may hold ``{uuid}``: a distinct run per connection),
  prints ``READY ok failed seconds cpu_seconds`` (its own CPU for the handshakes), answers
  ``status`` on stdin with ``HELD n`` and holds them until another line arrives or the deadline.
- ``cycle``: ``--count`` connect / first frame / close cycles, ``--concurrency`` at a time.
Every mode ends by printing one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import sys
import time
import uuid
from array import array
from urllib.parse import urlsplit

_SEQ = b'"seq":'
_T = b'"t":'
_FINAL = b'"type":"run_complete"'
_START = b'"type":"run_start"'


class WSClient(asyncio.Protocol):
    """One client connection. ``ready`` resolves on the first frame, ``done`` on the end."""

    def __init__(
        self,
        host: str,
        path: str,
        *,
        deflate: bool = False,
        latencies: array | None = None,
        wait_frame: bool = True,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.wait_frame = wait_frame
        self.host = host
        self.path = path
        self.deflate = deflate
        self.latencies = latencies
        self.ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.frames = 0
        self.events = 0
        self.last_seq = 0
        self.out_of_order = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_recv_ns = 0
        self.first_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        extensions = (
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            if self.deflate
            else ""
        )
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"{extensions}\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before first frame: {exc}"))
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[:12])
            if b" 101" not in status:
                self._fail(f"handshake refused: {bytes(buffer[:80])!r}")
                return
            self.upgraded = True
            del buffer[: end + 4]
            if not self.wait_frame and not self.ready.done():
                self.ready.set_result(None)
        now = time.time_ns()
        position, size = 0, len(buffer)
        while size - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                if size - position < 4:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 4], "big")
                header = 4
            elif length == 127:
                if size - position < 10:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 10], "big")
                header = 10
            end = position + header + length
            if end > size:
                break
            opcode = first & 0x0F
            if opcode == 1 or opcode == 0:
                self._on_text(buffer, position + header, end, now)
            elif opcode == 8:
                self.close_code = (
                    int.from_bytes(buffer[position + header : position + header + 2], "big")
                    if length >= 2
                    else 1005
                )
                reason = bytes(buffer[position + header + 2 : end])
                self.close_reason = reason.decode("utf-8", "replace")
                self._send(
                    0x8, (self.close_code if self.close_code != 1005 else 1000).to_bytes(2, "big")
                )
                self.transport.close()  # type: ignore[union-attr]
                position = end
                break
            elif opcode == 9:
                self._send(0xA, bytes(buffer[position + header : end]))
            position = end
        del buffer[:position]

    def _on_text(self, buffer: bytearray, start: int, end: int, now: int) -> None:
        self.frames += 1
        self.last_recv_ns = now
        if self.frames == 1:
            # The first frame of any kind (prefect-ws' hello, the naive server's ready, or an
            # older server's run_start) means the stream is set up.
            self.first_ns = now
            if not self.ready.done():
                self.ready.set_result(None)
        at = buffer.find(_SEQ, start, end)
        if at < 0:
            return  # a control frame (hello, ready): not an event
        at += 6
        stop = buffer.find(b",", at, end)
        seq = int(buffer[at:stop])
        if seq != self.last_seq + 1 and self.last_seq:
            self.out_of_order += 1
        self.last_seq = seq
        if buffer.find(_START, start, end) >= 0:
            return  # stored before the clients joined: not part of what is measured
        self.events += 1
        if self.latencies is not None:
            at = buffer.find(_T, start, end)
            if at >= 0:
                at += 4
                stop = at
                while 48 <= buffer[stop] <= 57:
                    stop += 1
                self.latencies.append(now - int(buffer[at:stop]))
        if buffer.find(_FINAL, start, end) >= 0 and not self.done.done():
            self.done.set_result(None)

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def close(self, code: int = 1000) -> None:
        """Send a close frame and drop the connection (the server's reply is not awaited)."""
        self._send(0x8, code.to_bytes(2, "big"))
        if self.transport is not None:
            self.transport.close()

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()


async def open_client(
    url: str,
    *,
    deflate: bool = False,
    latencies: array | None = None,
    timeout: float = 60.0,
    wait_frame: bool = True,
) -> WSClient:
    """Connect and wait for the first frame (or only the handshake, without ``wait_frame``)."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(
            lambda: WSClient(
                parts.netloc, path, deflate=deflate, latencies=latencies, wait_frame=wait_frame
            ),
            parts.hostname,
            parts.port,
        ),
        timeout,
    )
    await asyncio.wait_for(client.ready, timeout)
    return client


def _url_for(template: str, index: int, base: int, per_run: int = 1) -> str:
    return template.replace("{uuid}", str(uuid.UUID(int=base + index // per_run)))


async def _open_many(
    args: argparse.Namespace, latencies: array | None
) -> tuple[list[WSClient], list[str], float]:
    semaphore = asyncio.Semaphore(args.concurrency)
    clients: list[WSClient] = []
    failures: list[str] = []

    async def one(index: int) -> None:
        async with semaphore:
            try:
                clients.append(
                    await open_client(
                        _url_for(args.url, index, args.uuid_base, args.per_run),
                        deflate=args.deflate,
                        latencies=latencies,
                        wait_frame=args.mode != "idle",
                    )
                )
            except Exception as exc:
                failures.append(repr(exc)[:160])

    started = time.perf_counter()
    # The first connection alone, then the rest: broadcaster's subscribe() races when many
    # first subscribers of one channel arrive at once (the naive baseline would lose them).
    # With several clients per run, then the first client of every other run, then the others.
    # (Before 2c3a362 the first several-runs case on a fresh server lost whole runs, on both
    # servers: subscribes sent while the Redis pub/sub connection opened went nowhere.)
    firsts = range(0, args.count, args.per_run) if args.per_run > 1 else range(min(1, args.count))
    await asyncio.gather(*(one(i) for i in firsts[:1]))
    await asyncio.gather(*(one(i) for i in firsts[1:]))
    await asyncio.gather(*(one(i) for i in range(args.count) if i not in firsts))
    return clients, failures, time.perf_counter() - started


async def stream_mode(args: argparse.Namespace) -> dict[str, object]:
    latencies = array("q")
    clients, failures, opened = await _open_many(args, latencies)
    print(f"READY {len(clients)} {len(failures)} {opened:.3f}", flush=True)
    cpu = time.process_time()  # the load client's own CPU while the events flow
    remaining = max(1.0, args.deadline - opened)
    done, pending = (
        await asyncio.wait([c.done for c in clients], timeout=remaining)
        if clients
        else (set(), set())
    )
    for client in clients:
        client.close()
    if args.lat_out:
        with open(args.lat_out, "wb") as out:
            latencies.tofile(out)
    codes: dict[str, int] = {}
    reasons: dict[str, str] = {}  # one reason per close code
    for client in clients:
        codes[str(client.close_code)] = codes.get(str(client.close_code), 0) + 1
        reasons.setdefault(str(client.close_code), client.close_reason)
    return {
        "clients": len(clients),
        "failures": len(failures),
        "failure_sample": failures[:3],
        "finished": len(done),
        "unfinished": len(pending),
        "delivered": sum(c.events for c in clients),
        "out_of_order": sum(c.out_of_order for c in clients),
        "first_recv_ns": min((c.first_ns for c in clients if c.first_ns), default=0),
        "last_recv_ns": max((c.last_recv_ns for c in clients), default=0),
        "close_codes": codes,
        "close_reasons": reasons,
        "open_seconds": round(opened, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
    }


async def idle_mode(args: argparse.Namespace) -> dict[str, object]:
    cpu = time.process_time()
    clients, failures, opened = await _open_many(args, None)
    open_cpu = time.process_time() - cpu  # the load client's own CPU for the handshakes
    print(f"READY {len(clients)} {len(failures)} {opened:.3f} {open_cpu:.3f}", flush=True)
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + args.deadline
    # "status" -> "HELD <open connections>"; anything else (or EOF, or the deadline) ends.
    while time.monotonic() < deadline:
        line = loop.run_in_executor(None, sys.stdin.readline)
        await asyncio.wait([line], timeout=deadline - time.monotonic())
        if not line.done() or line.result().strip() != "status":
            break
        print(f"HELD {sum(1 for c in clients if not c.done.done())}", flush=True)
    dropped = sum(1 for c in clients if c.done.done())
    for client in clients:
        client.close()
    await asyncio.sleep(0.2)
    return {
        "clients": len(clients),
        "failures": len(failures),
        "failure_sample": failures[:3],
        "dropped_while_idle": dropped,
        "open_seconds": round(opened, 3),
        "open_cpu_s": round(open_cpu, 3),
    }


async def cycle_mode(args: argparse.Namespace) -> dict[str, object]:
    semaphore = asyncio.Semaphore(args.concurrency)
    failures: list[str] = []
    ok = 0
    deadline = time.monotonic() + args.deadline

    async def one(index: int) -> None:
        nonlocal ok
        if time.monotonic() > deadline:
            return
        async with semaphore:
            try:
                client = await open_client(_url_for(args.url, index, args.uuid_base), timeout=30)
                client.close()
                await asyncio.wait_for(client.done, 10)
                ok += 1
            except Exception as exc:
                failures.append(repr(exc)[:160])

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.count)))
    seconds = time.perf_counter() - started
    return {
        "cycles": ok,
        "failures": len(failures),
        "failure_sample": failures[:3],
        "seconds": round(seconds, 3),
        "per_s": round(ok / seconds, 1) if seconds else None,
    }


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["stream", "idle", "cycle"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument(
        "--deflate", action="store_true", help="offer permessage-deflate, as browsers do"
    )
    parser.add_argument("--uuid-base", type=int, default=1)
    parser.add_argument(
        "--per-run", type=int, default=1, help="clients per run id with {uuid} in the URL"
    )
    parser.add_argument("--lat-out", default="")
    args = parser.parse_args()
    mode = {"stream": stream_mode, "idle": idle_mode, "cycle": cycle_mode}[args.mode]
    print(json.dumps(asyncio.run(mode(args))), flush=True)


if __name__ == "__main__":
    main()
