"""Pre-built WebSocket frames (protocol.frames): each event framed once, batches written at once.

The frames must be exactly what a WebSocket library would have sent, at every length encoding,
and a server without the extension (another ASGI server, or uvicorn's own protocol) must stream
the same events one text message at a time.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import OP_TEXT, Frame
from websockets.streams import StreamReader

from prefect_ws.protocol.frames import coalesce, text_frame
from prefect_ws.publish.publisher import Publisher
from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70_000]


def _parse(data: bytes) -> list[Frame]:
    """Client-side parse with the websockets library's own frame parser (unmasked frames)."""
    reader = StreamReader()
    reader.feed_data(data)
    frames = []
    while True:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as done:
            frames.append(done.value)
            continue
        assert not reader.buffer, "a frame was cut short"
        return frames


@pytest.mark.parametrize("size", SIZES)
def test_text_frame_is_what_a_websocket_parser_reads(size: int) -> None:
    payload = ("é" * size).encode()[:size]  # multi-byte UTF-8 cut to the byte size
    payload = payload.decode("utf-8", "ignore").encode()
    (frame,) = _parse(text_frame(payload))
    assert (frame.opcode, frame.fin, frame.data) == (OP_TEXT, True, payload)


def test_coalesce_joins_up_to_the_limit_and_keeps_every_frame_in_order() -> None:
    frames = [text_frame(f"event {i:03d}".encode() * 50) for i in range(100)]  # 454 bytes each
    writes = list(coalesce(iter(frames), limit=4096))
    assert sum(count for _, count in writes) == 100
    assert b"".join(data for data, _ in writes) == b"".join(frames)
    assert [count for _, count in writes] == [10] * 10  # the 10th frame crosses 4096 bytes
    assert list(coalesce([frames[0]])) == [(frames[0], 1)]
    assert list(coalesce([])) == []


def _run(publisher: Publisher, run_id: str, sizes: list[int]) -> None:
    publisher.emit(run_id, "run_start", {"flowName": "wire", "flowRunId": run_id, "parameters": {}})
    for size in sizes:
        publisher.emit(run_id, "step_log", {"stepId": None, "level": "INFO", "message": "✓" * size})
    publisher.emit(run_id, "run_complete", {"status": "completed", "duration": 0.1})


async def _read(url: str, attached: asyncio.Event | None = None) -> tuple[list[str], int | None]:
    """The stream's texts and close code; ``attached`` is set at hello (the client is attached)."""
    messages: list[str] = []
    async with asyncio.timeout(20):
        async with connect(url, compression=None, proxy=None, max_size=2**22) as ws:
            async for message in ws:
                assert isinstance(message, str)
                messages.append(message)
                if attached is not None:
                    attached.set()
    return messages, ws.close_code


