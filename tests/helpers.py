"""Shared test helpers: create runs, run flows in a subprocess, collect and check streams."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

TESTS = Path(__file__).resolve().parent


async def eventually(
    probe: Callable[[], Any],
    until: Callable[[Any], bool] = bool,
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
) -> Any:
    """Poll ``probe()`` (plain or async) until ``until(value)``; return that value.

    Tests wait for a condition ("subscribed", "delivered", "closed"), never for a time: on a
    loaded machine any fixed sleep is too short once. On timeout the failure says what was seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout} s; last seen: {value!r}")
        await asyncio.sleep(interval)


def publisher_env(settings: Any) -> dict[str, str]:
    """The environment a flow process needs to publish to the backend ``settings`` serve."""
    return {
        "PREFECT_WS_BROADCAST_URL": settings.broadcast_url,
        "PREFECT_WS_REDIS_PREFIX": settings.redis_prefix,
    }


def create_flow_run(flow: Any, parameters: dict[str, Any] | None = None) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(flow, parameters=parameters or {}).id)


async def run_flow_in_subprocess(
    spec: str,
    run_id: str,
    parameters: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 90,
) -> dict[str, Any]:
    """Run ``module:flow`` for ``run_id`` in a new Python process; return its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(TESTS / "run_flow.py"),
        spec,
        run_id,
        json.dumps(parameters or {}),
        env={**os.environ, "PYTHONPATH": python_path(), **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    if proc.returncode != 0:
        raise AssertionError(f"flow process failed ({proc.returncode}):\n{stderr.decode()[-4000:]}")
    lines = [line for line in stdout.decode().splitlines() if line.startswith("{")]
    report: dict[str, Any] = json.loads(lines[-1])
    report["stderr"] = stderr.decode()
    return report


def python_path() -> str:
    """PYTHONPATH for a child process: the tests folder, then the repository checked out here
    (so a child imports this tree's package, not another installed copy)."""
    return os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])


