"""Transport: our Redis backend on redis-py 8 (broadcaster's own loses every message there),
atomic per-run seq, capped history, resubscription after a Redis restart; the memory backend;
the backend interface (an ABC) and the one error it raises when its store is down."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
import redis as redis_sync

from prefect_ws.backends import (
    RESYNC,
    BackendUnavailable,
    MemoryBackend,
    RedisBackend,
    StreamBackend,
    create_backend,
    create_transport,
)
from prefect_ws.protocol.events import encode, frames_from_message
from prefect_ws.settings import Settings

RUN = "2b6f0a64-3b0c-4c39-9b39-0d1f7c1f5e11"


def drafts(n: int, start: int = 0, run_id: str = RUN) -> list:
    return [
        encode(run_id, "step_log", {"stepId": None, "message": f"line {start + i}"})
        for i in range(n)
    ]


async def next_frames(subscriber, timeout: float = 5.0) -> list:
    while True:
        event = await asyncio.wait_for(subscriber.get(), timeout)
        if event.message != RESYNC:
            return frames_from_message(event.message)


def backend_for(url: str, prefix: str) -> RedisBackend:
    """The backend of ``url``: one Redis or a Redis Cluster."""
    backend = create_backend(Settings(broadcast_url=url, redis_prefix=prefix))
    assert isinstance(backend, RedisBackend)
    return backend


def test_redis_py_8_delivers_through_broadcaster(
    shared_backend_url: str, redis_prefix: str
) -> None:
    """Regression: stock broadcaster 0.3.1 + redis-py 8 delivers 0 of N messages."""
    assert int(redis_sync.__version__.split(".")[0]) >= 8

    async def scenario() -> list:
        settings = Settings(broadcast_url=shared_backend_url, redis_prefix=redis_prefix)
        transport = create_transport(settings)
        await transport.broadcast.connect()
        try:
            async with transport.broadcast.subscribe(RUN) as subscriber:
                first = await asyncio.wait_for(subscriber.get(), 5)
                assert first.message == RESYNC  # subscribed: history and live now meet
                for i in range(5):
                    await transport.broadcast.publish(RUN, drafts(1, start=i))
                return [f for _ in range(5) for f in await next_frames(subscriber)]
        finally:
            await transport.broadcast.disconnect()

    frames = asyncio.run(scenario())
    assert [f.seq for f in frames] == [1, 2, 3, 4, 5]
    assert [json.loads(f.data)["payload"]["message"] for f in frames] == [
        f"line {i}" for i in range(5)
    ]


def test_subscribes_while_the_listener_connects_are_not_lost(
    shared_backend_url: str, redis_prefix: str
) -> None:
    """Regression: a SUBSCRIBE sent while the listener's pub/sub connection was still opening
    went out on a second connection that nobody reads; its run never went live (the first
    stream of a fresh server hung, ~2 runs in 5 under load)."""

    async def scenario() -> list[bool]:
        outcomes = []
        for attempt in range(30):
            backend = backend_for(shared_backend_url, redis_prefix)
            await backend.connect()
            first, second = f"{RUN}-a{attempt}", f"{RUN}-b{attempt}"
            try:
                await backend.subscribe(first)  # starts the listener, which starts connecting
                for _ in range(attempt % 10):
                    await asyncio.sleep(0)  # let it get to various points of connecting
                await backend.subscribe(second)  # sent while it connects
                await backend.unsubscribe(first)
                # Confirmed in ~6 ms; before the fix, 1 s (a health-check reconnect) or never.
                deadline = asyncio.get_running_loop().time() + 0.9
                while not backend.is_live(second):
                    if asyncio.get_running_loop().time() > deadline:
                        break
                    await asyncio.sleep(0.01)
                outcomes.append(backend.is_live(second))
            finally:
                await backend.disconnect()
        return outcomes

    assert asyncio.run(scenario()) == [True] * 30


def test_seq_is_atomic_across_concurrent_publishers(
    shared_backend_url: str, redis_prefix: str
) -> None:
    """Five publishers with their own connections, 200 events each: one order, no gap or repeat."""

    async def publisher(index: int) -> None:
        backend = backend_for(shared_backend_url, redis_prefix)
        await backend.connect()
        try:
            for batch in range(20):
                await backend.publish(RUN, drafts(10, start=index * 1000 + batch * 10))
        finally:
            await backend.disconnect()

    async def scenario() -> list[str]:
        await asyncio.gather(*(publisher(i) for i in range(5)))
        reader = backend_for(shared_backend_url, redis_prefix)
        await reader.connect()
        try:
            return await reader.history(RUN, 0, 10_000)
        finally:
            await reader.disconnect()

    texts = asyncio.run(scenario())
    events = [json.loads(t) for t in texts]
    assert [e["seq"] for e in events] == list(range(1, 1001))
    messages = [e["payload"]["message"] for e in events]
    assert len(set(messages)) == 1000
    for index in range(5):  # each publisher's own order is kept
        mine = [m for m in messages if int(m.split()[1]) // 1000 == index]
        assert mine == sorted(mine, key=lambda m: int(m.split()[1]))


def test_history_is_capped_and_expires(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        backend = RedisBackend(
            redis_url, prefix=redis_prefix, history_maxlen=100, history_ttl_seconds=60
        )
        await backend.connect()
        try:
            for i in range(10):
                await backend.publish(RUN, drafts(100, start=i * 100))
            return await backend.history(RUN, 0, 5000), await backend.history(RUN, 995, 10)
        finally:
            await backend.disconnect()

    everything, tail = asyncio.run(scenario())
    seqs = [json.loads(t)["seq"] for t in everything]
    assert 100 <= len(seqs) < 300  # MAXLEN ~ trims whole nodes, approximately
    assert seqs == list(range(seqs[0], 1001))
    assert [json.loads(t)["seq"] for t in tail] == [996, 997, 998, 999, 1000]
    client = redis_sync.Redis.from_url(redis_url)
    for key in (f"{redis_prefix}:{{{RUN}}}:seq", f"{redis_prefix}:{{{RUN}}}:events"):
        assert 0 < client.ttl(key) <= 60
    client.close()


def test_redis_restart_resubscribes_and_signals_resync(redis_server) -> None:
    """After Redis dies and comes back, the listener resubscribes and says RESYNC; live resumes."""

    async def scenario() -> list[int]:
        transport = create_transport(Settings(broadcast_url=redis_server.url))
        await transport.broadcast.connect()
        try:
            async with transport.broadcast.subscribe(RUN) as subscriber:
                assert (await asyncio.wait_for(subscriber.get(), 5)).message == RESYNC
                await transport.broadcast.publish(RUN, drafts(1))
                before = await next_frames(subscriber)
                await asyncio.to_thread(redis_server.kill)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(redis_server.start)
                resync = await asyncio.wait_for(subscriber.get(), 15)
                assert resync.message == RESYNC
                await transport.broadcast.publish(RUN, drafts(1))
                after = await next_frames(subscriber)
                assert transport.backend.reconnects >= 1  # type: ignore[attr-defined]
                return [f.seq for f in before + after]
        finally:
            await transport.broadcast.disconnect()

    # The restarted Redis kept nothing (no persistence), so the run's seq starts again at 1.
    assert asyncio.run(scenario()) == [1, 1]


def test_a_non_utf8_payload_does_not_kill_the_listener(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> list[int]:
        backend = RedisBackend(redis_url, prefix=redis_prefix)
        transport = create_transport(Settings(broadcast_url=redis_url, redis_prefix=redis_prefix))
        await transport.broadcast.connect()
        try:
            async with transport.broadcast.subscribe(RUN) as subscriber:
                await asyncio.wait_for(subscriber.get(), 5)
                raw = redis_sync.Redis.from_url(redis_url)
                raw.publish(backend.channel_name(RUN), b"\xff\xfe not json")
                raw.close()
                garbage = await asyncio.wait_for(subscriber.get(), 5)
                assert garbage.message.startswith("\ufffd")
                await transport.broadcast.publish(RUN, drafts(2))
                return [f.seq for f in await next_frames(subscriber)]
        finally:
            await transport.broadcast.disconnect()

    assert asyncio.run(scenario()) == [1, 2]


def test_memory_backend_delivers_across_threads_with_history() -> None:
    """The publisher thread and the server loop share one store per memory:// URL."""
    url = "memory://test-threads"

    async def scenario() -> tuple[list[int], list[int]]:
        backend = MemoryBackend(url, history_maxlen=50)
        transport = create_transport(Settings(broadcast_url=url))
        subscriber_backend = transport.backend
        await transport.broadcast.connect()
        try:
            async with transport.broadcast.subscribe(RUN) as subscriber:
                assert (await subscriber.get()).message == RESYNC

                def publish_from_thread() -> None:
                    async def go() -> None:
                        await backend.connect()
                        for i in range(10):
                            await backend.publish(RUN, drafts(10, start=i * 10))

                    asyncio.run(go())

                thread = threading.Thread(target=publish_from_thread)
                thread.start()
                live: list[int] = []
                while len(live) < 100:
                    live += [f.seq for f in await next_frames(subscriber)]
                thread.join()
            stored = [json.loads(t)["seq"] for t in await subscriber_backend.history(RUN, 0, 1000)]
            return live, stored
        finally:
            await transport.broadcast.disconnect()

    live, stored = asyncio.run(scenario())
    assert live == list(range(1, 101))
    assert stored == list(range(51, 101))  # capped at history_maxlen


