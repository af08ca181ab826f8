"""Concurrent backend reads and subscribes of many runs go out together (backends.coalesce):
each request still gets its own answer, errors reach every request of their batch, and a
request given up is left out."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from prefect_ws.backends import BackendUnavailable, RedisBackend, create_backend
from prefect_ws.backends.coalesce import Coalescer
from prefect_ws.protocol.events import encode, frames_from_message
from prefect_ws.settings import Settings


class Recorder:
    """A ``send`` that records its batches and answers each key doubled, once released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self, keys: list[int]) -> list[int]:
        self.batches.append(keys)
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [2 * key for key in keys]


async def _one_in_flight(
    max_batch: int,
) -> tuple[Recorder, Coalescer[int, int], asyncio.Task[int]]:
    """A coalescer whose first request (key 1) is sent and not yet answered."""
    send = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(send, max_batch=max_batch)
    first = asyncio.create_task(coalescer(1))
    await _until(lambda: send.batches, "the first request sent")
    return send, coalescer, first


async def _until(condition: Any, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def test_requests_made_while_one_is_in_flight_go_out_together() -> None:
    async def main() -> None:
        send, coalescer, first = await _one_in_flight(max_batch=3)
        rest = [asyncio.create_task(coalescer(key)) for key in range(2, 7)]
        await asyncio.sleep(0)
        assert send.batches == [[1]], "a request alone goes out at once"
        send.release.set()
        assert await first == 2
        assert await asyncio.gather(*rest) == [4, 6, 8, 10, 12]
        assert send.batches == [[1], [2, 3, 4], [5, 6]], "the rest in batches of max_batch"
        send.batches.clear()
        assert await coalescer(7) == 14, "the coalescer starts again once idle"
        assert send.batches == [[7]]

    asyncio.run(main())


def test_an_error_reaches_every_request_of_its_batch_and_no_other() -> None:
    async def main() -> None:
        send, coalescer, first = await _one_in_flight(max_batch=10)
        second = [asyncio.create_task(coalescer(key)) for key in (2, 3)]
        await asyncio.sleep(0)
        send.fail_with = BackendUnavailable("redis: down")
        send.release.set()
        for task in (first, *second):
            with pytest.raises(BackendUnavailable, match="down"):
                await task
        send.fail_with = None
        assert await coalescer(4) == 8, "the next batch goes out as usual"

    asyncio.run(main())


def test_a_request_given_up_is_left_out_and_the_others_answered() -> None:
    async def main() -> None:
        send, coalescer, first = await _one_in_flight(max_batch=10)
        waiting = {key: asyncio.create_task(coalescer(key)) for key in (2, 3, 4)}
        await asyncio.sleep(0)
        waiting[3].cancel()
        first.cancel()  # given up while its batch is in flight: its answer is dropped
        send.release.set()
        assert await waiting[2] == 4 and await waiting[4] == 8
        assert send.batches == [[1], [2, 4]]
        assert first.cancelled() and waiting[3].cancelled()

    asyncio.run(main())


def _backend(url: str, prefix: str) -> RedisBackend:
    backend = create_backend(Settings(broadcast_url=url, redis_prefix=prefix))
    assert isinstance(backend, RedisBackend)
    return backend


def _counting(backend: RedisBackend, name: str) -> list[int]:
    """Count the backend's calls of one of its Redis scripts (the keys each call named)."""
    calls: list[int] = []
    script = getattr(backend, name)

    def counted(*, keys: list[str], args: list[Any] | None = None) -> Any:
        calls.append(len(keys))
        return script(keys=keys, args=args)

    setattr(backend, name, counted)
    return calls


def test_concurrent_reads_of_many_runs_are_few_redis_commands_with_each_runs_answer(
    shared_backend_url: str, redis_prefix: str
) -> None:
    """Stream starts in a crowd: 60 runs' info and history read at once, each run its own
    answer; on one Redis they take a handful of script calls, not one per run."""

    async def main() -> None:
        backend = _backend(shared_backend_url, redis_prefix)
        await backend.connect()
        try:
            runs = [str(uuid.uuid4()) for _ in range(60)]
            for n, run_id in enumerate(runs):  # run n holds n + 1 events
                drafts = [
                    encode(run_id, "step_log", {"stepId": None, "message": f"{run_id} {i}"})
                    for i in range(n + 1)
                ]
                await backend.publish(run_id, drafts)
            info_calls = _counting(backend, "_info_script")
            history_calls = _counting(backend, "_history_script")
            infos = await asyncio.gather(*(backend.info(run_id) for run_id in runs))
            pages = await asyncio.gather(*(backend.history(run_id, 0, 500) for run_id in runs))
            unknown = await backend.info(str(uuid.uuid4()))
        finally:
            await backend.disconnect()
        for n, (run_id, info, texts) in enumerate(zip(runs, infos, pages, strict=True)):
            assert (info.head, info.first, info.epoch is not None) == (n + 1, 1, True)
            assert info.last is not None and info.last == texts[-1]
            frames = frames_from_message("\n".join(texts))
            assert [frame.seq for frame in frames] == list(range(1, n + 2))
            assert all(run_id in frame.data for frame in frames)
        assert (unknown.head, unknown.first, unknown.last, unknown.epoch) == (0, None, None, None)
        if backend.name == "redis":
            assert len(info_calls) <= 5, f"60 info reads took {len(info_calls)} script calls"
            assert len(history_calls) <= 10, f"history: {len(history_calls)} calls for 60 runs"
        else:  # a script's keys share one slot on a cluster: one call per run
            assert sum(info_calls) == 3 * 61 and sum(history_calls) == 60

    asyncio.run(main())


def test_concurrent_subscribes_are_one_command_and_each_run_goes_live(
    redis_url: str, redis_prefix: str
) -> None:
    async def main() -> None:
        backend = _backend(redis_url, redis_prefix)
        await backend.connect()
        try:
            await backend.subscribe(str(uuid.uuid4()))  # the listener is connected
            await _wait_live(backend, set(backend._channels))
            commands: list[tuple[str, int]] = []
            listener = backend._pubsub_listener
            send = listener._send

            async def counted(pubsub: Any, command: str, run_ids: Any) -> None:
                commands.append((command, len(run_ids)))
                await send(pubsub, command, run_ids)

            listener._send = counted  # type: ignore[method-assign]
            runs = {str(uuid.uuid4()) for _ in range(50)}
            await asyncio.gather(*(backend.subscribe(run_id) for run_id in runs))
            await _wait_live(backend, runs)
            assert len(commands) <= 3 and sum(n for _, n in commands) == 50, commands
            await asyncio.gather(*(backend.unsubscribe(run_id) for run_id in runs))
            assert not runs & backend._confirmed
            assert sum(n for c, n in commands if c == "unsubscribe") == 50, commands
        finally:
            await backend.disconnect()

    asyncio.run(main())


async def _wait_live(backend: RedisBackend, runs: set[str]) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not all(backend.is_live(run_id) for run_id in runs):
        if asyncio.get_running_loop().time() > deadline:
            missing = [run_id for run_id in runs if not backend.is_live(run_id)]
            raise AssertionError(f"{len(missing)} of {len(runs)} runs never went live")
        await asyncio.sleep(0.01)
