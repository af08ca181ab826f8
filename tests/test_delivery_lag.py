"""Clients that read slower than a burst arrives are never cut while they keep reading.

A burst of events (the publisher sends up to 500 per message) overflows a client's queue when
the server cannot send as fast as it arrives; the client then catches up from the run's recent
frames or its history. Such a client makes progress the whole time, however long the catch-up
takes, and must receive every event; only a client that makes no progress for
``PREFECT_WS_MAX_LAG_SECONDS`` is closed (1013).
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from delivery_support import (
    Received,
    new_run_id,
    publish_logs,
    redis_backend,
    servers,
    settings_for,
    stream_url,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from prefect_ws.protocol.events import frame_from_text
from prefect_ws.server.hub import RECENT_FRAMES, RECENT_MAX_BYTES, RunChannel, Subscription


def _small_window_socket(port: int) -> socket.socket:
    """A connected socket with a small receive buffer: the server's sends block on it soon,
    so the server, not the kernel, holds what the client has not read yet."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def _read_slowly(
    url: str, port: int, joined: asyncio.Semaphore, per_pause: int, pause: float
) -> Received:
    """Reads everything, pausing ``pause`` s after every ``per_pause`` events: always making
    progress, never level with the burst. Releases ``joined`` on its first event."""
    out = Received()
    async with connect(
        url, sock=_small_window_socket(port), max_size=2**24, max_queue=1, open_timeout=20
    ) as websocket:
        try:
            async for message in websocket:
                assert isinstance(message, str)
                if message.startswith('{"type":"hello"'):
                    out.hello = {}
                    continue
                out.seqs.append(frame_from_text(message).seq)
                if len(out.seqs) == 1:
                    joined.release()
                if len(out.seqs) % per_pause == 0:
                    await asyncio.sleep(pause)  # a slow reader, not a wait for a condition
        except ConnectionClosed:
            pass
        out.code, out.reason = websocket.close_code, websocket.close_reason
    return out


@pytest.mark.timeout(180)
def test_slow_but_reading_clients_get_every_event_of_a_burst(
    redis_url: str, redis_prefix: str
) -> None:
    """8 clients read a burst of 2000 events of 8 KB (messages of 100 events, queues of 16)
    at about 170 events/s (1.3 MB/s) each, far more than the socket buffers hold: each is
    behind for several times the lag limit and catches up from memory and history in batches
    of megabytes, reading all the while. None may be cut, and each gets every event once."""
    settings = settings_for(redis_url, redis_prefix)
    events, size, clients, max_lag = 2000, 8000, 8, 2.5
    env = {"PREFECT_WS_CLIENT_QUEUE_SIZE": "16", "PREFECT_WS_MAX_LAG_SECONDS": str(max_lag)}

    async def main(port: int, base: str) -> tuple[list[Received], float]:
        run_id = new_run_id()
        async with redis_backend(settings) as backend:
            # run_start first, so every client joins a known run and gets the burst live.
            await publish_logs(backend, run_id, 1, complete=False)
            url = stream_url(base, run_id)
            joined = asyncio.Semaphore(0)
            readers = [
                asyncio.create_task(_read_slowly(url, port, joined, per_pause=25, pause=0.15))
                for _ in range(clients)
            ]
            async with asyncio.timeout(60):
                for _ in range(clients):
                    await joined.acquire()  # every client has the first event: it is live
            loop = asyncio.get_running_loop()
            started = loop.time()
            await publish_logs(backend, run_id, events, start=1, batch=100, pause=0.02, size=size)
            results = await asyncio.gather(*readers)
            return results, loop.time() - started

    with servers(redis_url, redis_prefix, 1, **env) as (srv,):
        results, seconds = asyncio.run(main(srv.port, srv.base))
        log = srv.stop()
    head = events + 2  # the first log line, the burst, run_complete
    cut = [(r.code, r.reason, len(r.seqs)) for r in results if r.code != 1000]
    assert not cut, f"reading clients were closed: {cut[:3]} ({len(cut)} of {clients})"
    for result in results:
        result.assert_exactly(1, head)
    assert seconds > 2 * max_lag, seconds  # the catch-up did outlast the lag limit
    assert "Traceback" not in log, log[-3000:]


