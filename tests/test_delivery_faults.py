"""Delivery under stress and faults: slow clients, Redis restarts, killed replicas.

Every test runs real processes: `prefect-ws serve` subprocesses, a throwaway redis-server,
publishers in other processes or threads, and WebSocket clients that assert on `seq`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
from conftest import free_port
from delivery_support import (
    Received,
    http_base,
    new_run_id,
    publish_logs,
    receive,
    redis_backend,
    serve_app,
    servers,
    settings_for,
    stream_url,
    watchers,
)
from helpers import eventually
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from prefect_ws.clients.follow import follow_messages
from prefect_ws.publish.publisher import Publisher


@pytest.mark.timeout(120)
def test_slow_clients_catch_up_stuck_ones_are_closed_memory_stays_bounded(
    redis_url: str, redis_prefix: str
) -> None:
    settings = settings_for(redis_url, redis_prefix)
    events, size = 6000, 4000  # ~24 MB of events
    env = {"PREFECT_WS_CLIENT_QUEUE_SIZE": "16", "PREFECT_WS_MAX_LAG_SECONDS": "3"}

    async def main(srv: Any) -> dict[str, Any]:
        run_id = new_run_id()
        url = stream_url(srv.base, run_id, "wait=30")
        out: dict[str, Any] = {}

        async def reader() -> None:
            """Reads everything as it comes: its latency must stay low."""
            result = Received()
            ages: list[float] = []
            async with connect(url, max_size=2**24) as websocket:
                ready.set()
                async for message in websocket:
                    assert isinstance(message, str)
                    if message.startswith('{"type":"hello"'):
                        continue
                    event = json.loads(message)
                    result.seqs.append(event["seq"])
                    sent = datetime.fromisoformat(event["ts"].replace("Z", "+00:00"))
                    ages.append(time.time() - sent.timestamp())
            result.code = websocket.close_code
            out["reader"], out["ages"] = result, ages

        async def paused() -> None:
            """Reads 50 events, stops reading for 1.5 s (under the lag limit), then reads on."""
            result = Received()
            async with connect(url, max_size=2**24, max_queue=1) as websocket:
                ready.set()
                async for message in websocket:
                    assert isinstance(message, str)
                    if message.startswith('{"type":"hello"'):
                        continue
                    result.seqs.append(json.loads(message)["seq"])
                    if len(result.seqs) == 50:
                        await asyncio.sleep(1.5)
            result.code, result.reason = websocket.close_code, websocket.close_reason
            out["paused"] = result

        async def stuck() -> tuple[int | None, str | None, int]:
            """Never reads while the run streams; afterwards drains what was buffered."""
            async with connect(url, max_size=2**24, max_queue=1) as websocket:
                await published.wait()
                await asyncio.sleep(4)  # over the lag limit
                got = 0
                try:
                    async with asyncio.timeout(20):
                        async for _ in websocket:
                            got += 1
                except ConnectionClosed:
                    pass
                return websocket.close_code, websocket.close_reason, got

        ready = asyncio.Event()
        published = asyncio.Event()
        rss: list[int] = [srv.rss_kib()]
        tasks = [asyncio.create_task(c()) for c in (reader, paused)]
        stuck_tasks = [asyncio.create_task(stuck()) for _ in range(3)]
        await asyncio.sleep(0.5)

        async def sample() -> None:
            while True:
                rss.append(srv.rss_kib())
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        async with redis_backend(settings) as backend:
            await publish_logs(backend, run_id, events, batch=100, pause=0.02, size=size)
        published.set()
        out["stuck"] = await asyncio.gather(*stuck_tasks)
        await asyncio.gather(*tasks)
        sampler.cancel()
        out["rss"] = rss
        return out

    with servers(redis_url, redis_prefix, 1, **env) as (srv,):
        out = asyncio.run(main(srv))
        log = srv.stop()
    head = events + 1
    out["reader"].assert_exactly(1, head)
    assert out["reader"].code == 1000
    out["paused"].assert_exactly(1, head)
    assert (out["paused"].code, out["paused"].reason) == (1000, "run complete")
    for code, reason, got in out["stuck"]:
        assert code == 1013, (code, reason)
        assert "reconnect with since=<last seq>" in (reason or "")
        assert got < head  # it was closed before receiving the run
    rss = out["rss"]
    growth_mib = (max(rss) - rss[0]) / 1024
    ages = sorted(out["ages"])
    p50, p99 = ages[len(ages) // 2], ages[int(len(ages) * 0.99)]
    print(
        f"RSS {rss[0] / 1024:.0f} MiB -> peak {max(rss) / 1024:.0f} MiB (+{growth_mib:.1f}); "
        f"reader latency p50 {p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms, max {ages[-1]:.2f} s"
    )
    # 3 stuck clients x 24 MB would be 72 MB if the server buffered for them
    assert growth_mib < 24, growth_mib
    assert p99 < 1.5, p99
    assert "Traceback" not in log, log[-3000:]


class PersistentRedis:
    """A throwaway redis-server like conftest's, but with an AOF fsynced on every write.

    Killed with SIGKILL and started again on the same port it comes back with every run's
    ``seq`` counter and history, as a production Redis configured for persistence does. (A
    Redis that restarts empty loses history and resets ``seq``: see docs/delivery.md.)
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="prefect-ws-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                out = subprocess.run(
                    ["redis-cli", "-p", str(self.port), "ping"],
                    capture_output=True,
                    timeout=2,
                )
                if out.stdout.strip() == b"PONG":
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def persistent_redis() -> Any:
    server = PersistentRedis()
    server.start()
    yield server
    server.close()


