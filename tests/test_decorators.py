"""prefect_ws.flow / prefect_ws.task: Prefect's decorators with our hooks added, never replacing."""

from __future__ import annotations

import asyncio
import json
import pickle

import cloudpickle
import prefect
import pytest
import sample_flows
from prefect import get_run_logger

import prefect_ws
from prefect_ws.backends import MemoryBackend
from prefect_ws.publish.hooks import RunHooks, StepHooks
from prefect_ws.publish.publisher import reset_publisher
from prefect_ws.workflow import workflow_flow
from prefect_ws.workflow.model import Step
from prefect_ws.workflow.runner import step_task


def test_every_decorator_form_returns_prefect_objects_with_our_hooks() -> None:
    def user_hook(*args: object) -> None: ...

    @prefect_ws.flow
    def bare() -> None: ...

    @prefect_ws.flow()
    def called() -> None: ...

    @prefect_ws.flow(name="named", retries=2, log_prints=True, on_completion=[user_hook])
    def named() -> None: ...

    direct = prefect_ws.flow(lambda: None, name="direct")

    for flow in (bare, called, named, direct):
        assert isinstance(flow, prefect.Flow)
        assert flow.on_running_hooks == [RunHooks()]
        for hooks in (
            flow.on_completion_hooks,
            flow.on_failure_hooks,
            flow.on_crashed_hooks,
            flow.on_cancellation_hooks,
        ):
            assert hooks[-1] == RunHooks() and hooks[-1].__name__.startswith("prefect_ws_")
    assert named.name == "named" and named.retries == 2 and named.log_prints is True
    assert named.on_completion_hooks[0] is user_hook  # the user's hook stays, and runs first

    @prefect_ws.task(retries=3, task_run_name="step-{x}", on_failure=[user_hook])
    def step(x: int) -> int:
        return x

    assert isinstance(step, prefect.Task)
    assert step.retries == 3
    # The engine watch reports every task state; our hook rides along in on_failure alone.
    assert step.on_failure_hooks == [user_hook, *prefect_ws.task_hooks()["on_failure"]]
    assert step.on_running_hooks == [] and step.on_completion_hooks == []


def test_where_the_engine_watch_cannot_be_installed_tasks_carry_our_hooks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect_ws.publish import engine_watch

    monkeypatch.setattr(engine_watch, "install", lambda: False)

    def user_hook(task: object, task_run: object, state: object) -> None: ...

    @prefect_ws.task(on_failure=[user_hook])
    def step() -> None: ...

    assert step.on_failure_hooks == [user_hook, *prefect_ws.task_hooks()["on_failure"]]
    assert step.on_running_hooks == prefect_ws.task_hooks()["on_running"]

    @prefect.task
    def plain_task() -> None: ...

    assert prefect_ws.stream(plain_task).on_running_hooks == prefect_ws.task_hooks()["on_running"]


def test_decorated_flows_and_tasks_survive_pickle_and_cloudpickle() -> None:
    """flow.serve() and workers pickle the flow: our hooks must not reach a lock or a closure."""
    # A decorated function's module attribute is the Flow, not the function: only cloudpickle
    # (what Prefect uses) can copy such a flow; plain pickle copies anything defined by reference.
    for obj in (sample_flows.four_steps, sample_flows.prepare, workflow_flow):
        copy = cloudpickle.loads(cloudpickle.dumps(obj))
        assert copy.name == obj.name
        assert copy.on_running_hooks == obj.on_running_hooks
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        copied = loads(dumps(workflow_flow))
        layers = next(h for h in copied.on_running_hooks if isinstance(h, RunHooks)).layers
        assert layers is not None and layers.__name__ == "_layers_of"
        step = loads(dumps(step_task(Step(id="s", run="m:f"), 3)))
        assert step.on_running_hooks == [StepHooks(3)]
        assert loads(dumps(prefect_ws.flow_hooks())) == prefect_ws.flow_hooks()


def test_hook_factories_take_what_the_stream_needs() -> None:
    def describe(flow_run: object) -> list[list[str]]:
        return [["a"]]

    assert prefect_ws.flow_hooks(layers=describe)["on_running"] == [RunHooks(describe)]
    assert prefect_ws.task_hooks(layer=2)["on_failure"] == [StepHooks(2)]
    assert StepHooks(2) != StepHooks(1)


def test_hook_lists_for_wiring_by_hand() -> None:
    assert set(prefect_ws.flow_hooks()) == {
        "on_running",
        "on_completion",
        "on_failure",
        "on_cancellation",
        "on_crashed",
    }
    assert set(prefect_ws.task_hooks()) == {"on_running", "on_completion", "on_failure"}


def test_stream_adds_hooks_to_existing_objects_without_duplicates() -> None:
    def user_hook(flow: object, flow_run: object, state: object) -> None: ...

    @prefect.flow(on_completion=[user_hook])
    def plain() -> None: ...

    streamed = prefect_ws.stream(plain)
    assert streamed.on_completion_hooks[0] is user_hook
    assert len(prefect_ws.stream(streamed).on_completion_hooks) == 2  # idempotent
    assert plain.on_running_hooks == []  # the original is left alone

    @prefect.task
    def plain_task() -> None: ...

    streamed_task = prefect_ws.stream(plain_task)
    assert streamed_task.on_running_hooks == []  # the engine watch reports its states
    assert streamed_task.on_failure_hooks == prefect_ws.task_hooks()["on_failure"]
    with pytest.raises(TypeError, match="Prefect Flow or Task"):
        prefect_ws.stream(print)


def test_user_hooks_and_stream_both_run(prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "memory://decorators"
    monkeypatch.setenv("PREFECT_WS_BROADCAST_URL", url)
    reset_publisher()
    calls: list[str] = []

    def user_flow_hook(flow: object, flow_run: object, state: object) -> None:
        calls.append("flow completed")

    def user_task_hook(task: object, task_run: object, state: object) -> None:
        calls.append("task completed")

    @prefect_ws.task(task_run_name="only-step", on_completion=[user_task_hook])
    def only_step() -> int:
        get_run_logger().info("inside the step")
        return 7

    @prefect_ws.flow(on_completion=[user_flow_hook])
    def hooked() -> tuple[int, str]:
        from prefect.runtime import flow_run

        return only_step(), flow_run.id

    value, run_id = hooked()
    assert value == 7
    assert calls == ["task completed", "flow completed"]

    async def history() -> list[str]:
        backend = MemoryBackend(url)
        return await backend.history(run_id, 0, 100)

    events = [json.loads(t) for t in asyncio.run(history())]
    assert [e["type"] for e in events] == [
        "run_start",
        "step_start",
        "step_log",
        "step_complete",
        "run_complete",
    ]
    assert events[2]["payload"]["message"] == "inside the step"