class StreamRecorder:
    """A real WebSocket client that records every frame and the close code."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.frames: list[str] = []  # event frames, exactly as received
        self.hello: dict[str, Any] | None = None  # the control frame that opens every stream
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.connected = asyncio.Event()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.frames]

    async def run(self, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            async with connect(self.url, compression=None, max_size=2**24) as websocket:
                self.connected.set()
                async for message in websocket:
                    assert isinstance(message, str)
                    if message.startswith('{"type":"hello"'):
                        assert self.hello is None and not self.frames, "hello must come first, once"
                        self.hello = json.loads(message)
                    else:
                        self.frames.append(message)
                self.close_code = websocket.close_code
                self.close_reason = websocket.close_reason


def stream_path(run_id: str, since: int | None = None, wait: float | None = 60) -> str:
    """The stream path; by default it waits (up to 60 s) for a run that has not started yet."""
    query = [f"since={since}"] if since is not None else []
    if wait is not None:
        query.append(f"wait={wait:g}")
    path = f"/api/v2/workflows/runs/{run_id}/stream"
    return f"{path}?{'&'.join(query)}" if query else path


def assert_run_sequence(
    events: list[dict[str, Any]],
    expected_logs: dict[str | None, list[str]],
    *,
    preamble: bool = False,
) -> None:
    """The protocol's promises for one complete run, checked on content, order and counts.

    ``preamble``: run-level logs may precede ``run_start`` (a deployment's runner logs its pull
    steps for the flow run before the flow's engine starts it).
    """
    assert events, "no events received"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), (
        "seq must be 1..N without gaps"
    )
    for event in events:
        assert set(event) == {"v", "type", "runId", "seq", "ts", "payload"}
        assert event["v"] == 1
        assert event["runId"] == events[0]["runId"]
    start = next((i for i, e in enumerate(events) if e["type"] == "run_start"), None)
    assert start is not None, "no run_start"
    assert start == 0 or preamble, f"{events[0]['type']} before run_start"
    assert all(e["type"] == "step_log" and e["payload"]["stepId"] is None for e in events[:start])
    assert events[-1]["type"] == "run_complete"
    assert [e["type"] for e in events].count("run_complete") == 1

    position: dict[tuple[str, str], int] = {}
    seen_attempts: set[tuple[str, str, int]] = set()
    for index, event in enumerate(events):
        step = event["payload"].get("stepId")
        if event["type"] == "step_start":  # once per attempt; logs follow the first
            attempt = (event["type"], step, event["payload"]["attempt"])
            assert attempt not in seen_attempts, f"duplicate {attempt}"
            seen_attempts.add(attempt)
            position.setdefault(("step_start", step), index)
        elif event["type"] == "step_complete":
            key = (event["type"], step)
            assert key not in position, f"duplicate {key}"
            position[key] = index
    logs: dict[str | None, list[str]] = {}
    for index, event in enumerate(events):
        if event["type"] != "step_log":
            continue
        step = event["payload"]["stepId"]
        logs.setdefault(step, []).append(event["payload"]["message"])
        if step is not None:
            assert position[("step_start", step)] < index, f"log of {step} before its step_start"
            if ("step_complete", step) in position:
                assert index < position[("step_complete", step)], (
                    f"log of {step} after step_complete"
                )
    assert logs == expected_logs


def emit_small_run(publisher: Any, run_id: str, logs: int = 3) -> None:
    """Queue a complete run on ``publisher``: run_start, ``logs`` flow-level lines, run_complete."""
    publisher.emit(
        run_id,
        "run_start",
        {
            "flowName": "small",
            "flowRunId": run_id,
            "flowRunName": "calm-cat",
            "parameters": {},
            "layers": None,
        },
    )
    for i in range(logs):
        publisher.emit(
            run_id,
            "step_log",
            {
                "stepId": None,
                "taskRunId": None,
                "level": "INFO",
                "message": f"line {i}",
                "logger": "prefect.flow_runs",
            },
        )
    publisher.emit(
        run_id,
        "run_complete",
        {
            "status": "completed",
            "duration": 0.1,
            "steps": {"completed": 0, "failed": 0, "skipped": 0, "cancelled": 0, "crashed": 0},
            "failedSteps": [],
            "error": None,
        },
    )


def redis_history(
    redis_url: str, prefix: str, run_id: str, limit: int = 100_000
) -> list[dict[str, Any]]:
    """Every stored event of a run, read straight from Redis."""
    from prefect_ws.backends import RedisBackend

    async def read() -> list[str]:
        backend = RedisBackend(redis_url, prefix=prefix)
        await backend.connect()
        try:
            return await backend.history(run_id, 0, limit)
        finally:
            await backend.disconnect()

    return [json.loads(text) for text in asyncio.run(read())]


def parent_run(run_id: str, child: str) -> list[Any]:
    """A parent flow's events, as its hooks publish them, with one subflow step (``childRunId``)."""
    from prefect_ws.protocol.events import encode

    return [
        encode(
            run_id,
            "run_start",
            {
                "flowName": "parent",
                "flowRunId": run_id,
                "flowRunName": "calm-cat",
                "parameters": {},
                "layers": None,
            },
        ),
        encode(
            run_id,
            "step_start",
            {
                "stepId": "child",
                "taskRunId": None,
                "layer": None,
                "attempt": 1,
                "childRunId": child,
            },
        ),
        encode(
            run_id,
            "step_complete",
            {
                "stepId": "child",
                "taskRunId": None,
                "status": "completed",
                "duration": 0.5,
                "error": None,
                "childRunId": child,
            },
        ),
        encode(
            run_id,
            "run_complete",
            {
                "status": "completed",
                "duration": 1.0,
                "steps": {"completed": 1, "failed": 0, "skipped": 0, "cancelled": 0, "crashed": 0},
                "failedSteps": [],
                "error": None,
            },
        ),
    ]


def artifacts_of(run_id: str) -> list[str]:
    """The data of every artifact Prefect's API holds for a flow run."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]))
        )
    return [str(a.data) for a in artifacts]


def python_output(code: str) -> str:
    """What ``code`` prints, run in a fresh interpreter: for what one process does to itself
    (patching, imports, tuning) that the test process must not see or has already done."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