def _emit_logs(publisher: Publisher, run_id: str, tag: str, count: int, pause: float) -> None:
    for n in range(count):
        publisher.emit(
            run_id, "step_log", {"stepId": tag, "level": "INFO", "message": f"{tag} {n}"}
        )
        if n % 20 == 0:
            time.sleep(pause)


async def _flushed(publisher: Publisher, timeout: float = 30) -> bool:
    """flush() answers False at once while the publisher is still in its outage: retry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(publisher.flush, 5):
            return True
        await asyncio.sleep(0.1)
    return False


def _messages_by_tag(texts: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for text in texts:
        event = json.loads(text)
        if event["type"] == "step_log":
            tag, n = event["payload"]["message"].split()
            out.setdefault(tag, []).append(int(n))
    return out


@pytest.mark.timeout(120)
def test_redis_killed_and_restarted_mid_run_loses_nothing(
    persistent_redis: PersistentRedis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    settings = settings_for(
        persistent_redis.url, redis_prefix, flush_timeout_seconds=30, publisher_buffer_size=50_000
    )
    per_publisher = 1500

    async def main(base: str, app: Any) -> tuple[list[Received], list[Publisher]]:
        run_id = new_run_id()
        clients = [
            asyncio.create_task(receive(stream_url(base, run_id, "wait=60"), keep_text=True))
            for _ in range(4)
        ]
        await eventually(lambda: watchers(app, run_id), lambda n: n == 4)  # all attached
        publishers = [Publisher(settings), Publisher(settings)]  # two independent publishers
        threads = [
            threading.Thread(target=_emit_logs, args=(p, run_id, tag, per_publisher, 0.02))
            for p, tag in zip(publishers, ("A", "B"), strict=True)
        ]
        for thread in threads:
            thread.start()
        # Redis dies mid-run: once both publishers have stored some of their events.
        await eventually(lambda: [p.published for p in publishers], lambda n: min(n) >= 20)
        await asyncio.to_thread(persistent_redis.kill)
        await asyncio.sleep(1.5)  # publishers buffer, the server's listener retries
        async with httpx.AsyncClient(base_url=http_base(base)) as client:
            response = await client.get(f"/api/v2/workflows/runs/{run_id}/events")
            assert response.status_code == 503
            assert response.json() == {
                "error": "backend unavailable; reconnect with since=<last seq>"
            }

        async def late_follower() -> Received:
            """Joins while Redis is down: refused with 1013, `follow` retries and resumes."""
            result = Received()
            async for text, event in follow_messages(base, run_id, since=5, wait=60):
                result.seqs.append(event["seq"])
                result.texts.append(text)
            return result

        late = asyncio.create_task(late_follower())
        await asyncio.sleep(0.5)
        await asyncio.to_thread(persistent_redis.start)
        for thread in threads:
            await asyncio.to_thread(thread.join, 30)
        for publisher in publishers:
            assert await _flushed(publisher)
        publishers[0].emit(run_id, "run_complete", {"status": "completed", "duration": 1.0})
        assert await _flushed(publishers[0])
        for publisher in publishers:
            await asyncio.to_thread(publisher.close, 5)
        results = await asyncio.gather(*clients, late)
        return list(results), publishers

    with serve_app(settings) as (base, app):
        results, publishers = asyncio.run(main(base, app))
        assert app.state.hub.runs == {}
        reconnects = app.state.transport.backend.reconnects
    head = 2 * per_publisher + 1
    assert reconnects >= 1  # the server's listener really lost Redis
    for publisher in publishers:
        assert publisher.dropped == 0 and publisher.dropped_late == 0
    for result in results[:-1]:
        result.assert_exactly(1, head)
        assert (result.code, result.reason) == (1000, "run complete")
        assert _messages_by_tag(result.texts) == {
            "A": list(range(per_publisher)),
            "B": list(range(per_publisher)),
        }  # each publisher's order kept, nothing twice
        assert result.texts == results[0].texts
    results[-1].assert_exactly(6, head)
    assert results[-1].texts == results[0].texts[5:]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert any("backend unavailable" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(90)
def test_server_killed_clients_resume_on_another_replica(redis_url: str, redis_prefix: str) -> None:
    settings = settings_for(redis_url, redis_prefix)
    events = 4000

    async def main(doomed: Any, survivor: Any) -> list[Received]:
        run_id = new_run_id()

        async def client() -> Received:
            """On the replica that dies; resumes by hand with since= on the other one."""
            first = await receive(stream_url(doomed.base, run_id, "wait=30"), keep_text=True)
            assert first.code == 1006 and first.seqs, (first.code, first.reason, len(first.seqs))
            since = first.seqs[-1]
            rest = await receive(
                stream_url(survivor.base, run_id, f"since={since}&wait=30"), keep_text=True
            )
            assert rest.hello is not None and rest.hello["since"] == since
            return Received(
                hello=first.hello,
                seqs=first.seqs + rest.seqs,
                texts=first.texts + rest.texts,
                code=rest.code,
                reason=rest.reason,
            )

        async def bystander() -> Received:
            """Always on the survivor: unaffected."""
            return await receive(stream_url(survivor.base, run_id, "wait=30"), keep_text=True)

        tasks = [asyncio.create_task(client()) for _ in range(8)]
        tasks.append(asyncio.create_task(bystander()))
        await asyncio.sleep(0.5)
        async with redis_backend(settings) as backend:
            publishing = asyncio.create_task(
                publish_logs(backend, run_id, events, batch=20, pause=0.01)
            )
            await asyncio.sleep(0.8)
            doomed.kill()
            await publishing
        return list(await asyncio.gather(*tasks))

    with servers(redis_url, redis_prefix, 2) as (doomed, survivor):
        results = asyncio.run(main(doomed, survivor))
        log = survivor.stop()
    head = events + 1
    reference = results[-1]
    reference.assert_exactly(1, head)
    for result in results:
        result.assert_exactly(1, head)
        assert (result.code, result.reason) == (1000, "run complete")
        assert result.texts == reference.texts
    assert "Traceback" not in log, log[-3000:]


PUBLISHER_SCRIPT = """
import json, sys, time
from prefect_ws.publish.publisher import Publisher
from prefect_ws.settings import Settings

