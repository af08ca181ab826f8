"""The spine end to end: a flow in another process -> Redis -> uvicorn hub -> WebSocket clients."""

from __future__ import annotations

import asyncio

import pytest
from helpers import (
    StreamRecorder,
    assert_run_sequence,
    create_flow_run,
    publisher_env,
    redis_history,
    run_flow_in_subprocess,
    stream_path,
)
from sample_flows import FOUR_STEPS_LOGS, four_steps, process_pool_steps

from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings


@pytest.fixture
def redis_settings(redis_url: str, redis_prefix: str) -> Settings:
    return Settings(broadcast_url=redis_url, redis_prefix=redis_prefix)


async def _watch_run(
    base_url: str, run_id: str, settings: Settings, fail: bool
) -> tuple[list[StreamRecorder], dict]:
    clients = [StreamRecorder(base_url + stream_path(run_id)) for _ in range(2)]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    await asyncio.gather(*(c.connected.wait() for c in clients))
    report = await run_flow_in_subprocess(
        "sample_flows:four_steps", run_id, {"fail": fail}, env=publisher_env(settings)
    )
    await asyncio.gather(*tasks)
    return clients, report


def test_two_clients_see_the_same_complete_ordered_run(
    prefect_api: str, redis_settings: Settings
) -> None:
    run_id = create_flow_run(four_steps, {"fail": False})
    with serve_in_thread(redis_settings) as base_url:
        clients, report = asyncio.run(_watch_run(base_url, run_id, redis_settings, fail=False))

    assert report["state"] == "COMPLETED" and report["result"] == 33
    first, second = clients
    assert first.frames == second.frames, "both clients must receive identical bytes"
    events = first.events
    assert_run_sequence(events, FOUR_STEPS_LOGS)
    assert first.close_code == 1000 and first.close_reason == "run complete"
    assert first.hello == {
        "type": "hello",
        "v": 1,
        "runId": run_id,
        "since": 0,
        "head": 0,
        "first": None,
        "recovered": True,
        "epoch": None,  # the run had not published when the client joined
        "reset": False,
        "waiting": "Pending",  # created in Prefect, not started: the stream waits for it
    }

    start = events[0]["payload"]
    assert start["flowName"] == "spine-four-steps" and start["flowRunId"] == run_id
    assert start["parameters"] == {"fail": False}
    assert all(e["runId"] == run_id for e in events)

    steps = [e["payload"] for e in events if e["type"] == "step_complete"]
    assert sorted(s["stepId"] for s in steps) == ["finish", "left", "prepare", "right"]
    assert all(s["status"] == "completed" and s["error"] is None for s in steps)
    assert all(isinstance(s["duration"], float) and s["duration"] > 0 for s in steps)
    starts = {e["payload"]["stepId"]: e for e in events if e["type"] == "step_start"}
    assert all(s["payload"]["attempt"] == 1 and s["payload"]["taskRunId"] for s in starts.values())

    # left and right ran concurrently: both started before either completed.
    index = {(e["type"], e["payload"].get("stepId")): i for i, e in enumerate(events)}
    assert max(index[("step_start", "left")], index[("step_start", "right")]) < min(
        index[("step_complete", "left")], index[("step_complete", "right")]
    )
    levels = {
        e["payload"]["message"]: e["payload"]["level"] for e in events if e["type"] == "step_log"
    }
    assert levels["finish warning: 33"] == "WARNING" and levels["right print 0"] == "INFO"

    done = events[-1]["payload"]
    assert done["status"] == "completed" and done["error"] is None and done["failedSteps"] == []
    assert done["steps"] == {
        "completed": 4,
        "failed": 0,
        "skipped": 0,
        "cancelled": 0,
        "crashed": 0,
    }
    assert done["duration"] > 0.3


def test_a_failing_step_fails_the_run(prefect_api: str, redis_settings: Settings) -> None:
    run_id = create_flow_run(four_steps, {"fail": True})
    with serve_in_thread(redis_settings) as base_url:
        clients, report = asyncio.run(_watch_run(base_url, run_id, redis_settings, fail=True))

    assert report["state"] == "FAILED"
    first, second = clients
    assert first.frames == second.frames
    events = first.events
    assert_run_sequence(
        events,
        {k: v for k, v in FOUR_STEPS_LOGS.items() if k != "finish"},
    )
    completes = {
        e["payload"]["stepId"]: e["payload"] for e in events if e["type"] == "step_complete"
    }
    assert completes["right"]["status"] == "failed"
    assert completes["right"]["error"] == "ValueError: right exploded"
    assert completes["left"]["status"] == "completed"
    # Prefect fires no hook for a step whose upstream failed; the engine watch sees its state.
    assert completes["finish"]["status"] == "skipped"
    assert completes["finish"]["reason"] == "upstream step 'right' failed"
    done = events[-1]["payload"]
    assert done["status"] == "failed"
    assert done["failedSteps"] == ["right"]
    assert done["error"]  # the flow's own exception: finish never ran, so its result is missing
    assert done["steps"] == {
        "completed": 2,
        "failed": 1,
        "skipped": 1,
        "cancelled": 0,
        "crashed": 0,
    }


def test_tasks_in_a_process_pool_stream_their_states_and_logs(
    prefect_api: str, redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool's workers receive each task pickled by value, import none of the modules that
    decorated it and run no flow: the task's hook installs the engine watch on arrival, the
    watch reports the states and installs the log handler."""
    from prefect_ws.publish.publisher import reset_publisher

    monkeypatch.setenv("PREFECT_WS_BROADCAST_URL", redis_url)
    monkeypatch.setenv("PREFECT_WS_REDIS_PREFIX", redis_prefix)
    reset_publisher()
    state = process_pool_steps(return_state=True)
    assert state.is_completed()
    run_id = str(state.state_details.flow_run_id)
    events = redis_history(redis_url, redis_prefix, run_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "run_start" and events[-1]["type"] == "run_complete"
    by_step: dict[str, list[str]] = {}
    for event in events[1:-1]:
        step = event["payload"]["stepId"]
        by_step.setdefault(step, []).append(
            event["payload"].get("message") or event["payload"].get("status") or event["type"]
        )
    assert by_step == {
        f"pooled-{i}": ["step_start", f"pooled step {i} says hello", "completed"] for i in range(3)
    }, events
