"""The lifecycle's decisions on sequences of real Prefect states that end-to-end runs rarely hit:
re-entered states, a pause, a run that ends with steps still open, reports after the end.

States and runs are Prefect's own objects; events go through the real publisher to the memory
backend and are read back from its history.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.states import Cancelled, Completed, Crashed, Paused, Pending, Running, Scheduled

from prefect_ws.backends import MemoryBackend
from prefect_ws.publish import lifecycle
from prefect_ws.publish.publisher import get_publisher, reset_publisher


class _Flow:
    name = "lifecycle-flow"


@pytest.fixture
def memory_url(monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"memory://lifecycle-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PREFECT_WS_BROADCAST_URL", url)
    reset_publisher()
    return url


def _history(url: str, run_id: str) -> list[dict[str, Any]]:
    assert get_publisher().flush(5)

    async def read() -> list[str]:
        return await MemoryBackend(url).history(run_id, 0, 1000)

    return [json.loads(text) for text in asyncio.run(read())]


def _flow_run() -> FlowRun:
    return FlowRun(id=uuid.uuid4(), name="calm-cat", flow_id=uuid.uuid4())


def _task_run(flow_run: FlowRun, name: str = "work", run_count: int = 1) -> TaskRun:
    key = uuid.uuid4().hex
    return TaskRun(
        id=uuid.uuid4(),
        name=f"{name}-{key[:3]}",
        flow_run_id=flow_run.id,
        task_key=name,
        dynamic_key=key,
        run_count=run_count,
    )


def _types(events: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(e["type"], e["payload"].get("status", e["payload"].get("attempt"))) for e in events]


def test_re_entered_states_publish_once_and_open_steps_end_with_the_run(memory_url: str) -> None:
    flow_run = _flow_run()
    lifecycle.flow_state(_Flow(), flow_run, Running())
    lifecycle.flow_state(_Flow(), flow_run, Running())  # re-entered: nothing new
    first, second = _task_run(flow_run), _task_run(flow_run)
    lifecycle.task_state(first, Running())
    lifecycle.task_state(first, Running())  # re-entered Running of attempt 1
    lifecycle.task_state(first, Completed())
    lifecycle.task_state(first, Completed(name="RolledBack"))  # after its end: ignored
    lifecycle.task_state(second, Pending())  # not started yet: nothing
    lifecycle.task_state(second, Running())
    lifecycle.flow_state(_Flow(), flow_run, Paused())
    lifecycle.flow_state(_Flow(), flow_run, Running())  # resumed: no new attempt
    lifecycle.flow_state(_Flow(), flow_run, Crashed(message="process killed"))
    lifecycle.task_state(second, Completed())  # after run_complete: ignored
    lifecycle.flow_state(_Flow(), flow_run, Cancelled())  # a second end: ignored

    events = _history(memory_url, str(flow_run.id))
    assert _types(events) == [
        ("run_start", 1),
        ("step_start", 1),
        ("step_complete", "completed"),
        ("step_start", 1),
        ("step_complete", "crashed"),
        ("run_complete", "crashed"),
    ]
    assert [e["payload"].get("stepId") for e in events[1:5]] == ["work", "work", "work#2", "work#2"]
    assert events[4]["payload"]["reason"] == "the flow run ended crashed while the step was running"
    assert events[-1]["payload"]["steps"] == {
        "completed": 1,
        "failed": 0,
        "skipped": 0,
        "cancelled": 0,
        "crashed": 1,
    }
    assert events[-1]["payload"]["failedSteps"] == ["work#2"]


def test_a_retry_is_one_attempt_more_and_a_task_retry_one_start_more(memory_url: str) -> None:
    flow_run = _flow_run()
    lifecycle.flow_state(_Flow(), flow_run, Running())
    task_run = _task_run(flow_run)
    lifecycle.task_state(task_run, Running())
    task_run.run_count = 2
    lifecycle.task_state(task_run, Running(name="Retrying"))
    lifecycle.task_state(task_run, Running(name="Retrying"))
    lifecycle.task_state(task_run, Completed())
    lifecycle.flow_state(_Flow(), flow_run, Scheduled(name="AwaitingRetry", message="retry 1/1"))
    lifecycle.flow_state(_Flow(), flow_run, Running())
    lifecycle.flow_state(_Flow(), flow_run, Completed())

    events = _history(memory_url, str(flow_run.id))
    assert _types(events) == [
        ("run_start", 1),
        ("step_start", 1),
        ("step_start", 2),
        ("step_complete", "completed"),
        ("run_attempt", 2),
        ("run_complete", "completed"),
    ]
    assert events[4]["payload"] == {"attempt": 2, "previous": "retry 1/1"}
    assert events[-1]["payload"]["attempts"] == 2


def test_a_task_outside_a_flow_run_is_not_streamed(memory_url: str) -> None:
    task_run = TaskRun(id=uuid.uuid4(), name="alone", task_key="alone", dynamic_key="x")
    lifecycle.task_state(task_run, Running())  # no flow run id: nothing, no error
    assert get_publisher().flush(5)
