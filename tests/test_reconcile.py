"""Reconciliation: a stream ends the way Prefect records its run's end, exactly once.

Real Prefect API server, real Redis, real flow processes, real uvicorn and WebSocket clients.
Prefect states are set through its API as a user, the UI or a runner would set them.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from uuid import UUID

import httpx
import pytest
import yaml
from conftest import free_port
from delivery_support import (
    VENV_BIN,
    ServerProcess,
    new_run_id,
    publish_logs,
    receive,
    redis_backend,
    serve_app,
    servers,
    settings_for,
    stream_url,
)
from helpers import (
    TESTS,
    StreamRecorder,
    assert_run_sequence,
    create_flow_run,
    parent_run,
    redis_history,
    stream_path,
)
from reconcile_flows import hooked_sleeper
from test_asyncapi import assert_valid

from prefect_ws.settings import Settings

ASYNCAPI = yaml.safe_load((TESTS.parent / "docs" / "asyncapi.yaml").read_text())

SECRET = "s3cret-in-the-url"
API_TIMEOUT = 8.0  # a stall on a silent API would be this long: far above a stream's time
END_WITHIN = 5.0  # seconds from Prefect recording a final state to clients seeing run_complete


def set_prefect_state(run_id: str, state_type: str, message: str = "") -> float:
    """Force a flow run's state through Prefect's API; returns when Prefect recorded it (epoch)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State, StateType

    with get_client(sync_client=True) as client:
        result = client.set_flow_run_state(
            UUID(run_id), State(type=StateType(state_type), message=message), force=True
        )
    assert result.state is not None
    return result.state.timestamp.timestamp()


