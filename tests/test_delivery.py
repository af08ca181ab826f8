"""Delivery guarantees, all real: Redis, `prefect-ws serve`, WebSocket and SSE clients.

Events are published straight through the Redis backend (the same Lua script flows use), so the
tests can push 10k events in a second and control exactly when each client joins or leaves.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import socket
import time

import httpx
import pytest
from delivery_support import (
    LEVELS,
    STEPS,
    Received,
    http_base,
    new_run_id,
    publish_logs,
    read_sse,
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
from websockets.exceptions import ConnectionClosed, InvalidMessage

from prefect_ws.backends import RedisBackend
from prefect_ws.protocol import closecodes
from prefect_ws.settings import Settings


async def _race(
    base: str, backend: RedisBackend, *, events: int, clients: int, seed: int, spread: float
) -> list[Received]:
    """``clients`` join at random moments with random ``since`` while ``events`` are published.

    A moment is a point of the publication's progress, not of wall time: each client waits until
    at least its random number of events is published, so on a slow machine the clients still
    join spread over the run rather than all before the first event.
    """
    rng = random.Random(seed)
    run_id = new_run_id()
    published = 0
    progress = asyncio.Condition()
    batch = 50
    pause = spread / (events / batch)  # publishing paces itself over ``spread`` seconds
    window = events // 5
    resumed: list[int] = []  # events a client had when it resumed after a 1013

    async def publisher() -> None:
        nonlocal published
        for first in range(0, events, batch):
            count = min(batch, events - first)
            await publish_logs(backend, run_id, count, start=first, batch=count, complete=False)
            async with progress:
                published += count
                progress.notify_all()
            await asyncio.sleep(pause)
        await publish_logs(backend, run_id, 0, complete=True)

    plan = [(rng.randrange(1, events), rng.random()) for _ in range(clients)]

    async def client(after: int, fraction: float) -> Received:
        async with progress:
            await progress.wait_for(lambda: published >= after)
        # since: 0 for some, else anywhere in the last `window` events published so far
        since = 0 if fraction < 0.1 else max(0, published - int(window * fraction))
        result = Received(asked=since)
        # A saturated server may answer 1013 (its Redis commands timed out) or drop a handshake:
        # like any client, resume with since=<last seq>. The first hello is the one checked.
        for _ in range(5):
            part = Received()
            try:
                # Up to 200 handshakes at once on a saturated server: on a loaded machine one
                # can take longer than the default 20 s; this test is about what arrives.
                await receive(
                    stream_url(
                        base, run_id, f"since={result.seqs[-1] if result.seqs else since}&wait=30"
                    ),
                    timeout=240,
                    open_timeout=120,
                    received=part,
                )
            except TimeoutError:
                part.reason = f"timed out after {len(result.seqs) + len(part.seqs)} events"
            except (InvalidMessage, OSError) as exc:  # the handshake failed: reconnect
                part.code, part.reason = closecodes.TRY_AGAIN_LATER, f"handshake: {exc!r}"
            result.hello = result.hello or part.hello
            result.seqs += part.seqs
            result.code, result.reason = part.code, part.reason
            if part.code != closecodes.TRY_AGAIN_LATER:
                break
            resumed.append(len(result.seqs))
        return result

    tasks = [asyncio.create_task(client(after, f)) for after, f in plan]
    await publisher()
    results = await asyncio.gather(*tasks)
    if resumed:
        print(f"{len(resumed)} resumption(s) after 1013, at {resumed[:10]} events")
    return results


@pytest.mark.timeout(300)  # ~50 s on an idle 2-core machine; generous for a loaded one
def test_clients_joining_at_random_moments_get_exactly_since_to_head(
    redis_url: str, redis_prefix: str
) -> None:
    # (events, clients, publishing time): the big race once, then smaller races with new seeds.
    rounds = [(10_000, 200, 2.0), (1_000, 50, 0.3), (1_000, 50, 0.3), (1_000, 50, 0.3)]
    settings = settings_for(redis_url, redis_prefix)

    async def main() -> list[tuple[int, list[Received]]]:
        out = []
        async with redis_backend(settings) as backend:
            for seed, (events, clients, spread) in enumerate(rounds):
                started = time.monotonic()
                results = await _race(
                    srv.base, backend, events=events, clients=clients, seed=seed, spread=spread
                )
                print(
                    f"round {seed}: {events} events, {clients} clients, "
                    f"{time.monotonic() - started:.1f} s"
                )
                out.append((events, results))
        return out

    # 200 clients x ~5k events is ~1M deliveries on 2 shared cores: the server is saturated on
    # purpose, so the lag and handshake limits are lifted here (both are tested separately).
    with servers(
        redis_url,
        redis_prefix,
        1,
        PREFECT_WS_MAX_LAG_SECONDS="300",
        PREFECT_WS_HANDSHAKE_TIMEOUT="120",
    ) as (srv,):
        outcome = asyncio.run(main())
        log = srv.stop()
    assert "Traceback" not in log, log[-3000:]
    for events, results in outcome:
        head = events + 1
        # Preconditions: most clients resumed mid-run, and joined a run already under way.
        asked = [r.asked for r in results]
        assert sum(since > 0 for since in asked) > len(results) // 2, asked
        heads = [r.hello["head"] if r.hello else None for r in results]
        assert sum(bool(h) for h in heads) > len(results) // 2, heads
        for result in results:
            since, hello = result.asked, result.hello
            assert hello is not None, (result.code, result.reason, len(result.seqs))
            assert hello["since"] == since and hello["recovered"] is True
            assert since <= hello["head"] <= head
            result.assert_exactly(since + 1, head)
            assert (result.code, result.reason) == (1000, "run complete")


def _log_seq(seq: int) -> tuple[str, str]:
    """(stepId, level) of the log with this seq in a run published by ``publish_logs``."""
    return STEPS[(seq - 1) % 3], LEVELS[(seq - 1) % 4]


@pytest.fixture
def no_server_errors(caplog: pytest.LogCaptureFixture):
    """No ERROR record (no stack trace) logged by the in-process server during the test."""
    caplog.set_level(logging.ERROR)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("no_server_errors")
def test_disconnect_at_random_points_and_resume_loses_and_repeats_nothing(
    redis_url: str, redis_prefix: str
) -> None:
    settings = settings_for(redis_url, redis_prefix)
    events, clients = 4000, 20
    rng = random.Random(4)

    async def follower(base: str, run_id: str, delay: float) -> tuple[list[int], int]:
        await asyncio.sleep(delay)
        got: list[int] = []
        drops = 0
        for drops in range(200):
            since = got[-1] if got else 0
            result = await receive(
                stream_url(base, run_id, f"since={since}&wait=10"),
                stop_after=rng.randint(1, 700),
            )
            assert result.hello is not None and result.hello["since"] == since
            got.extend(result.seqs)
            if result.code == 1000:
                return got, drops
        raise AssertionError("did not finish in 200 reconnects")

    async def main(base: str) -> tuple[list[tuple[list[int], int]], int]:
        run_id = new_run_id()
        async with redis_backend(settings) as backend:
            tasks = [
                asyncio.create_task(follower(base, run_id, rng.uniform(0, 1.5)))
                for _ in range(clients)
            ]
            await publish_logs(backend, run_id, events, batch=20, pause=0.004)
            # and a few that start after the end, resuming through replay only
            tasks += [asyncio.create_task(follower(base, run_id, 0)) for _ in range(5)]
            return await asyncio.gather(*tasks), events + 1

    with serve_app(settings) as (base, app):
        results, head = asyncio.run(main(base))
        assert app.state.hub.runs == {}
    for seqs, drops in results:
        assert seqs == list(range(1, head + 1))
        assert drops >= 3
    assert sum(d for _, d in results) > 100


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_server_errors")
def test_hello_frame_and_recovered_when_history_was_trimmed(
    redis_url: str, redis_prefix: str
) -> None:
    settings = settings_for(redis_url, redis_prefix, history_maxlen=100)

    async def main(base: str) -> None:
        async with redis_backend(settings) as backend:
            run_id = new_run_id()
            await publish_logs(backend, run_id, 1000, batch=10)
            head = 1001
            info = await backend.info(run_id)
            first = info.first
            assert first is not None and 1 < first <= head - 99  # MAXLEN ~ keeps at least 100

            # since=0: the start is gone: recovered false, then every retained event
            lost = await receive(stream_url(base, run_id))
            assert lost.hello == {
                "type": "hello",
                "v": 1,
                "runId": run_id,
                "since": 0,
                "head": head,
                "first": first,
                "recovered": False,
                "epoch": info.epoch,
                "reset": False,
            }
            lost.assert_exactly(first, head)
            assert (lost.code, lost.reason) == (1000, "run complete")

            # since just before the oldest retained event: nothing missing
            ok = await receive(stream_url(base, run_id, f"since={first - 1}"))
            assert ok.hello is not None and ok.hello["recovered"] is True
            assert (ok.hello["since"], ok.hello["first"], ok.hello["head"]) == (
                first - 1,
                first,
                head,
            )
            ok.assert_exactly(first, head)

            # since=head of a finished run: hello, no events, close 1000
            done = await receive(stream_url(base, run_id, f"since={head}"))
            assert done.hello is not None and done.hello["recovered"] is True
            assert done.seqs == [] and (done.code, done.reason) == (1000, "run complete")

            # a run not started yet, waited for: head 0, first null
            waiting_id = new_run_id()
            early_out = Received()
            waiting = asyncio.create_task(
                receive(stream_url(base, waiting_id, "wait=10"), received=early_out)
            )
            await eventually(lambda: early_out.hello is not None)  # joined before the start
            await publish_logs(backend, waiting_id, 5)
            early = await waiting
            assert early.hello == {
                "type": "hello",
                "v": 1,
                "runId": waiting_id,
                "since": 0,
                "head": 0,
                "first": None,
                "recovered": True,
                "epoch": None,
                "reset": False,
            }
            early.assert_exactly(1, 6)

            # HTTP history says the same
            async with httpx.AsyncClient(base_url=http_base(base)) as client:
                page = (await client.get(f"/api/v2/workflows/runs/{run_id}/events")).json()
                assert (page["first"], page["head"], page["recovered"]) == (first, head, False)
                assert page["events"][0]["seq"] == first

    with serve_app(settings) as (base, _):
        asyncio.run(main(base))


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_server_errors")
def test_http_history_pages_and_filters_keep_seq(redis_url: str, redis_prefix: str) -> None:
    settings = settings_for(redis_url, redis_prefix, history_page_max=300)

    async def main(base: str) -> None:
        async with redis_backend(settings) as backend:
            run_id = new_run_id()
            await publish_logs(backend, run_id, 1000, batch=100)
        head = 1001
        url = f"/api/v2/workflows/runs/{run_id}/events"
        async with httpx.AsyncClient(base_url=http_base(base)) as client:
            # pages of 300 following `next`
            seqs: list[int] = []
            cursor: int | None = 0
            pages = 0
            while cursor is not None and pages < 20:
                response = await client.get(url, params={"since": cursor, "limit": 300})
                assert response.status_code == 200
                body = response.json()
                assert (body["runId"], body["since"], body["head"]) == (run_id, cursor, head)
                assert body["first"] == 1 and body["recovered"] is True
                seqs += [e["seq"] for e in body["events"]]
                assert len(body["events"]) == min(300, head - cursor)
                cursor = body["next"]
                pages += 1
            assert seqs == list(range(1, head + 1)) and pages == 4
            assert body["events"][-1]["type"] == "run_complete"

            # default limit 100
            body = (await client.get(url)).json()
            assert [e["seq"] for e in body["events"]] == list(range(1, 101))
            assert body["next"] == 100

            # filters: types + step + level, paginated; seq is the run's own
            expected = [
                seq
                for seq in range(1, head)
                if _log_seq(seq)[0] == "left" and LEVELS.index(_log_seq(seq)[1]) >= 2
            ]
            got: list[int] = []
            cursor = 0
            for _ in range(50):
                body = (
                    await client.get(
                        url,
                        params={
                            "since": cursor,
                            "limit": 40,
                            "types": "step_log",
                            "step": "left",
                            "level": "warning",
                        },
                    )
                ).json()
                for event in body["events"]:
                    assert event["type"] == "step_log"
                    assert event["payload"]["stepId"] == "left"
                    assert event["payload"]["level"] in ("WARNING", "ERROR")
                    assert (event["payload"]["stepId"], event["payload"]["level"]) == _log_seq(
                        event["seq"]
                    )
                got += [e["seq"] for e in body["events"]]
                cursor = body["next"]
                if cursor is None:
                    break
            assert got == expected and len(expected) == 166

            # two steps; run-level events always pass a step filter
            body = (
                await client.get(
                    url, params=[("step", "left"), ("step", "right"), ("since", "900")]
                )
            ).json()
            assert [e["seq"] for e in body["events"]] == [
                s for s in range(901, head + 1) if s == head or _log_seq(s)[0] != "prepare"
            ]

            # unknown run: 404
            response = await client.get(f"/api/v2/workflows/runs/{new_run_id()}/events")
            assert response.status_code == 404
            assert response.json()["error"].startswith("unknown run")

    with serve_app(settings) as (base, _):
        asyncio.run(main(base))


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_server_errors")
def test_websocket_filters_keep_seq_and_resume(redis_url: str, redis_prefix: str) -> None:
    settings = settings_for(redis_url, redis_prefix)

    async def main(base: str) -> None:
        run_id = new_run_id()
        async with redis_backend(settings) as backend:
            live = asyncio.create_task(
                receive(
                    stream_url(base, run_id, "types=step_log,run_complete&level=ERROR&wait=10"),
                    keep_text=True,
                )
            )
            steps = asyncio.create_task(
                receive(stream_url(base, run_id, "step=prepare&wait=10"), keep_text=True)
            )
            await eventually(lambda: watchers(app, run_id), lambda n: n == 2)
            await publish_logs(backend, run_id, 2000, batch=25, pause=0.002)
        head = 2001
        errors = await live
        assert errors.seqs == [s for s in range(1, head) if _log_seq(s)[1] == "ERROR"] + [head]
        assert all(json.loads(t)["payload"]["level"] == "ERROR" for t in errors.texts[:-1])
        assert json.loads(errors.texts[-1])["type"] == "run_complete"
        assert errors.code == 1000
        prepared = await steps
        assert prepared.seqs == [s for s in range(1, head) if _log_seq(s)[0] == "prepare"] + [head]

        # resume a filtered stream from a seq it saw: the rest, exactly
        cut = errors.seqs[100]
        rest = await receive(
            stream_url(base, run_id, f"since={cut}&types=step_log,run_complete&level=error")
        )
        assert rest.seqs == errors.seqs[101:]
        # a filter that matches nothing but the end: just run_complete, then 1000
        none = await receive(stream_url(base, run_id, "types=run_complete"))
        assert none.seqs == [head] and none.code == 1000

    with serve_app(settings) as (base, app):
        asyncio.run(main(base))


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_server_errors")
def test_unknown_run_and_wait(redis_url: str, redis_prefix: str) -> None:
    settings = settings_for(redis_url, redis_prefix)

    async def main(base: str) -> None:
        unknown = new_run_id()
        result = await receive(stream_url(base, unknown), timeout=5)
        assert result.hello is None and result.seqs == []
        assert result.code == 4404 and "unknown run" in (result.reason or "")
        assert "wait=" in (result.reason or "")

        started = time.monotonic()
        result = await receive(stream_url(base, unknown, "wait=0.5"), timeout=5)
        assert 0.5 <= time.monotonic() - started < 3
        assert result.hello is not None and result.hello["head"] == 0
        assert (result.code, result.reason) == (4404, "run did not start within 0.5 s")
        await eventually(lambda: dict(app.state.hub.runs), lambda runs: not runs)

        async with httpx.AsyncClient(base_url=http_base(base)) as client:
            response = await client.get(f"/api/v2/workflows/runs/{unknown}/events/stream")
            assert response.status_code == 404 and "unknown run" in response.json()["error"]
            response = await client.get(f"/api/v2/workflows/runs/{unknown}/events")
            assert response.status_code == 404

            # SSE waits too, and ends with `end` when the wait runs out
            status, events = await read_sse(
                client, f"/api/v2/workflows/runs/{unknown}/events/stream?wait=0.3", timeout=5
            )
            assert status == 200 and [e.event for e in events] == ["hello", "end"]
            assert json.loads(events[-1].data) == {
                "code": 4404,
                "reason": "run did not start within 0.3 s",
            }

            # subscribe, then trigger: WS and SSE both get the run from seq 1
            run_id = new_run_id()
            ws = asyncio.create_task(receive(stream_url(base, run_id, "wait=10")))
            sse = asyncio.create_task(
                read_sse(client, f"/api/v2/workflows/runs/{run_id}/events/stream?wait=10")
            )
            await eventually(lambda: watchers(app, run_id), lambda n: n == 2)
            async with redis_backend(settings) as backend:
                await publish_logs(backend, run_id, 300, batch=7)
            (await ws).assert_exactly(1, 301)
            status, events = await sse
            assert [int(e.id) for e in events if e.id is not None] == list(range(1, 302))
        await eventually(lambda: dict(app.state.hub.runs), lambda runs: not runs)

    with serve_app(settings) as (base, app):
        asyncio.run(main(base))


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_server_errors")
def test_a_run_that_started_within_wait_streams_on_past_it(
    redis_url: str, redis_prefix: str
) -> None:
    """``wait=`` bounds how long a run may take to start, not how long it may run: events
    written straight to a level client count as the start, as those its task sends do."""
    settings = settings_for(redis_url, redis_prefix)
    wait = 1.0

    async def main(base: str) -> None:
        run_id = new_run_id()
        seen = Received()
        stream = asyncio.create_task(
            receive(stream_url(base, run_id, f"wait={wait:g}"), received=seen, timeout=30)
        )
        await eventually(lambda: seen.hello is not None)
        started = time.monotonic()
        async with redis_backend(settings) as backend:
            await publish_logs(backend, run_id, 3, complete=False)
            await eventually(lambda: list(seen.seqs), lambda seqs: seqs == [1, 2, 3])
            # Past the deadline, twice over: the stream must still be open.
            await eventually(lambda: time.monotonic() - started, lambda age: age > 2 * wait)
            assert not stream.done(), (seen.code, seen.reason)
            await publish_logs(backend, run_id, 2, start=3)
        (await stream).assert_exactly(1, 6)
        assert (seen.code, seen.reason) == (1000, "run complete")

    with serve_app(settings) as (base, _app):
        asyncio.run(main(base))


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_server_errors")
def test_sse_same_sequences_with_last_event_id_resume(redis_url: str, redis_prefix: str) -> None:
    settings = settings_for(redis_url, redis_prefix)

    async def main(base: str) -> None:
        run_id = new_run_id()
        path = f"/api/v2/workflows/runs/{run_id}/events/stream"
        async with (
            httpx.AsyncClient(base_url=http_base(base), timeout=30) as client,
            redis_backend(settings) as backend,
        ):
            ws = asyncio.create_task(receive(stream_url(base, run_id, "wait=10"), keep_text=True))
            sse_full = asyncio.create_task(read_sse(client, path + "?wait=10"))

            async def resuming(stops: list[int]) -> list[tuple[str | None, str]]:
                """Drop after a few events, reconnect with Last-Event-ID, several times."""
                out: list[tuple[str | None, str]] = []
                last: str | None = None
                for stop in [*stops, None]:
                    headers = {"Last-Event-ID": last} if last else None
                    _, events = await read_sse(
                        client, path + "?wait=10", headers=headers, stop_after=stop
                    )
                    assert events[0].event == "hello"
                    hello = json.loads(events[0].data)
                    assert hello["since"] == (int(last) if last else 0)
                    out += [(e.id, e.data) for e in events[1:] if e.id is not None]
                    if events[-1].event == "end":
                        break
                    last = out[-1][0]
                return out

            resumer = asyncio.create_task(resuming([10, 333, 700, 1]))
            filtered = asyncio.create_task(
                read_sse(client, path + "?wait=10&types=step_log&step=right&level=WARNING")
            )
            await eventually(
                lambda: watchers(app, run_id), lambda n: n == 4
            )  # ws, sse, resumer, filtered
            await publish_logs(backend, run_id, 2000, batch=20, pause=0.003)
            head = 2001
            ws_result = await ws
            ws_result.assert_exactly(1, head)
            status, events = await sse_full
            assert status == 200
            assert events[0].event == "hello" and json.loads(events[0].data)["since"] == 0
            data = [e for e in events if e.id is not None]
            assert [int(e.id) for e in data] == list(range(1, head + 1))  # type: ignore[arg-type]
            assert [e.data for e in data] == ws_result.texts  # the same bytes as WebSocket
            assert events[-1].event == "end"
            assert json.loads(events[-1].data) == {"code": 1000, "reason": "run complete"}
            resumed = await resumer
            assert [int(i) for i, _ in resumed] == list(range(1, head + 1))  # type: ignore[arg-type]
            assert [d for _, d in resumed] == ws_result.texts
            status, events = await filtered
            assert [int(e.id) for e in events if e.id is not None] == [
                s
                for s in range(1, head)
                if _log_seq(s)[0] == "right" and _log_seq(s)[1] in ("WARNING", "ERROR")
            ]
            # `since` in the query, and Last-Event-ID beyond it wins
            _, events = await read_sse(client, path + "?since=1990")
            assert [int(e.id) for e in events if e.id] == list(range(1991, head + 1))
            _, events = await read_sse(client, path + "?since=5", headers={"Last-Event-ID": "1995"})
            assert [int(e.id) for e in events if e.id] == list(range(1996, head + 1))
        await eventually(lambda: dict(app.state.hub.runs), lambda runs: not runs)

    with serve_app(settings) as (base, app):
        asyncio.run(main(base))


def _raw_handshake(port: int, path: str) -> socket.socket:
    """Complete a WebSocket handshake by hand; the caller then never reads nor answers pings."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response and len(response) < 4096:
        chunk = sock.recv(1)
        if not chunk:
            break
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_server_errors")
def test_heartbeat_removes_silent_peers_and_releases_the_run(
    redis_url: str, redis_prefix: str
) -> None:
    assert (Settings().ping_interval, Settings().ping_timeout) == (54.0, 30.0)  # the defaults
    settings = settings_for(redis_url, redis_prefix, ping_interval=0.2, ping_timeout=0.3)

    async def main(base: str) -> None:
        port = int(base.rsplit(":", 1)[1])
        run_id = new_run_id()
        async with redis_backend(settings) as backend:
            await publish_logs(backend, run_id, 10, complete=False)
            path = f"/api/v2/workflows/runs/{run_id}/stream"
            silent = [_raw_handshake(port, path) for _ in range(2)]
            try:
                async with connect(base + path) as good:  # answers pings itself
                    await eventually(lambda: watchers(app, run_id), lambda n: n == 3)
                    # the silent peers are dropped after ping_interval + ping_timeout...
                    await eventually(lambda: watchers(app, run_id), lambda n: n == 1, timeout=5)
                    started = time.monotonic()
                    for sock in silent:  # ...and their sockets closed by the server
                        sock.settimeout(5)
                        while sock.recv(65536):
                            assert time.monotonic() - started < 5
                    # the answering client stays through many ping rounds, and still gets live
                    await asyncio.sleep(1.0)
                    assert watchers(app, run_id) == 1
                    await publish_logs(backend, run_id, 5, start=10, complete=False)
                    frames = [await asyncio.wait_for(good.recv(), 5) for _ in range(16)]
                    assert [json.loads(f).get("seq") for f in frames] == [None, *range(1, 16)]
                # the last client gone: the run's subscription is released
                await eventually(lambda: dict(app.state.hub.runs), lambda runs: not runs, timeout=5)
            finally:
                for sock in silent:
                    sock.close()

    with serve_app(settings) as (base, app):
        asyncio.run(main(base))


