"""Metrics after scripted traffic: each counter moves by exactly what the script did."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from helpers import emit_small_run, eventually
from prometheus_client.parser import text_string_to_metric_families
from test_hostile import ADMIN, KEYS, WAIT, read_stream, refusal, stream_url
from websockets.asyncio.client import connect

from prefect_ws.publish.publisher import Publisher
from prefect_ws.server.metrics import LATENCY_SAMPLE
from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: str, headers: dict[str, str] | None = None) -> Samples:
    async with httpx.AsyncClient(base_url=http) as client:
        response = await client.get("/metrics", headers=headers or ADMIN)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_follow_scripted_traffic() -> None:
    async def main() -> None:
        settings = Settings(
            broadcast_url="memory://", api_keys=KEYS, max_connections_per_ip=3, limit_loopback=True
        )
        publisher = Publisher(settings)
        finished = str(uuid.uuid4())
        emit_small_run(publisher, finished, logs=3)  # 5 events in history
        assert publisher.flush(10)
        with serve_in_thread(settings) as base:
            http = base.replace("ws://", "http://", 1)
            before = await scrape(http)

            # Two late joiners replay the finished run; one is refused for lack of credentials.
            for _ in range(2):
                stream = await read_stream(stream_url(base, finished), additional_headers=ADMIN)
                assert stream.code == 1000 and len(stream.events) == 5
            assert (await refusal(stream_url(base, finished)))[0] == 401

            # One client watches a live run of 12 events.
            live = str(uuid.uuid4())
            async with connect(
                stream_url(base, live, WAIT), additional_headers=ADMIN, proxy=None
            ) as ws:
                assert '"type":"hello"' in str(await ws.recv())  # hello: the client is attached
                during = await scrape(http)
                held = [
                    await connect(
                        stream_url(base, live, WAIT), additional_headers=ADMIN, proxy=None
                    )
                    for _ in range(2)
                ]
                assert (await refusal(stream_url(base, live), additional_headers=ADMIN))[0] == 429
                for other in held:  # all three attached and caught up
                    assert '"type":"hello"' in str(await other.recv())
                emit_small_run(publisher, live, logs=10)
                assert publisher.flush(10)
                received = [m async for m in ws if str(m).startswith('{"v":')]  # events, not hello
                for other in held:
                    assert len([m async for m in other if str(m).startswith('{"v":')]) == 12
            publisher.close()
            assert len(received) == 12 and ws.close_code == 1000
            # The server counts a connection's close when its handler ends, after the client's.
            after = await eventually(
                lambda: scrape(http),
                lambda now: (
                    delta(now, before, "prefect_ws_closes_total", code="1000") >= 5
                    and delta(now, before, "prefect_ws_connections_open", transport="ws") == 0
                    and now[("prefect_ws_runs_active", ())] == 0
                ),
            )

        assert during[("prefect_ws_runs_active", ())] == 1
        assert during[("prefect_ws_clients_lagging", ())] == 0
        assert delta(during, before, "prefect_ws_connections_open", transport="ws") == 1
        assert delta(after, before, "prefect_ws_connections_open", transport="ws") == 0
        assert after[("prefect_ws_runs_active", ())] == 0
        assert delta(after, before, "prefect_ws_connections_total", transport="ws") == 5
        assert delta(after, before, "prefect_ws_refusals_total", reason="auth_missing") == 1
        assert (
            delta(after, before, "prefect_ws_refusals_total", reason="max_connections_per_ip") == 1
        )
        assert delta(after, before, "prefect_ws_closes_total", code="1000") == 5
        # The finished run's 10 events came from history. The live run's 36 came live unless they
        # were published before the process's subscription of the run was confirmed (hello is sent
        # before that): then from history, as a late joiner's would.
        replayed = delta(after, before, "prefect_ws_events_delivered_total", path="replay")
        live_path = delta(after, before, "prefect_ws_events_delivered_total", path="live")
        assert replayed >= 10 and replayed + live_path == 10 + 12 * 3, (replayed, live_path)
        assert delta(after, before, "prefect_ws_events_received_total") == 12
        assert delta(after, before, "prefect_ws_replays_total") >= 2
        observed = delta(after, before, "prefect_ws_delivery_latency_seconds_count")
        # One live batch in LATENCY_SAMPLE is timed; how the 36 live deliveries fall into batches
        # depends on the publisher's timing, and where the sampling starts on the earlier tests.
        assert 0 <= observed <= 12 * 3 // LATENCY_SAMPLE + 1
        assert (
            delta(after, before, "prefect_ws_delivery_latency_seconds_bucket", le="1.0") == observed
        )
        assert after[("prefect_ws_backend_reconnects_total", ())] == 0
        assert not any(
            "run" in dict(labels) or any(finished in v or live in v for _, v in labels)
            for _, labels in after
        ), "no per-run label"

    asyncio.run(main())


def test_metrics_need_an_admin_credential_when_auth_is_on() -> None:
    async def main() -> None:
        settings = Settings(broadcast_url="memory://", api_keys=KEYS)
        with serve_in_thread(settings) as base:
            async with httpx.AsyncClient(base_url=base.replace("ws://", "http://", 1)) as client:
                anonymous = await client.get("/metrics")
                health = await client.get("/healthz")
        assert (anonymous.status_code, anonymous.json()["error"]) == (401, "missing credentials")
        assert health.status_code == 200  # liveness stays public

    asyncio.run(main())


def test_liveness_stays_up_while_readiness_fails_without_the_backend() -> None:
    async def main() -> None:
        # A Redis URL where nothing listens: the server starts anyway and reports not ready.
        from conftest import free_port

        settings = Settings(broadcast_url=f"redis://127.0.0.1:{free_port()}/0")
        with serve_in_thread(settings) as base:
            async with httpx.AsyncClient(base_url=base.replace("ws://", "http://", 1)) as client:
                live = await client.get("/livez")
                ready = await client.get("/healthz")
        assert (live.status_code, live.json()) == (200, {"status": "alive"})
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"

    asyncio.run(main())