def test_settings_reject_unknown_schemes() -> None:
    with pytest.raises(ValueError, match="unsupported broadcast URL"):
        Settings(broadcast_url="kafka://localhost")


def test_a_backend_missing_a_method_cannot_be_made() -> None:
    class HistoryOnly(StreamBackend):
        def __init__(self, url: str) -> None: ...

        async def history(self, run_id: str, after: int, limit: int) -> list[str]:
            return []

    with pytest.raises(TypeError, match="abstract") as refused:
        HistoryOnly("memory://")  # type: ignore[abstract]
    for method in ("connect", "publish", "next_published", "info", "ping"):
        assert method in str(refused.value)


def test_redis_down_raises_backend_unavailable_not_redis_errors(redis_server) -> None:
    """Server code catches one error type; a stopped Redis must produce exactly that one."""
    redis_server.kill()

    async def main() -> list[BaseException]:
        backend = RedisBackend(redis_server.url, prefix="down", history_maxlen=10)
        raised: list[BaseException] = []
        for call in (
            backend.ping(),
            backend.info(RUN),
            backend.history(RUN, 0, 10),
            backend.recent_runs(5),
            backend.publish(RUN, drafts(1)),
        ):
            with pytest.raises(BackendUnavailable) as caught:
                await call
            raised.append(caught.value)
        return raised

    for error in asyncio.run(main()):
        assert str(error).startswith("redis: ")


def test_the_listener_names_an_unreachable_redis_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        backend = RedisBackend("redis://:s3cret-pw@127.0.0.1:1/0", prefix="down")
        await backend.connect()
        await backend.subscribe(RUN)
        try:
            for _ in range(100):
                if backend.reconnects:
                    return
                await asyncio.sleep(0.05)
        finally:
            await backend.disconnect()

    with caplog.at_level(logging.WARNING, logger="prefect_ws.transport"):
        asyncio.run(main())
    lines = [record.getMessage() for record in caplog.records]
    assert any("127.0.0.1:1" in line and "unreachable" in line for line in lines), lines
    assert not any("s3cret-pw" in line for line in lines), lines