BAD_QUERIES = [
    ("since=-1", "invalid since: expected a non-negative integer seq"),
    ("since=abc", "invalid since: expected a non-negative integer seq"),
    ("since=1e3", "invalid since: expected a non-negative integer seq"),
    ("since=99999999999999999999", "invalid since: larger than any seq"),
    ("since=" + "9" * 40, "invalid since: expected a non-negative integer seq"),
    ("types=step_log,bogus", "invalid types: bogus; expected a comma-separated subset of "),
    ("types=", "invalid types: (empty)"),
    ("types=" + "z" * 150, "invalid types: zzzz"),  # a reason cut to the 123-byte close limit
    ("level=LOUD", "invalid level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("step=", "invalid step: 1 to 100 non-empty step ids"),
    ("wait=-1", "invalid wait: expected seconds or true"),
    ("wait=nan", "invalid wait: expected seconds or true"),
]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_server_errors")
def test_bad_input_gets_a_clear_error_and_leaves_nothing_behind(
    redis_url: str, redis_prefix: str
) -> None:
    settings = settings_for(redis_url, redis_prefix, history_page_max=1000)

    async def main(base: str) -> None:
        run_id = new_run_id()
        async with redis_backend(settings) as backend:
            await publish_logs(backend, run_id, 100, complete=False)
        events = f"/api/v2/workflows/runs/{run_id}/events"
        async with httpx.AsyncClient(base_url=http_base(base), timeout=10) as client:
            for query, reason in BAD_QUERIES:
                result = await receive(stream_url(base, run_id, query), timeout=5)
                assert result.hello is None and result.seqs == [], query
                assert result.code == 4400 and (result.reason or "").startswith(reason), (
                    query,
                    result.reason,
                )
                for path in (events, events + "/stream"):
                    response = await client.get(f"{path}?{query}")
                    assert response.status_code == 400, (path, query)
                    assert response.headers["content-type"] == "application/json"
                    assert response.json()["error"].startswith(reason), (path, query)
            for limit in ("0", "1001", "-5", "abc", "1" * 30):
                response = await client.get(events, params={"limit": limit})
                assert response.status_code == 400, limit
                assert response.json()["error"].startswith("invalid limit"), limit
            assert (await client.get(events, params={"limit": "1000"})).status_code == 200
            response = await client.get(events + "/stream", headers={"Last-Event-ID": "x1"})
            assert response.status_code == 400
            assert response.json() == {
                "error": "invalid Last-Event-ID: expected a non-negative integer seq"
            }
            for bad_id in ("not-a-uuid", "1" * 100):
                result = await receive(stream_url(base, bad_id), timeout=5)
                assert (result.code, result.reason) == (
                    4400,
                    "invalid run id: expected a flow run UUID",
                )
                assert (await client.get(f"/api/v2/workflows/runs/{bad_id}/events")).json() == {
                    "error": "invalid run id: expected a flow run UUID"
                }

            # since beyond the run's head: no seq the client can have seen
            result = await receive(stream_url(base, run_id, "since=1000000"), timeout=5)
            assert result.code == 4400 and "beyond the run's newest seq 100" in (
                result.reason or ""
            )
            response = await client.get(events, params={"since": "1000000"})
            assert response.status_code == 400 and "beyond" in response.json()["error"]
        await eventually(lambda: dict(app.state.hub.runs), lambda runs: not runs, timeout=5)

    with serve_app(settings) as (base, app):
        asyncio.run(main(base))


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_server_errors")
def test_client_sending_garbage_during_replay(redis_url: str, redis_prefix: str) -> None:
    settings = settings_for(redis_url, redis_prefix)

    async def main(base: str) -> None:
        run_id = new_run_id()
        async with redis_backend(settings) as backend:
            # 20 MB: more than the sockets' buffers hold, so a client that stops reading holds
            # the server mid-replay (pages kept in memory are written as fast as it reads).
            await publish_logs(backend, run_id, 20_000, batch=500, size=1000)
        head = 20_001
        # small garbage (text, binary, invalid JSON) is ignored: the replay goes on, complete
        async with connect(stream_url(base, run_id), max_size=2**24) as websocket:
            seqs: list[int] = []
            async for message in websocket:
                assert isinstance(message, str)
                if len(seqs) in (0, 10, 5000):
                    await websocket.send("{not json")
                    await websocket.send(b"\x00\xff" * 100)
                    await websocket.send("x" * 4000)
                if message.startswith('{"type":"hello"'):
                    continue
                seqs.append(json.loads(message)["seq"])
            assert seqs == list(range(1, head + 1))
            assert (websocket.close_code, websocket.close_reason) == (1000, "run complete")
        # an oversized frame mid-replay (the client reads no more until it is answered):
        # closed 1009, subscription released
        async with connect(stream_url(base, run_id), max_size=2**24) as websocket:
            for _ in range(100):
                await websocket.recv()
            await websocket.send("y" * 10_000)
            with pytest.raises(ConnectionClosed):
                for _ in range(head + 1):
                    await asyncio.wait_for(websocket.recv(), 5)
            assert websocket.close_code == 1009
        await eventually(lambda: dict(app.state.hub.runs), lambda runs: not runs, timeout=5)

    with serve_app(settings) as (base, app):
        asyncio.run(main(base))
