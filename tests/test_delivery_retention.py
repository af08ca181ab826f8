"""Retention: the defaults keep a 100k-line run for 24 h, at a measured cost.

docs/delivery.md quotes the numbers this test prints (`MEMORY USAGE ... SAMPLES 0`).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis
from delivery_support import http_base, new_run_id, redis_backend, serve_app, settings_for

from prefect_ws.protocol.events import encode
from prefect_ws.settings import Settings


def _line(run_id: str, n: int, pad: int = 0):  # a ~205-byte step_log event
    message = f"row {n:08d} ok" + "x" * pad
    return encode(
        run_id, "step_log", {"stepId": "load", "level": "INFO", "message": message, "logger": "app"}
    )


async def _publish(backend, run_id: str, count: int, pad: int = 0) -> None:
    for first in range(0, count, 1000):
        last = min(first + 1000, count)
        await backend.publish(run_id, [_line(run_id, n, pad) for n in range(first, last)])
    await backend.publish(run_id, [encode(run_id, "run_complete", {"status": "completed"})])


@pytest.mark.timeout(120)
def test_defaults_keep_a_100k_line_run_for_24_hours(redis_url: str, redis_prefix: str) -> None:
    defaults = Settings()
    assert defaults.history_maxlen >= 100_001 and defaults.history_ttl_seconds >= 24 * 3600
    settings = settings_for(redis_url, redis_prefix)  # the default retention settings
    client = redis.Redis.from_url(redis_url)
    run_id = new_run_id()

    async def main(base: str) -> dict:
        async with redis_backend(settings) as backend:
            await _publish(backend, run_id, 100_000)
            info = await backend.info(run_id)
        async with httpx.AsyncClient(base_url=http_base(base)) as http:
            page = (await http.get(f"/api/v2/workflows/runs/{run_id}/events?limit=1")).json()
        return {"info": info, "page": page}

    with serve_app(settings) as (base, _):
        out = asyncio.run(main(base))
    events_key = f"{redis_prefix}:{{{run_id}}}:events"
    seq_key = f"{redis_prefix}:{{{run_id}}}:seq"
    try:
        assert client.xlen(events_key) == 100_001  # nothing trimmed
        assert (out["info"].head, out["info"].first) == (100_001, 1)
        assert out["page"]["recovered"] is True and out["page"]["events"][0]["seq"] == 1
        for key in (events_key, seq_key):  # kept 24 h after the last event
            assert 86_400 - 60 <= client.ttl(key) <= 86_400
        usage = client.memory_usage(events_key, samples=0)
        assert usage is not None
        print(f"100k x ~205-byte events: {usage / 2**20:.1f} MiB, {usage / 100_001:.0f} B/event")
        assert usage < 40 * 2**20
    finally:
        client.delete(events_key, seq_key)
        client.close()


@pytest.mark.timeout(60)
def test_history_maxlen_trims_and_the_memory_follows(redis_url: str, redis_prefix: str) -> None:
    settings = settings_for(redis_url, redis_prefix, history_maxlen=10_000, history_ttl_seconds=60)
    client = redis.Redis.from_url(redis_url)
    run_id = new_run_id()

    async def main() -> None:
        async with redis_backend(settings) as backend:
            await _publish(backend, run_id, 50_000)

    asyncio.run(main())
    events_key = f"{redis_prefix}:{{{run_id}}}:events"
    try:
        kept = client.xlen(events_key)
        assert 10_000 <= kept <= 10_100  # MAXLEN ~ trims whole nodes of 100 entries
        assert 0 < client.ttl(events_key) <= 60
        usage = client.memory_usage(events_key, samples=0)
        assert usage is not None
        print(f"maxlen 10k: {kept} kept, {usage / 2**20:.2f} MiB")
        assert usage < 4 * 2**20
    finally:
        client.delete(events_key, f"{redis_prefix}:{{{run_id}}}:seq")
        client.close()