@asynccontextmanager
async def flow_process(
    spec: str, run_id: str, settings: Settings, **params: Any
) -> AsyncIterator[Any]:
    """A flow run in its own process (killed on exit, whatever state it is in)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(TESTS / "run_flow.py"),
        spec,
        run_id,
        json.dumps(params),
        env={
            **os.environ,
            "PYTHONPATH": str(TESTS),
            "PREFECT_WS_BROADCAST_URL": settings.broadcast_url,
            "PREFECT_WS_REDIS_PREFIX": settings.redis_prefix,
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()


async def until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


def test_run_cancelled_through_the_api_ends_its_stream_cancelled(
    prefect_api: str, redis_url: str, redis_prefix: str
) -> None:
    settings = settings_for(redis_url, redis_prefix)
    run_id = create_flow_run(hooked_sleeper, {"seconds": 120})

    async def main(base: str) -> tuple[StreamRecorder, float, float]:
        # Opened before the run starts, without wait=: Prefect knows the run, so it waits.
        client = StreamRecorder(base + stream_path(run_id, wait=None))
        watching = asyncio.create_task(client.run(timeout=90))
        await until(lambda: client.hello is not None, "hello")
        async with flow_process("reconcile_flows:hooked_sleeper", run_id, settings, seconds=120):
            await until(lambda: any(e["type"] == "step_log" for e in client.events), "step log")
            recorded = set_prefect_state(run_id, "CANCELLED", "cancelled from the API")
            await watching
            seen = time.time()
        return client, recorded, seen

    with serve_app(settings) as (base, _):
        client, recorded, seen = asyncio.run(main(base))

    assert client.hello is not None and client.hello["waiting"] == "Pending"
    assert (client.close_code, client.close_reason) == (1000, "run complete")
    events = client.events
    assert_run_sequence(events, {"work": ["work started"]})
    assert [(e["type"], e["payload"].get("status")) for e in events[-2:]] == [
        ("step_complete", "cancelled"),
        ("run_complete", "cancelled"),
    ]
    assert events[-1]["payload"]["reconciled"] is True
    assert ("step_complete", "cancelled") in assert_valid(
        ASYNCAPI, [json.dumps(client.hello), *client.frames]
    )
    print(f"cancelled: run_complete reached the client {seen - recorded:.2f} s after Prefect")
    assert seen - recorded < END_WITHIN, f"run_complete {seen - recorded:.2f} s after Prefect"
    stored = redis_history(redis_url, redis_prefix, run_id)
    assert [e["type"] for e in stored].count("run_complete") == 1


def test_unknown_run_is_4404_at_once_and_a_scheduled_one_waits(
    prefect_api: str, redis_url: str, redis_prefix: str
) -> None:
    from prefect.client.schemas.objects import StateType

    settings = settings_for(redis_url, redis_prefix)
    run_id = create_flow_run(hooked_sleeper, {"seconds": 1})
    set_prefect_state(run_id, StateType.SCHEDULED.value)

    async def main(base: str) -> None:
        started = time.monotonic()
        unknown = await receive(f"{base}{stream_path(str(UUID(int=7)), wait=None)}")
        assert unknown.code == 4404 and unknown.hello is None
        assert time.monotonic() - started < 2.0

        waiting = StreamRecorder(base + stream_path(run_id, wait=None))
        watching = asyncio.create_task(waiting.run(timeout=60))
        await until(lambda: waiting.hello is not None, "hello")
        assert waiting.hello is not None
        assert (waiting.hello["head"], waiting.hello["waiting"]) == (0, "Scheduled")
        await asyncio.sleep(0.5)  # still open: it waits for the run, not for a timeout
        assert not watching.done()
        # Server-Sent Events alike: the known run is waited for, the unknown one is a 404.
        http = base.replace("ws://", "http://")
        async with httpx.AsyncClient(base_url=http, timeout=10) as client:
            sse = f"/api/v2/workflows/runs/{run_id}/events/stream"
            async with client.stream("GET", sse) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        assert json.loads(line[5:])["waiting"] == "Scheduled"
                        break
            missing = await client.get(f"/api/v2/workflows/runs/{UUID(int=7)}/events/stream")
            assert missing.status_code == 404
        # The run never starts: cancelled while scheduled, its stream ends cancelled.
        set_prefect_state(run_id, "CANCELLED")
        await watching
        assert (waiting.close_code, [e["type"] for e in waiting.events]) == (1000, ["run_complete"])
        assert waiting.events[0]["payload"]["status"] == "cancelled"

        # Opened after Prefect recorded the end: ended at once from Prefect's record.
        late = await receive(f"{base}{stream_path(run_id, wait=None)}", keep_text=True)
        assert late.code == 1000 and late.seqs == [1]

    with serve_app(settings) as (base, _):
        asyncio.run(main(base))


def test_two_replicas_end_a_crashed_run_once(
    prefect_api: str, redis_url: str, redis_prefix: str
) -> None:
    settings = settings_for(redis_url, redis_prefix)
    run_id = create_flow_run(hooked_sleeper, {"seconds": 120})

    async def main(replicas: list[ServerProcess]) -> list[StreamRecorder]:
        clients = [
            StreamRecorder(replica.base + stream_path(run_id))
            for replica in replicas
            for _ in (1, 2)
        ]
        watching = [asyncio.create_task(c.run(timeout=90)) for c in clients]
        await until(lambda: all(c.hello is not None for c in clients), "hello")
        async with flow_process(
            "reconcile_flows:hooked_sleeper", run_id, settings, seconds=120
        ) as proc:
            await until(
                lambda: all(any(e["type"] == "step_log" for e in c.events) for c in clients),
                "step log",
            )
            proc.send_signal(signal.SIGKILL)  # no hook runs: only Prefect can say how it ended
            await proc.wait()
        # What a runner or worker records for a flow process that died under it.
        set_prefect_state(run_id, "CRASHED", "Flow run infrastructure exited with code -9.")
        await asyncio.gather(*watching)
        return clients

    with servers(redis_url, redis_prefix, 2) as replicas:
        clients = asyncio.run(main(replicas))
        health = [httpx.get(f"{r.http}/healthz").json()["prefect"] for r in replicas]
        logs = [r.stop() for r in replicas]

    assert all("Traceback" not in log for log in logs), logs
    assert all(h["reachable"] is True for h in health), health
    assert sum(h["reconciled"] for h in health) == 1, health  # one replica won, one lost the race
    reference = clients[0]
    for client in clients:
        assert client.frames == reference.frames
        assert (client.close_code, client.close_reason) == (1000, "run complete")
    events = reference.events
    assert_run_sequence(events, {"work": ["work started"]})
    assert events[-2]["payload"]["status"] == "crashed"
    assert events[-1]["payload"]["status"] == "crashed"
    assert "exited with code -9" in events[-1]["payload"]["error"]
    assert ("step_complete", "crashed") in assert_valid(ASYNCAPI, reference.frames)
    stored = redis_history(redis_url, redis_prefix, run_id)
    assert [e["type"] for e in stored].count("run_complete") == 1


class _GarbageHandler(http.server.BaseHTTPRequestHandler):
    def _garbage(self) -> None:
        body = b"\x00{not json"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _garbage

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def broken_api(kind: str) -> Iterator[str]:
    """A ``PREFECT_API_URL`` that refuses connections, answers garbage, or never answers."""
    if kind == "unreachable":  # with credentials in the URL, which no log line may show
        yield f"http://prefect:{SECRET}@127.0.0.1:{free_port()}/api"
        return
    if kind == "garbage":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GarbageHandler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/api"
        finally:
            server.shutdown()
            server.server_close()
        return
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        yield f"http://127.0.0.1:{silent.getsockname()[1]}/api"


@pytest.mark.parametrize("kind", ["unreachable", "garbage", "slow"])
def test_a_broken_prefect_api_never_stalls_streaming(
    kind: str, redis_url: str, redis_prefix: str
) -> None:
    settings = settings_for(redis_url, redis_prefix)

    async def main(server: ServerProcess) -> dict[str, Any]:
        run_id = new_run_id()
        async with redis_backend(settings) as backend:
            await publish_logs(backend, run_id, 20, complete=False)
            started = time.monotonic()
            reader = asyncio.create_task(receive(stream_url(server.base, run_id)))
            await asyncio.sleep(0)
            await publish_logs(backend, run_id, 5, start=20)  # the flow's hooks end it
            result = await reader
            took = time.monotonic() - started
        unknown_started = time.monotonic()
        unknown = await receive(stream_url(server.base, new_run_id()))
        unknown_took = time.monotonic() - unknown_started
        health = httpx.get(f"{server.http}/healthz")
        return {
            "result": result,
            "took": took,
            "unknown": unknown,
            "unknown_took": unknown_took,
            "health": health,
        }

    with (
        broken_api(kind) as api_url,
        servers(
            redis_url,
            redis_prefix,
            1,
            PREFECT_API_URL=api_url,
            PREFECT_WS_PREFECT_API_TIMEOUT=str(API_TIMEOUT),
        ) as (server,),
    ):
        out = asyncio.run(main(server))
        log = server.stop()

    out["result"].assert_exactly(1, 26)
    assert out["result"].code == 1000
    assert out["took"] < API_TIMEOUT / 2, out["took"]  # streaming never waits for Prefect
    assert out["unknown"].code == 4404
    assert out["unknown_took"] < API_TIMEOUT + 10  # at most the API timeout, then 4404
    assert out["health"].status_code == 200
    prefect = out["health"].json()["prefect"]
    assert prefect["reachable"] is False and prefect["error"], prefect
    assert "Traceback" not in log, log[-3000:]
    assert log.count("is unavailable") == 1, log[-3000:]  # said once, not per request
    assert SECRET not in log and SECRET not in out["health"].text


def test_tail_says_waiting_then_shows_a_subflow_step_with_its_run_id(
    prefect_api: str, redis_url: str, redis_prefix: str
) -> None:
    settings = settings_for(redis_url, redis_prefix)
    run_id = create_flow_run(hooked_sleeper, {"seconds": 1})
    set_prefect_state(run_id, "SCHEDULED")
    child = str(uuid.uuid4())

    async def main(base: str) -> tuple[int, str, str]:
        tail = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "prefect-ws"),
            "tail",
            run_id,
            "--url",
            base,  # no --wait: Prefect knows the run, the server waits for it
            env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert tail.stderr is not None
        first = await asyncio.wait_for(tail.stderr.readline(), 30)
        # The parent's hooks: the subflow is a step of the parent that names the child run.
        async with redis_backend(settings) as backend:
            await backend.publish(run_id, parent_run(run_id, child))
        stdout, rest = await asyncio.wait_for(tail.communicate(), 30)
        assert tail.returncode is not None
        return tail.returncode, stdout.decode(), first.decode() + rest.decode()

    with serve_app(settings) as (base, _):
        code, stdout, stderr = asyncio.run(main(base))

    assert code == 0, stderr
    assert "waiting for the run to start (Prefect state: Scheduled)" in stderr
    assert f"child started  subflow run {child}" in stdout  # the step_start line
    assert f"child → subflow {child}" in stdout  # the live view's step row