def test_recent_frames_keep_what_a_client_behind_needs_up_to_the_byte_cap() -> None:
    """The run's in-memory window: the newest RECENT_FRAMES always, older frames while a client
    that is behind needs them, never more than RECENT_MAX_BYTES of events beyond that."""
    run_id = new_run_id()

    async def feed(channel: RunChannel, first: int, last: int, size: int) -> None:
        """Messages of 100 events, each fanned out before the next arrives."""
        for start in range(first, last + 1, 100):
            channel.receive(
                "\n".join(
                    f'{{"v":1,"type":"step_log","seq":{seq},"x":"{"x" * size}"}}'
                    for seq in range(start, min(start + 100, last + 1))
                )
            )
            await asyncio.sleep(0)

    async def main() -> None:
        channel = RunChannel(run_id)
        await feed(channel, 1, 3000, 100)
        assert channel.recent is not None and len(channel.recent) == RECENT_FRAMES  # none behind

        channel = RunChannel(run_id)
        behind = Subscription(run_id, since=0, queue_size=16)
        channel.add(behind)
        await feed(channel, 1, 3000, 100)  # its queue overflows on the second message: behind
        assert behind.behind_since is not None
        assert channel.recent is not None
        assert [channel.recent[0].seq, channel.recent[-1].seq] == [1, 3000]
        behind.last_seq = 2500  # it caught up that far: older frames are let go
        await feed(channel, 3001, 3100, 100)
        assert channel.recent[0].seq == 3100 - RECENT_FRAMES + 1
        assert channel.recent_bytes == sum(len(frame.data) for frame in channel.recent)

        channel = RunChannel(run_id)
        behind = Subscription(run_id, since=0, queue_size=16)
        channel.add(behind)
        await feed(channel, 1, 6000, 2000)  # ~12 MB of events: more than the cap
        assert channel.recent is not None
        assert RECENT_FRAMES < len(channel.recent) < 6000
        assert channel.recent_bytes <= RECENT_MAX_BYTES
        assert channel.recent[-1].seq == 6000

    asyncio.run(main())


def test_level_clients_get_what_arrived_in_one_step_in_one_write() -> None:
    """Live messages received in one step of the event loop reach a level client in one write
    (a process behind finds several waiting at once); a message received later gets a write of
    its own; run_complete goes through the client's queue, to the stream's task."""
    run_id = new_run_id()

    def message(seq: int, kind: str = "step_log") -> str:
        return f'{{"v":1,"type":"{kind}","seq":{seq},"ts":"2026-01-01T00:00:00Z","payload":{{}}}}'

    written: list[bytes] = []

    def writer(data: bytes) -> bool:
        written.append(data)
        return True

    async def main() -> list[int]:
        channel = RunChannel(run_id)
        subscription = Subscription(run_id, since=0, queue_size=16)
        subscription.writer = writer
        channel.add(subscription)
        waiting = subscription.waiter()
        assert waiting is not None  # the client's task waits with nothing queued: level
        channel.receive(message(1))
        channel.receive(message(2))
        assert written == [], "fanned out after the step, not during it"
        await asyncio.sleep(0)
        channel.receive(message(3))
        await asyncio.sleep(0)
        channel.receive(message(4, "run_complete"))
        await asyncio.wait_for(waiting, 5)
        taken = subscription.take()
        assert isinstance(taken, list)
        return [frame.seq for frame in taken]

    queued = asyncio.run(main())
    assert len(written) == 2, written
    assert b'"seq":1,' in written[0] and b'"seq":2,' in written[0] and b'"seq":3,' in written[1]
    assert queued == [4]
