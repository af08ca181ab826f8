"""The publisher never blocks or breaks a flow: order kept, buffer bounded, outages reported."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from conftest import RedisServer, free_port
from helpers import redis_history
from sample_flows import four_steps

from prefect_ws.backends import LoopSink, RedisSink, create_sink
from prefect_ws.backends.base import Batch
from prefect_ws.backends.memory import memory_store
from prefect_ws.protocol.events import encode
from prefect_ws.publish.publisher import _COALESCE_SECONDS, Publisher, reset_publisher
from prefect_ws.settings import Settings

RUN = "7d0e9a3e-0b7a-4d43-8d5b-6f3f2a8e1c01"


def test_each_threads_order_is_kept(redis_url: str, redis_prefix: str) -> None:
    publisher = Publisher(Settings(broadcast_url=redis_url, redis_prefix=redis_prefix))

    def emit(thread: int) -> None:
        for i in range(500):
            publisher.emit(RUN, "step_log", {"stepId": f"t{thread}", "message": str(i)})

    threads = [threading.Thread(target=emit, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    publisher.emit(RUN, "run_complete", {"status": "completed"})
    assert publisher.flush(10)
    publisher.close()

    events = redis_history(redis_url, redis_prefix, RUN)
    assert [e["seq"] for e in events] == list(range(1, 2002))
    assert events[-1]["type"] == "run_complete"
    for writer in range(4):
        mine = [
            int(e["payload"]["message"])
            for e in events
            if e["payload"].get("stepId") == f"t{writer}"
        ]
        assert mine == list(range(500))


def test_a_busy_publisher_coalesces_round_trips(redis_url: str, redis_prefix: str) -> None:
    """Events arriving faster than round trips share one per window, not one per few events."""
    publisher = Publisher(Settings(broadcast_url=redis_url, redis_prefix=redis_prefix))
    publisher.emit(RUN, "step_log", {"message": "warm-up"})
    assert publisher.flush(10)
    first_batch = next(publisher._batches)
    started = time.monotonic()
    for i in range(2000):  # ~5 events per ms, like a 20-wide DAG that logs
        publisher.emit(RUN, "step_log", {"message": str(i)})
        if i % 10 == 9:
            time.sleep(0.002)
    assert publisher.flush(10)
    elapsed = time.monotonic() - started
    round_trips = next(publisher._batches) - first_batch - 1
    publisher.close()
    assert publisher.published == 2001
    assert round_trips <= elapsed / _COALESCE_SECONDS + 5, (round_trips, elapsed)


def test_events_after_run_complete_are_not_published(redis_url: str, redis_prefix: str) -> None:
    publisher = Publisher(Settings(broadcast_url=redis_url, redis_prefix=redis_prefix))
    publisher.emit(RUN, "step_log", {"message": "before"})
    publisher.emit(RUN, "run_complete", {"status": "completed"})
    publisher.emit(RUN, "step_log", {"message": "straggler"})
    assert publisher.flush(10)
    publisher.close()
    assert [e["type"] for e in redis_history(redis_url, redis_prefix, RUN)] == [
        "step_log",
        "run_complete",
    ]
    assert publisher.dropped_late == 1


def test_unreachable_backend_bounds_the_buffer_and_keeps_lifecycle_events(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    publisher = Publisher(Settings(broadcast_url=dead, publisher_buffer_size=50))
    with caplog.at_level(logging.WARNING, logger="prefect_ws.publisher"):
        started = time.perf_counter()
        for i in range(1000):
            publisher.emit(RUN, "step_log", {"message": str(i)})
        publisher.emit(RUN, "run_complete", {"status": "completed"})
        emitting = time.perf_counter() - started
        deadline = time.monotonic() + 10
        while not publisher.outage and time.monotonic() < deadline:
            time.sleep(0.01)
        assert publisher.outage
        assert publisher.flush(5) is False  # returns at once during an outage
        publisher.close(timeout=0)
    assert emitting < 1.0  # never blocked on the dead backend
    assert 900 <= publisher.dropped <= 951  # bounded: at most 50 log events buffered
    assert publisher.dropped + publisher.abandoned == 1001  # run_complete was never dropped
    warnings = [r.getMessage() for r in caplog.records if r.name == "prefect_ws.publisher"]
    assert sum("cannot publish" in w for w in warnings) == 1, warnings  # one warning per outage
    assert any("1001 event(s) not published" in w for w in warnings), warnings  # loss reported


def test_flow_result_is_unchanged_when_redis_is_unreachable(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PREFECT_WS_BROADCAST_URL", f"redis://127.0.0.1:{free_port()}/0")
    reset_publisher()
    with caplog.at_level(logging.WARNING, logger="prefect_ws.publisher"):
        started = time.perf_counter()
        assert four_steps(fail=False) == 33
        elapsed = time.perf_counter() - started
    assert elapsed < 10  # the run's end does not wait out the flush timeout during an outage
    warnings = [r.getMessage() for r in caplog.records if r.name == "prefect_ws.publisher"]
    assert sum("cannot publish" in w for w in warnings) == 1


def test_a_flow_process_publishes_through_a_blocking_sink_whose_retries_store_once(
    redis_url: str, redis_prefix: str
) -> None:
    """The publisher thread's Redis sink runs the same script as the server's backend: a batch
    sent again after a lost reply is a no-op, and the events read back as the server reads."""
    sink = create_sink(Settings(broadcast_url=redis_url, redis_prefix=redis_prefix))
    assert isinstance(sink, RedisSink)
    try:
        first = Batch([encode(RUN, "step_log", {"message": m}) for m in ("a", "b")])
        first.key = ("flow-process", 1)
        sink.publish(RUN, first)
        sink.publish(RUN, first)  # the retry
        second = Batch([encode(RUN, "run_complete", {"status": "completed"})])
        second.key = ("flow-process", 2)
        sink.publish(RUN, second)
    finally:
        sink.close()
    events = redis_history(redis_url, redis_prefix, RUN)
    assert [(e["seq"], e["type"]) for e in events] == [
        (1, "step_log"),
        (2, "step_log"),
        (3, "run_complete"),
    ]


def test_memory_and_cluster_urls_publish_through_their_backend_on_a_private_loop() -> None:
    url = "memory://sink-test"
    sink = create_sink(Settings(broadcast_url=url))
    assert isinstance(sink, LoopSink)
    try:
        sink.publish(RUN, Batch([encode(RUN, "step_log", {"message": "in memory"})]))
    finally:
        sink.close()
    store = memory_store(url, history_maxlen=10, max_runs=10)
    assert store.info(RUN).head == 1
    cluster = create_sink(Settings(broadcast_url="redis+cluster://127.0.0.1:7000"))
    assert isinstance(cluster, LoopSink)  # not connected until it publishes
    cluster.close()


def test_publisher_warnings_never_show_the_backend_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = f"redis://flows:hunter2-secret@127.0.0.1:{free_port()}/0"
    publisher = Publisher(Settings(broadcast_url=dead))
    with caplog.at_level(logging.WARNING, logger="prefect_ws.publisher"):
        publisher.emit(RUN, "run_complete", {"status": "completed"})
        deadline = time.monotonic() + 10
        while not publisher.outage and time.monotonic() < deadline:
            time.sleep(0.01)
        assert publisher.outage
        publisher.close(timeout=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "prefect_ws.publisher"]
    assert any("cannot publish to redis://[redacted]@127.0.0.1" in line for line in lines), lines
    assert any("not published" in line for line in lines), lines
    assert not any("hunter2" in line for line in lines), lines


def test_the_flow_side_sink_rides_a_redis_restart_and_a_script_flush(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The sink holds one connection and the script's hash: a restarted Redis cuts the one and
    forgets the other, and the next batch is stored all the same."""
    import redis

    sink = create_sink(Settings(broadcast_url=redis_server.url, redis_prefix=redis_prefix))

    def batch(number: int, message: str) -> Batch:
        out = Batch([encode(RUN, "step_log", {"message": message})])
        out.key = ("flow-process", number)
        return out

    try:
        sink.publish(RUN, batch(1, "before"))
        redis_server.kill()
        redis_server.start()  # empty: no history, no scripts, the connection gone
        sink.publish(RUN, batch(2, "after a restart"))
        redis.Redis.from_url(redis_server.url).script_flush()
        sink.publish(RUN, batch(3, "after a script flush"))
    finally:
        sink.close()
    events = redis_history(redis_server.url, redis_prefix, RUN)
    assert [e["payload"]["message"] for e in events] == ["after a restart", "after a script flush"]
