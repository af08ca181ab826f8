"""The fence around Prefect's engine internals: fails loudly when Prefect changes what we wrap.

prefect_ws.publish.engine_watch wraps three points of Prefect 3.9's engines. If a Prefect upgrade
renames, re-signs or stops calling them, these tests name what changed before any stream loses
its end.
"""

from __future__ import annotations

import inspect

import prefect
import pytest
from helpers import python_output
from prefect import flow, task

from prefect_ws.publish import engine_watch, lifecycle


def test_the_internals_we_wrap_are_as_tested() -> None:
    assert prefect.__version__.startswith("3.9."), (
        f"engine_watch is tested with Prefect 3.9, this is {prefect.__version__}"
    )
    assert engine_watch.check() == []


def test_prefect_engines_still_call_what_we_wrap() -> None:
    """Every task state goes through the module-level event function; every accepted flow state
    through call_hooks. Read from Prefect's own source, so a refactor that stops calling them
    fails here."""
    from prefect import flow_engine, task_engine

    for engine in (task_engine.SyncTaskRunEngine, task_engine.AsyncTaskRunEngine):
        source = inspect.getsource(engine.set_state)
        assert "emit_task_run_state_change_event(" in source, engine.__name__
    for flow_engine_class in (flow_engine.FlowRunEngine, flow_engine.AsyncFlowRunEngine):
        source = inspect.getsource(flow_engine_class.set_state)
        assert "call_hooks(state)" in source, flow_engine_class.__name__
    creation = inspect.getsource(task_engine._create_task_run_locally)
    assert (
        'f"{task.name}-{dynamic_key[:3]}"' in creation
    )  # the default name the step id rule strips


def test_importing_prefect_ws_patches_nothing() -> None:
    """Prefect's engines are wrapped when a flow or task is decorated with prefect-ws, not when
    the package (or its workflow runner) is imported: a process that imports ``prefect_ws`` for
    a setting or ``create_app`` runs its plain Prefect flows untouched."""
    probe = (
        "import prefect_ws, prefect_ws.workflow\n"
        "from prefect import flow_engine, task_engine\n"
        "from prefect_ws.publish import engine_watch\n"
        "print(engine_watch.installed(),"
        " hasattr(task_engine.emit_task_run_state_change_event, '__prefect_ws_wraps__'),"
        " hasattr(flow_engine.FlowRunEngine.call_hooks, '__prefect_ws_wraps__'))\n"
        "from prefect_ws.workflow import workflow_flow\n"
        "print(engine_watch.installed())\n"
    )
    printed = python_output(probe)
    assert printed.split("\n")[:2] == ["False False False", "True"], printed


def test_install_wraps_once_and_keeps_the_originals() -> None:
    from prefect import flow_engine, task_engine
    from prefect.tasks import Task

    assert engine_watch.install() is True
    assert engine_watch.install() is True  # idempotent: one wrapper, not two
    emit = task_engine.emit_task_run_state_change_event
    original = emit.__prefect_ws_wraps__  # type: ignore[attr-defined]
    assert not hasattr(original, "__prefect_ws_wraps__")
    for engine in (flow_engine.FlowRunEngine, flow_engine.AsyncFlowRunEngine):
        assert hasattr(engine.call_hooks, "__prefect_ws_wraps__")
    assert hasattr(Task.map, "__prefect_ws_wraps__")


def test_changed_internals_are_reported_and_nothing_is_patched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect import task_engine

    def emit_task_run_state_change_event(task_run: object, state: object) -> None: ...

    monkeypatch.setattr(
        task_engine, "emit_task_run_state_change_event", emit_task_run_state_change_event
    )
    problems = engine_watch.check()
    assert problems == ["emit_task_run_state_change_event takes ('task_run', 'state')"]


def test_a_task_run_outside_a_flow_is_not_streamed(prefect_api: str) -> None:
    engine_watch.install()

    @task
    def alone() -> int:
        return 1

    assert alone() == 1  # no flow run: nothing to stream, nothing raised


def test_map_indexes_follow_the_order_of_the_futures(prefect_api: str) -> None:
    engine_watch.install()
    seen: dict[str, int | None] = {}

    @task
    def record(x: int) -> int:
        from prefect.context import TaskRunContext

        context = TaskRunContext.get()
        assert context is not None
        seen[str(x)] = engine_watch.map_index(context.task_run)
        return x

    @flow
    def mapping() -> list[int]:
        return record.map([10, 20, 30, 40]).result()

    assert mapping() == [10, 20, 30, 40]
    assert seen == {"10": 0, "20": 1, "30": 2, "40": 3}
    assert lifecycle.step_id_for("no-such-run", "x", "fallback") == "fallback"