@pytest.mark.parametrize("protocol", ["prefect-ws", "uvicorn websockets-sansio"])
def test_live_and_replayed_streams_carry_every_size_intact(
    protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Live (shared pre-built frames, batches in one write) and replayed (history), with and
    without the frames extension: the same texts, in order, counted in the access log."""
    settings = Settings(broadcast_url="memory://", access_log=True)
    overrides: dict[str, Any] = {}
    if protocol != "prefect-ws":
        overrides["ws"] = "websockets-sansio"  # no frames extension: one send per event
    sizes = [10, 200, 5000, 70_000, 3]
    run_id = str(uuid.uuid4())
    caplog.set_level(logging.INFO, "prefect_ws.access")

    async def scenario(base: str) -> tuple[list[str], list[str]]:
        url = f"{base}/api/v2/workflows/runs/{run_id}/stream"
        attached = asyncio.Event()
        live = asyncio.create_task(_read(f"{url}?wait=20", attached))
        await asyncio.wait_for(attached.wait(), 20)
        publisher = Publisher(settings)
        _run(publisher, run_id, sizes)
        assert publisher.flush(10)
        publisher.close()
        live_messages, live_code = await live
        replayed, replay_code = await _read(url)
        assert live_code == replay_code == 1000
        return live_messages, replayed

    with serve_in_thread(settings, **overrides) as base:
        live_messages, replayed = asyncio.run(scenario(base))
    assert live_messages[1:] == replayed[1:]  # after hello: the same bytes
    events = live_messages[1:]
    assert len(events) == len(sizes) + 2
    assert [e.count("✓") for e in events[1:-1]] == sizes
    assert [f'"seq":{i},' in e for i, e in enumerate(events, start=1)] == [True] * len(events)
    counted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("disconnect")]
    assert len(counted) == 2 and all(f"events={len(sizes) + 2}" in c for c in counted), counted


def test_an_open_connection_keeps_nothing_of_its_handshake_and_still_reads_frames() -> None:
    """The lean protocol (server.uvicorn.wsprotocol): after the 101 the request, the response and
    the handshake parser are gone, and the frame parser that replaced it answers pings and
    reads client frames (an oversized one closes 1009)."""
    import gc

    from websockets.http11 import Request

    from prefect_ws.server.uvicorn.wsprotocol import Inbox, PrefectWsProtocol, Writable

    settings = Settings(broadcast_url="memory://", max_inbound_bytes=1024)

    async def scenario(base: str) -> int | None:
        url = f"{base}/api/v2/workflows/runs/{uuid.uuid4()}/stream?wait=30"
        async with connect(url, compression=None, proxy=None) as ws:
            assert '"type":"hello"' in str(await ws.recv())
            protocols = [o for o in gc.get_objects() if isinstance(o, PrefectWsProtocol)]
            live = [p for p in protocols if not p.disconnected]
            assert len(live) == 1
            protocol = live[0]
            assert protocol.request is None and protocol.response is None
            assert isinstance(protocol.queue, Inbox) and isinstance(protocol.writable, Writable)
            frame = protocol.conn.parser.gi_frame
            assert frame is not None
            assert not any(isinstance(v, Request) for v in frame.f_locals.values())
            await asyncio.wait_for(await ws.ping(), 5)  # answered by the new frame parser
            await ws.send("x" * 2000)  # over max_inbound_bytes
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        return ws.close_code

    with serve_in_thread(settings) as base:
        assert asyncio.run(scenario(base)) == 1009


def test_a_level_clients_live_events_are_written_at_once_by_the_hub(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Events that come one at a time reach a client that is level through the protocol's
    ``write_now`` (no wake-up of the stream's task per event), in order and exactly once; the
    run's end still goes through the stream's task, which closes with 1000 and counts every
    event in the access log."""
    from prefect_ws.server.uvicorn.wsprotocol import PrefectWsProtocol

    written: list[bytes] = []
    write_now = PrefectWsProtocol.write_now

    def spy(self: PrefectWsProtocol, data: bytes) -> bool:
        done = write_now(self, data)
        if done:
            written.append(data)
        return done

    monkeypatch.setattr(PrefectWsProtocol, "write_now", spy)
    settings = Settings(broadcast_url="memory://", access_log=True)
    caplog.set_level(logging.INFO, "prefect_ws.access")
    run_id = str(uuid.uuid4())
    logs = 5

    async def scenario(base: str) -> tuple[list[str], int | None]:
        url = f"{base}/api/v2/workflows/runs/{run_id}/stream?wait=20"
        publisher = Publisher(settings)
        publisher.emit(run_id, "run_start", {"flowName": "w", "flowRunId": run_id})
        assert publisher.flush(10)
        messages: list[str] = []
        async with asyncio.timeout(30):
            async with connect(url, compression=None, proxy=None) as ws:
                messages.append(str(await ws.recv()))  # hello
                messages.append(str(await ws.recv()))  # run_start, from history
                for i in range(logs):
                    message = {"stepId": None, "level": "INFO", "message": f"line {i}"}
                    publisher.emit(run_id, "step_log", message)
                    assert publisher.flush(10)
                    messages.append(str(await ws.recv()))  # level again before the next
                publisher.emit(run_id, "run_complete", {"status": "completed", "duration": 1})
                assert publisher.flush(10)
                messages.extend([str(m) async for m in ws])
        publisher.close()
        return messages, ws.close_code

    with serve_in_thread(settings) as base:
        messages, code = asyncio.run(scenario(base))
    assert code == 1000
    events = messages[1:]
    assert [f'"seq":{i},' in e for i, e in enumerate(events, start=1)] == [True] * (logs + 2)
    assert [f"line {i}" in e for i, e in enumerate(events[1:-1])] == [True] * logs
    assert len(written) == logs, f"{len(written)} of {logs} live events written at once"
    counted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("disconnect")]
    assert len(counted) == 1 and f"events={logs + 2}" in counted[0], counted
