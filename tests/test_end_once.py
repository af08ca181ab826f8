"""A run ends once: the backend refuses everything after a run's ``run_complete``, atomically.

The flow's hooks and any number of server replicas may all try to end a run; the backend's
publish (Redis: inside the Lua script; memory://: under the store's lock) decides which one does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from delivery_support import complete_draft, log_draft, new_run_id

from prefect_ws.backends import MemoryBackend, PublishResult, RedisBackend, StreamBackend


@pytest.fixture(params=["memory", "redis"])
def make_backends(
    request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
) -> Callable[[], list[StreamBackend]]:
    """Three backends on one store: three replicas of a server."""

    def make() -> list[StreamBackend]:
        if request.param == "memory":
            return [MemoryBackend(f"memory://end-once-{redis_prefix}") for _ in range(3)]
        return [RedisBackend(redis_url, prefix=redis_prefix) for _ in range(3)]

    return make


def run_with(
    make: Callable[[], list[StreamBackend]],
    test: Callable[[list[StreamBackend]], Awaitable[None]],
) -> None:
    async def main() -> None:
        backends = make()
        for backend in backends:
            await backend.connect()
        try:
            await test(backends)
        finally:
            for backend in backends:
                await backend.disconnect()

    asyncio.run(main())


async def _types(backend: StreamBackend, run_id: str) -> list[str]:
    return [json.loads(text)["type"] for text in await backend.history(run_id, 0, 1000)]


def test_nothing_follows_run_complete(make_backends: Callable[[], list[StreamBackend]]) -> None:
    run_with(make_backends, _nothing_follows_run_complete)


async def _nothing_follows_run_complete(backends: list[StreamBackend]) -> None:
    backend = backends[0]
    run_id = new_run_id()
    await backend.publish(run_id, [log_draft(run_id, 0)])
    # Events after run_complete in the same batch are dropped with it ...
    await backend.publish(run_id, [complete_draft(run_id), log_draft(run_id, 1)])
    # ... and so is every later batch, a second run_complete too.
    await backend.publish(run_id, [log_draft(run_id, 2), complete_draft(run_id)])
    assert await _types(backend, run_id) == ["step_log", "run_complete"]
    assert (await backend.info(run_id)).head == 2


def test_publish_end_requires_the_head_it_read(
    make_backends: Callable[[], list[StreamBackend]],
) -> None:
    run_with(make_backends, _publish_end_requires_the_head_it_read)


async def _publish_end_requires_the_head_it_read(backends: list[StreamBackend]) -> None:
    backend = backends[0]
    run_id = new_run_id()
    await backend.publish(run_id, [log_draft(run_id, 0), log_draft(run_id, 1)])
    moved = await backend.publish_end(run_id, [complete_draft(run_id)], head=1)
    assert moved.moved and not moved.stored
    stored = await backend.publish_end(run_id, [complete_draft(run_id)], head=2)
    assert stored.stored and stored == 3
    ended = await backend.publish_end(run_id, [complete_draft(run_id)], head=3)
    assert ended.ended and ended == PublishResult.ENDED
    assert await _types(backend, run_id) == ["step_log", "step_log", "run_complete"]


def test_replicas_racing_to_end_a_run_end_it_once(
    make_backends: Callable[[], list[StreamBackend]],
) -> None:
    run_with(make_backends, _replicas_racing_to_end_a_run_end_it_once)


async def _replicas_racing_to_end_a_run_end_it_once(backends: list[StreamBackend]) -> None:
    for _ in range(20):
        run_id = new_run_id()
        await backends[0].publish(run_id, [log_draft(run_id, 0)])
        results = await asyncio.gather(
            *(b.publish_end(run_id, [complete_draft(run_id)], head=1) for b in backends),
            backends[0].publish(run_id, [complete_draft(run_id)]),  # the flow's own hook
        )
        ends = [r for r in results[:-1] if r is not None and r.stored]
        assert len(ends) <= 1, results
        assert (await _types(backends[1], run_id)).count("run_complete") == 1