run_id, tag, count, completes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
publisher = Publisher(Settings())
for n in range(count):
    publisher.emit(run_id, "step_log", {"stepId": tag, "level": "INFO", "message": f"{tag} {n}"})
    if n % 50 == 0:
        time.sleep(0.01)
assert publisher.flush(30)
if completes:
    sys.stdin.readline()  # the test writes a line once the other publishers are done
    publisher.emit(run_id, "run_complete", {"status": "completed", "duration": 1.0})
    assert publisher.flush(30)
publisher.close(5)
print(json.dumps({"published": publisher.published, "dropped": publisher.dropped}))
"""


@pytest.mark.timeout(120)
def test_three_replicas_three_publishers_identical_sequences(
    shared_backend_url: str, redis_prefix: str
) -> None:
    per_publisher = 1500
    redis_url = shared_backend_url
    env = {
        **os.environ,
        "PREFECT_WS_BROADCAST_URL": redis_url,
        "PREFECT_WS_REDIS_PREFIX": redis_prefix,
    }

    async def publisher(run_id: str, tag: str, completes: bool) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PUBLISHER_SCRIPT,
            run_id,
            tag,
            str(per_publisher),
            "1" if completes else "0",
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def finish(proc: asyncio.subprocess.Process, stdin: bytes | None = None) -> dict:
        stdout, stderr = await asyncio.wait_for(proc.communicate(stdin), 60)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        return json.loads(stdout.decode().strip().splitlines()[-1])

    async def main(replicas: list[Any]) -> tuple[list[list[Received]], list[dict]]:
        run_id = new_run_id()
        early = [
            [
                asyncio.create_task(
                    receive(stream_url(r.base, run_id, "wait=60"), keep_text=True, timeout=90)
                )
                for _ in range(3)
            ]
            for r in replicas
        ]
        await asyncio.sleep(0.5)
        procs = [await publisher(run_id, tag, tag == "P0") for tag in ("P0", "P1", "P2")]
        async with httpx.AsyncClient(base_url=replicas[0].http) as client:
            for _ in range(300):  # until the run is well under way (bounded: 30 s)
                response = await client.get(f"/api/v2/workflows/runs/{run_id}/events?limit=1")
                if response.status_code == 200 and response.json()["head"] >= 1000:
                    break
                await asyncio.sleep(0.1)
        late_results = [Received() for _ in replicas]
        late = [  # one more per replica joins mid-run, from the start
            asyncio.create_task(
                receive(stream_url(r.base, run_id), keep_text=True, timeout=90, received=out)
            )
            for r, out in zip(replicas, late_results, strict=True)
        ]
        for _ in range(300):  # they have their hello before run_complete is sent
            if all(out.hello is not None for out in late_results):
                break
            await asyncio.sleep(0.05)
        reports = [await finish(procs[1]), await finish(procs[2])]
        reports.insert(0, await finish(procs[0], b"go\n"))
        per_replica = []
        for index, tasks in enumerate(early):
            per_replica.append([*await asyncio.gather(*tasks), await late[index]])
        return per_replica, reports

    with servers(redis_url, redis_prefix, 3) as replicas:
        backend = httpx.get(f"{replicas[0].http}/healthz").json()["backend"]
        assert backend == ("redis-cluster" if "+cluster://" in redis_url else "redis")
        per_replica, reports = asyncio.run(main(replicas))
        logs = [r.stop() for r in replicas]
    head = 3 * per_publisher + 1
    assert [r["published"] for r in reports] == [per_publisher + 1, per_publisher, per_publisher]
    assert all(r["dropped"] == 0 for r in reports)
    reference = per_replica[0][0]
    reference.assert_exactly(1, head)
    assert json.loads(reference.texts[-1])["type"] == "run_complete"
    assert _messages_by_tag(reference.texts) == {
        tag: list(range(per_publisher)) for tag in ("P0", "P1", "P2")
    }
    for clients in per_replica:
        assert len(clients) == 4
        late_hello = clients[-1].hello
        assert late_hello is not None and 1000 <= late_hello["head"] < head  # joined mid-run
        for result in clients:
            assert result.texts == reference.texts  # identical bytes, identical order
            assert (result.code, result.reason) == (1000, "run complete")
    for log in logs:
        assert "Traceback" not in log, log[-3000:]


@pytest.mark.timeout(60)
def test_redis_restarted_empty_is_reported_not_hidden(redis_server: Any, redis_prefix: str) -> None:
    """Without persistence a restarted Redis has lost every run's seq and history: clients are
    told (never left waiting or handed a second seq 1)."""
    settings = settings_for(redis_server.url, redis_prefix)

    async def main(base: str) -> tuple[Received, Received, int]:
        run_id = new_run_id()
        seen = Received()
        client = asyncio.create_task(
            receive(stream_url(base, run_id, "wait=30"), timeout=30, received=seen)
        )
        # The hello comes first: the stream starts in no history (the run is unknown), so what
        # the restart loses shows as the run's counter going back, not as another epoch.
        await eventually(lambda: seen.hello, lambda hello: hello is not None)
        async with redis_backend(settings) as backend:
            await publish_logs(backend, run_id, 100, complete=False)
            await eventually(lambda: len(seen.seqs), lambda n: n == 100)  # all delivered
            await asyncio.to_thread(redis_server.kill)
            await asyncio.to_thread(redis_server.start)
            for _ in range(100):  # publish again once Redis answers: seq starts over at 1
                try:
                    await publish_logs(backend, run_id, 20, start=100)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            result = await client
            resumed = await receive(stream_url(base, run_id, "since=100"), timeout=10)
            head = (await backend.info(run_id)).head
        return result, resumed, head

    with serve_app(settings) as (base, _):
        result, resumed, head = asyncio.run(main(base))
    assert head == 21
    result.assert_exactly(1, 100)  # nothing from the new history was passed off as seq 101+
    assert result.code == 1011 and "history was lost" in (result.reason or ""), result.reason
    assert resumed.code == 4400 and "beyond the run's newest seq 21" in (resumed.reason or "")


@pytest.mark.timeout(240)
def test_prefect_flow_survives_a_redis_restart_and_clients_get_the_whole_run(
    prefect_api: str, persistent_redis: PersistentRedis, redis_prefix: str
) -> None:
    """A real Prefect flow in another process; Redis is killed and restarted while it logs."""
    from delivery_flows import chatty_flow
    from helpers import assert_run_sequence, create_flow_run, run_flow_in_subprocess

    settings = settings_for(persistent_redis.url, redis_prefix)
    lines = 300
    run_id = create_flow_run(chatty_flow, {"lines": lines, "pause": 0.1})
    env = {
        "PREFECT_WS_BROADCAST_URL": persistent_redis.url,
        "PREFECT_WS_REDIS_PREFIX": redis_prefix,
        "PREFECT_WS_FLUSH_TIMEOUT_SECONDS": "30",
    }

    async def main(base: str) -> tuple[list[Received], dict]:
        clients = [
            asyncio.create_task(
                receive(stream_url(base, run_id, "wait=120"), keep_text=True, timeout=180)
            )
            for _ in range(3)
        ]
        flow = asyncio.create_task(
            run_flow_in_subprocess(
                "delivery_flows:chatty_flow",
                run_id,
                {"lines": lines, "pause": 0.1},
                env=env,
                timeout=180,
            )
        )
        async with redis_backend(settings) as backend:
            for _ in range(600):  # until the flow is logging (bounded: 60 s)
                if flow.done() or (await backend.info(run_id)).head >= 30:
                    break
                await asyncio.sleep(0.1)
        assert not flow.done(), "the flow finished before Redis could be killed"
        await asyncio.to_thread(persistent_redis.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(persistent_redis.start)
        report = await flow
        return list(await asyncio.gather(*clients)), report

    with serve_app(settings) as (base, app):
        results, report = asyncio.run(main(base))
        assert app.state.hub.runs == {}
        assert app.state.transport.backend.reconnects >= 1  # the server did lose Redis
    assert "cannot publish" in report["stderr"]  # ...and so did the flow's publisher
    assert report["state"] == "COMPLETED" and report["result"] == lines
    assert "not published" not in report["stderr"]  # the publisher dropped nothing
    expected = {None: ["chatty flow starts"], "chatty": [f"chatty line {i}" for i in range(lines)]}
    for result in results:
        assert (result.code, result.reason) == (1000, "run complete")
        assert result.texts == results[0].texts
        assert_run_sequence([json.loads(t) for t in result.texts], expected)


@pytest.mark.timeout(90)
def test_client_fallen_behind_retained_history_is_closed_1013_and_resumes(
    redis_url: str, redis_prefix: str
) -> None:
    settings = settings_for(
        redis_url, redis_prefix, history_maxlen=100, client_queue_size=16, max_lag_seconds=60
    )
    events, size = 3000, 4000  # ~12 MB: more than the socket buffers hold

    async def main(base: str) -> tuple[list[int], int | None, str | None, Received, int]:
        run_id = new_run_id()
        seqs: list[int] = []
        async with (
            redis_backend(settings) as backend,
            connect(stream_url(base, run_id, "wait=30"), max_size=2**24, max_queue=1) as ws,
        ):
            assert '"type":"hello"' in str(await ws.recv())  # attached
            await publish_logs(backend, run_id, 10, size=size, complete=False)
            async for message in ws:  # read the first 10, then stop reading
                assert isinstance(message, str)
                if not message.startswith('{"type":"hello"'):
                    seqs.append(json.loads(message)["seq"])
                    if len(seqs) == 10:
                        break
            await publish_logs(backend, run_id, events, start=10, size=size, batch=50)
            first = (await backend.info(run_id)).first
            assert first is not None and first > 1000
            try:
                async with asyncio.timeout(30):
                    async for message in ws:  # reading again: what was in flight, then 1013
                        seqs.append(json.loads(message)["seq"])
            except ConnectionClosed:
                pass
            code, reason = ws.close_code, ws.close_reason
        resumed = await receive(stream_url(base, run_id, f"since={seqs[-1]}"), timeout=30)
        return seqs, code, reason, resumed, first

    with serve_app(settings) as (base, app):
        seqs, code, reason, resumed, first = asyncio.run(main(base))
        assert app.state.hub.runs == {}
    head = events + 11
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < first - 1  # in order, no gap
    assert code == 1013, (code, reason)
    assert reason == (
        f"events after seq {seqs[-1]} are no longer retained; reconnect with since=<last seq>"
    )
    hello = resumed.hello
    assert hello is not None and hello["recovered"] is False and hello["first"] == first
    resumed.assert_exactly(first, head)


def test_a_batch_sent_again_after_a_lost_reply_is_stored_once(
    redis_url: str, redis_prefix: str
) -> None:
    """The publisher retries a batch whose reply it lost; the script must not store it twice."""
    from prefect_ws.backends.base import Batch
    from prefect_ws.protocol.events import encode

    settings = settings_for(redis_url, redis_prefix)

    async def main() -> tuple[list[int], list[str]]:
        run_id = new_run_id()
        async with redis_backend(settings) as backend:

            def batch(number: int, publisher: str, *messages: str) -> Batch:
                out = Batch(encode(run_id, "step_log", {"message": m}) for m in messages)
                out.key = (publisher, number)
                return out

            await backend.publish(run_id, batch(1, "p1", "a", "b"))
            await backend.publish(run_id, batch(1, "p1", "a", "b"))  # the retry: a no-op
            await backend.publish(run_id, batch(1, "p2", "x"))  # another publisher's first
            await backend.publish(run_id, batch(2, "p1", "c"))
            await backend.publish(run_id, batch(2, "p1", "c"))
            await backend.publish(run_id, batch(1, "p1", "a", "b"))  # an older one: a no-op
            await backend.publish(run_id, [encode(run_id, "step_log", {"message": "plain"})])
            texts = await backend.history(run_id, 0, 100)
            head = (await backend.info(run_id)).head
        events = [json.loads(t) for t in texts]
        assert head == len(events)
        return [e["seq"] for e in events], [e["payload"]["message"] for e in events]

    seqs, messages = asyncio.run(main())
    assert seqs == [1, 2, 3, 4, 5]
    assert messages == ["a", "b", "x", "c", "plain"]
