"""Zero-code mode end to end: plain @flow/@task in another process with only
PREFECT_PLUGINS_ENABLED=true -> Redis -> a real server -> WebSocket clients, every stream complete.

Covers what leaves the happy path: mapped and repeated tasks, flow retries, task retries, a task
that crashes, one that ends Cancelled, one skipped because its upstream failed, subflows, async
tasks gathered. Every stream goes through the shared invariant checker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import plain_flows
import pytest
import sample_flows
import yaml
from helpers import (
    StreamRecorder,
    artifacts_of,
    assert_run_sequence,
    create_flow_run,
    run_flow_in_subprocess,
    stream_path,
)
from test_asyncapi import ROOT, assert_valid

from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings

PUBLIC_URL = "wss://streams.example.test"
ASYNCAPI = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())


@pytest.fixture
def redis_settings(redis_url: str, redis_prefix: str) -> Settings:
    return Settings(broadcast_url=redis_url, redis_prefix=redis_prefix)


def _zero_code_env(settings: Settings, home: Path) -> dict[str, str]:
    return {
        "PREFECT_PLUGINS_ENABLED": "true",
        "PREFECT_HOME": str(home),  # no logging config of the user's own
        "PREFECT_WS_BROADCAST_URL": settings.broadcast_url,
        "PREFECT_WS_REDIS_PREFIX": settings.redis_prefix,
        "PREFECT_WS_PUBLIC_URL": PUBLIC_URL,
    }


async def _stream_run(
    base: str,
    spec: str,
    run_id: str,
    parameters: dict[str, Any],
    env: dict[str, str],
    also: tuple[str, ...] = (),
) -> tuple[dict[str, Any], StreamRecorder]:
    client = StreamRecorder(base + stream_path(run_id))
    watching = asyncio.create_task(client.run())
    await client.connected.wait()
    report = await run_flow_in_subprocess(spec, run_id, parameters, env=env)
    try:
        await watching
    except TimeoutError:
        raise AssertionError(
            f"the stream did not end; received {client.events}\n{report['stderr'][-3000:]}"
        ) from None
    assert_valid(ASYNCAPI, client.frames)  # every event as docs/asyncapi.yaml describes it
    return report, client


def _run(
    settings: Settings, home: Path, flow: Any, spec: str, parameters: dict[str, Any] | None = None
) -> tuple[dict[str, Any], StreamRecorder]:
    run_id = create_flow_run(flow, parameters or {})
    with serve_in_thread(settings) as base:
        return asyncio.run(
            _stream_run(base, spec, run_id, parameters or {}, _zero_code_env(settings, home))
        )


def _of(events: list[dict[str, Any]], type: str) -> list[dict[str, Any]]:
    return [e["payload"] for e in events if e["type"] == type]


def test_plain_flow_streams_every_step_with_readable_ids(
    prefect_api: str, redis_settings: Settings, tmp_path: Path
) -> None:
    report, client = _run(redis_settings, tmp_path, plain_flows.shapes, "plain_flows:shapes")
    assert report["state"] == "COMPLETED", report["stderr"][-3000:]
    events = client.events
    assert_run_sequence(
        events,
        {
            None: ["shapes begin"],
            "square[0]": ["square 1"],
            "square[1]": ["square 2"],
            "square[2]": ["square 3"],
            "total": ["total of 3"],
            "total#2": ["total of 1"],
        },
    )
    assert client.close_code == 1000
    starts = _of(events, "step_start")
    assert sorted(s["stepId"] for s in starts) == [
        "square[0]",
        "square[1]",
        "square[2]",
        "total",
        "total#2",
    ]
    assert all(s["attempt"] == 1 and s["taskRunId"] for s in starts)
    assert {c["status"] for c in _of(events, "step_complete")} == {"completed"}
    done = events[-1]["payload"]
    assert done["status"] == "completed" and done["attempts"] == 1
    assert done["steps"] == {
        "completed": 5,
        "failed": 0,
        "skipped": 0,
        "cancelled": 0,
        "crashed": 0,
    }
    assert events[0]["payload"]["flowName"] == "zero-code-shapes"
    assert events[0]["payload"]["attempt"] == 1

    # Prefect's UI shows the run's artifacts: one is the link to the live page.
    links = artifacts_of(events[0]["runId"])
    assert links == [
        f"[Open the live stream](https://streams.example.test/runs/{events[0]['runId']})"
    ]


def test_flow_retry_is_one_stream_with_each_attempt_announced(
    prefect_api: str, redis_settings: Settings, tmp_path: Path
) -> None:
    parameters = {"marker": str(tmp_path / "flow-attempts")}
    report, client = _run(
        redis_settings, tmp_path, plain_flows.flaky, "plain_flows:flaky", parameters
    )
    assert report["state"] == "COMPLETED", report["stderr"][-3000:]
    events = client.events
    types = [e["type"] for e in events]
    assert types.count("run_start") == 1 and types.count("run_complete") == 1
    assert _of(events, "run_attempt") == [
        {"attempt": 2, "previous": _of(events, "run_attempt")[0]["previous"]}
    ]
    assert types.index("run_attempt") > types.index("step_complete")  # after attempt 1's step
    done = events[-1]["payload"]
    assert done["status"] == "completed" and done["attempts"] == 2
    flow_logs = [e["payload"]["message"] for e in events if e["type"] == "step_log"]
    assert [m for m in flow_logs if m.startswith("flow attempt")] == [
        "flow attempt 1",
        "flow attempt 2",
    ]
    # each attempt ran the task once: two task runs, two distinct steps
    assert [s["stepId"] for s in _of(events, "step_start")] == ["square", "square#2"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert client.close_code == 1000


def test_task_retries_start_each_attempt_once(
    prefect_api: str, redis_settings: Settings, tmp_path: Path
) -> None:
    parameters = {"marker": str(tmp_path / "task-attempts")}
    report, client = _run(
        redis_settings, tmp_path, plain_flows.task_retries, "plain_flows:task_retries", parameters
    )
    assert report["state"] == "COMPLETED", report["stderr"][-3000:]
    events = client.events
    assert_run_sequence(
        events, {"stubborn": ["task attempt 1", "task attempt 2", "task attempt 3"]}
    )
    assert [(s["stepId"], s["attempt"]) for s in _of(events, "step_start")] == [
        ("stubborn", 1),
        ("stubborn", 2),
        ("stubborn", 3),
    ]
    assert [c["status"] for c in _of(events, "step_complete")] == ["completed"]


def test_crashed_cancelled_and_skipped_tasks_end_their_steps(
    prefect_api: str, redis_settings: Settings, tmp_path: Path
) -> None:
    report, client = _run(
        redis_settings, tmp_path, plain_flows.crash_and_cancel, "plain_flows:crash_and_cancel"
    )
    assert report["state"] == "COMPLETED", report["stderr"][-3000:]
    events = client.events
    assert_run_sequence(events, {"crashes": ["about to crash"], "gives_up": ["cancelling myself"]})
    completes = {c["stepId"]: c for c in _of(events, "step_complete")}
    assert completes["crashes"]["status"] == "crashed"
    assert "Abandon" in (completes["crashes"]["error"] or "")
    assert completes["gives_up"]["status"] == "cancelled"
    assert completes["square"]["status"] == "failed"
    assert completes["after"]["status"] == "skipped"
    assert completes["after"]["reason"] == "upstream step 'square' failed"
    assert "after" not in {s["stepId"] for s in _of(events, "step_start")}
    done = events[-1]["payload"]
    assert done["steps"] == {
        "completed": 0,
        "failed": 1,
        "skipped": 1,
        "cancelled": 1,
        "crashed": 1,
    }
    assert done["failedSteps"] == ["crashes", "square"]


def test_subflows_are_steps_of_the_parent_and_streams_of_their_own(
    prefect_api: str, redis_settings: Settings, tmp_path: Path
) -> None:
    report, client = _run(redis_settings, tmp_path, plain_flows.parent, "plain_flows:parent")
    assert report["state"] == "COMPLETED" and report["result"] == 13, report["stderr"][-3000:]
    events = client.events
    assert_run_sequence(events, {None: ["parent begins"]})
    starts = _of(events, "step_start")
    completes = _of(events, "step_complete")
    assert [s["stepId"] for s in starts] == ["zero-code-child", "zero-code-child#2"]
    assert [c["stepId"] for c in completes] == ["zero-code-child", "zero-code-child#2"]
    children = [s["childRunId"] for s in starts]
    assert [c["childRunId"] for c in completes] == children
    assert all(c["status"] == "completed" for c in completes)

    async def read_children(base: str) -> list[StreamRecorder]:
        recorders = [StreamRecorder(base + stream_path(child, wait=None)) for child in children]
        await asyncio.gather(*(r.run(timeout=20) for r in recorders))
        return recorders

    with serve_in_thread(redis_settings) as base:
        streams = asyncio.run(read_children(base))
    for n, recorder, child_id in zip((2, 3), streams, children, strict=True):
        assert_run_sequence(recorder.events, {None: [f"child {n}"], "square": [f"square {n}"]})
        start = recorder.events[0]["payload"]
        assert start["parentRunId"] == events[0]["runId"] and start["flowRunId"] == child_id
        assert recorder.close_code == 1000


def test_async_flow_with_gathered_tasks_streams_like_a_sync_one(
    prefect_api: str, redis_settings: Settings, tmp_path: Path
) -> None:
    report, client = _run(
        redis_settings, tmp_path, plain_flows.async_gather, "plain_flows:async_gather"
    )
    assert report["state"] == "COMPLETED" and report["result"] == 48, report["stderr"][-3000:]
    events = client.events
    logs = {e["payload"]["stepId"]: [e["payload"]["message"]] for e in _of_logs(events)}
    assert set(logs) == {"double", "double#2", "double#3", "double#4", "double#5"}
    assert_run_sequence(events, logs)
    messages = sorted(e["payload"]["message"] for e in _of_logs(events))
    assert messages == ["double 0", "double 1", "double 10", "double 11", "double 2"]
    assert len(_of(events, "step_start")) == 5 == len(_of(events, "step_complete"))
    assert events[-1]["payload"]["status"] == "completed"
    assert client.close_code == 1000


def _of_logs(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "step_log"]


def test_decorated_flow_with_the_plugin_on_publishes_each_event_once(
    prefect_api: str, redis_settings: Settings, tmp_path: Path
) -> None:
    """Hooks and engine watch both report the same states: the stream shows each once."""
    report, client = _run(
        redis_settings,
        tmp_path,
        sample_flows.four_steps,
        "sample_flows:four_steps",
        {"fail": False},
    )
    assert report["state"] == "COMPLETED", report["stderr"][-3000:]
    assert_run_sequence(client.events, sample_flows.FOUR_STEPS_LOGS)  # no duplicate, in order
    types = [e["type"] for e in client.events]
    assert types.count("step_start") == 4 == types.count("step_complete")
    assert client.close_code == 1000
