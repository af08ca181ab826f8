"""Where a Prefect state becomes a lifecycle event: the one owner of run and step outcomes.

Two sources report states here: the engine watch (:mod:`.engine_watch`, every state a flow or
task run enters, in zero-code mode and whenever the decorators are used) and the public state
hooks (:mod:`.hooks`, a subset of the same states). Both may report the same transition; this
module decides once what it means for the stream:

- a flow run's first ``Running`` is ``run_start`` (``attempt`` 1); a later ``Running`` after a
  retry state is ``run_attempt`` with the new attempt number; a final state is ``run_complete``,
  once, after a ``step_complete`` for every step still open.
- a task run's ``Running`` is ``step_start`` once per attempt; ``Pending('NotReady')`` (its upstream
  did not complete) is ``step_complete`` ``skipped``; a final state is ``step_complete`` with
  ``completed``, ``failed``, ``crashed`` or ``cancelled``, once.
- a subflow run is also a step of its parent's run, with ``childRunId``.

Step ids follow one rule (:func:`step_id_of`): a task run's name when the user chose one, else the
task's name, ``name[index]`` for a mapped run, ``name#2``, ``name#3`` ... for later runs of a
name already used in the flow run.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from prefect_ws.protocol.events import FAILED_STATUSES, STEP_STATUSES
from prefect_ws.publish import ui_link
from prefect_ws.publish.publisher import get_publisher

_RUNS_KEPT: Final = 10_000  # runs whose end this process never saw are forgotten after this many
_RUN_STATUS: Final = {
    "COMPLETED": "completed",
    "FAILED": "failed",
    "CRASHED": "crashed",
    "CANCELLED": "cancelled",
}


@dataclass
class _Step:
    step_id: str
    task_run_id: str
    attempt: int = 0  # the last attempt announced with step_start
    started: float | None = None  # monotonic, at the last step_start
    status: str | None = None  # set once step_complete is published
    roots: tuple[str, ...] = ()  # for a skipped step: the failed steps that caused it
    child_run_id: str | None = None


@dataclass
class _Run:
    run_id: str
    started: float | None = None  # monotonic, at run_start
    attempt: int = 0
    running: bool = False
    retry_error: str | None = None
    finished: bool = False
    steps: dict[str, _Step] = field(default_factory=dict)  # task run id -> step
    names: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    failed_steps: list[str] = field(default_factory=list)
    parent: tuple[str, str] | None = None  # (parent flow run id, parent task run id)
    link: threading.Thread | None = None  # creating the Prefect UI's link to the live page


_lock = threading.Lock()
_runs: OrderedDict[str, _Run] = OrderedDict()
_map_index: Callable[[Any], int | None] = lambda task_run: None  # noqa: E731


def set_map_index_source(source: Callable[[Any], int | None]) -> None:
    """Where a mapped task run's index comes from (the engine watch knows it)."""
    global _map_index
    _map_index = source


def _run(run_id: str) -> _Run:
    run = _runs.get(run_id)
    if run is None:
        run = _runs[run_id] = _Run(run_id)
        if len(_runs) > _RUNS_KEPT:
            _runs.popitem(last=False)
    return run


def _unique(run: _Run, name: str) -> str:
    run.names[name] += 1
    count = run.names[name]
    return name if count == 1 else f"{name}#{count}"


def step_id_of(task_run: Any, run: _Run, map_index: int | None) -> str:
    """The step id rule (documented in docs/asyncapi.yaml): see the module docstring."""
    name = str(task_run.name)
    dynamic_key = str(getattr(task_run, "dynamic_key", "") or "")
    default_suffix = f"-{dynamic_key[:3]}"
    if dynamic_key and name.endswith(default_suffix):  # Prefect's "<task name>-<3 chars>"
        base = name[: -len(default_suffix)]
        if map_index is not None:
            return _unique(run, f"{base}[{map_index}]")
        return _unique(run, base)
    return _unique(run, name)


def step_id_for(run_id: str, task_run_id: str, fallback: str | None) -> str | None:
    """The step id a task run's log lines carry: the one its ``step_start`` announced.

    Called for every log line, without the lock: a dict read is atomic in CPython, and a line
    logged before its step was announced keeps Prefect's task run name.
    """
    run = _runs.get(run_id)
    step = run.steps.get(task_run_id) if run is not None else None
    return step.step_id if step is not None else fallback


def error_of(state: Any) -> str:
    """A one-line description of the exception behind a failed state."""
    try:
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, BaseException):
            return f"{type(exc).__name__}: {exc}"
    except BaseException:
        pass
    return str(getattr(state, "message", None) or getattr(state, "name", "failed"))


def _elapsed(started: float | None) -> float | None:
    return None if started is None else round(time.monotonic() - started, 6)


# -- task runs ------------------------------------------------------------------------------------
def task_state(task_run: Any, state: Any, layer: int | None = None) -> None:
    """A task run entered ``state`` (called in the task's thread; never raises)."""
    flow_run_id = getattr(task_run, "flow_run_id", None)
    if flow_run_id is None:
        return  # a task called outside any flow run has no stream
    kind = state.type.value
    if kind == "RUNNING":
        _step_running(str(flow_run_id), task_run, layer)
    elif kind == "PENDING" and state.name == "NotReady":
        _step_done(str(flow_run_id), task_run, "skipped", state)
    elif kind in _RUN_STATUS:
        _step_done(str(flow_run_id), task_run, _RUN_STATUS[kind], state)


def _step_running(run_id: str, task_run: Any, layer: int | None) -> None:
    attempt = max(1, int(getattr(task_run, "run_count", 1) or 1))
    task_run_id = str(task_run.id)
    map_index = _map_index(task_run)  # may wait for Task.map to return: never under the lock
    with _lock:
        run = _run(run_id)
        step = run.steps.get(task_run_id)
        if step is None:
            step = run.steps[task_run_id] = _Step(step_id_of(task_run, run, map_index), task_run_id)
        if step.status is not None or attempt <= step.attempt or run.finished:
            return  # a re-entered Running of an attempt already announced
        step.attempt, step.started = attempt, time.monotonic()
        payload = {
            "stepId": step.step_id,
            "taskRunId": task_run_id,
            "layer": layer,
            "attempt": attempt,
        }
        get_publisher().emit(run_id, "step_start", payload)


def _step_done(run_id: str, task_run: Any, status: str, state: Any) -> None:
    task_run_id = str(task_run.id)
    map_index = _map_index(task_run)
    with _lock:
        run = _run(run_id)
        if run.finished:
            return
        step = run.steps.get(task_run_id)
        if step is None:
            step = run.steps[task_run_id] = _Step(step_id_of(task_run, run, map_index), task_run_id)
        if step.status is not None:
            return
        payload: dict[str, Any] = {
            "stepId": step.step_id,
            "taskRunId": task_run_id,
            "status": status,
            "duration": _elapsed(step.started),
            "error": error_of(state) if status in ("failed", "crashed") else None,
        }
        if status == "skipped":
            step.roots = _failed_roots(run, str(getattr(state, "message", "") or ""))
            named = ", ".join(repr(root) for root in step.roots) or "an upstream step"
            plural = "s" if len(step.roots) > 1 else ""
            payload["reason"] = f"upstream step{plural} {named} failed"
        _record(run, step, status)
        get_publisher().emit(run_id, "step_complete", payload)


def _failed_roots(run: _Run, message: str) -> tuple[str, ...]:
    """The failed steps behind a NotReady state: Prefect names the upstream task run that did
    not complete ("Upstream task run '<id>' did not reach a 'COMPLETED' state.")."""
    for task_run_id, upstream in run.steps.items():
        if task_run_id in message:
            return upstream.roots if upstream.status == "skipped" else (upstream.step_id,)
    return ()


def _record(run: _Run, step: _Step, status: str) -> None:
    step.status = status
    run.counts[status] += 1
    if status in FAILED_STATUSES:
        run.failed_steps.append(step.step_id)


# -- flow runs ------------------------------------------------------------------------------------
def flow_state(
    flow: Any,
    flow_run: Any,
    state: Any,
    layers: Callable[[Any], list[list[str]] | None] | None = None,
    parent_run_id: str | None = None,
    client: Any = None,
) -> None:
    """A flow run entered ``state``; ``parent_run_id`` names the flow run a subflow runs in,
    ``client`` is the flow engine's blocking Prefect client, when known (see ui_link)."""
    kind = state.type.value
    if kind == "RUNNING":
        _run_running(flow, flow_run, layers, parent_run_id, client)
    elif kind in _RUN_STATUS:
        _run_done(flow_run, _RUN_STATUS[kind], state)
    elif kind == "SCHEDULED":  # AwaitingRetry: the next Running is a new attempt
        with _lock:
            run = _runs.get(str(flow_run.id))
            if run is not None and run.running:
                run.running = False
                run.retry_error = str(getattr(state, "message", None) or state.name)
    # Paused, then Running again, is a resumed attempt: nothing to announce.


def _run_running(
    flow: Any,
    flow_run: Any,
    layers: Callable[[Any], list[list[str]] | None] | None,
    parent_run_id: str | None,
    client: Any,
) -> None:
    run_id = str(flow_run.id)
    publisher = get_publisher()
    with _lock:
        run = _run(run_id)
        if run.running or run.finished:
            return
        run.running = True
        run.attempt += 1
        if run.attempt > 1:
            publisher.emit(
                run_id, "run_attempt", {"attempt": run.attempt, "previous": run.retry_error}
            )
            return
        run.started = time.monotonic()
        parent_task_run_id = getattr(flow_run, "parent_task_run_id", None)
        if parent_run_id and parent_task_run_id:
            run.parent = (parent_run_id, str(parent_task_run_id))
        described = None
        if layers is not None:
            try:
                described = layers(flow_run)
            except Exception:
                described = None
        payload = {
            "flowName": flow.name,
            "flowRunId": run_id,
            "flowRunName": flow_run.name,
            "parameters": dict(flow_run.parameters or {}),
            "layers": described,
            "attempt": 1,
        }
        if run.parent is not None:
            payload["parentRunId"] = run.parent[0]
        publisher.emit(run_id, "run_start", payload)
        run.link = ui_link.start_link(run_id, client)
        if run.parent is not None:
            parent = _run(run.parent[0])
            step = _Step(_unique(parent, flow.name), run.parent[1], attempt=1)
            step.started, step.child_run_id = time.monotonic(), run_id
            parent.steps[run.parent[1]] = step
            publisher.emit(
                parent.run_id,
                "step_start",
                {
                    "stepId": step.step_id,
                    "taskRunId": step.task_run_id,
                    "layer": None,
                    "attempt": 1,
                    "childRunId": run_id,
                },
            )


def _run_done(flow_run: Any, status: str, state: Any) -> None:
    run_id = str(flow_run.id)
    publisher = get_publisher()
    with _lock:
        run = _run(run_id)
        if run.finished:
            return
        run.finished = True
        open_status = "crashed" if status == "crashed" else "cancelled"
        for step in run.steps.values():
            if step.status is None:
                _record(run, step, open_status)
                publisher.emit(
                    run_id,
                    "step_complete",
                    {
                        "stepId": step.step_id,
                        "taskRunId": step.task_run_id,
                        "status": open_status,
                        "duration": _elapsed(step.started),
                        "error": None,
                        "reason": f"the flow run ended {status} while the step was running",
                    },
                )
        publisher.emit(
            run_id,
            "run_complete",
            {
                "status": status,
                "duration": _elapsed(run.started),
                "steps": {s: run.counts[s] for s in STEP_STATUSES},
                "failedSteps": list(run.failed_steps),
                "error": error_of(state) if status in ("failed", "crashed") else None,
                "attempts": max(1, run.attempt),
            },
        )
        if run.parent is not None:
            parent = _runs.get(run.parent[0])
            child = parent.steps.get(run.parent[1]) if parent is not None else None
            if parent is not None and child is not None and child.status is None:
                _record(parent, child, status)
                publisher.emit(
                    parent.run_id,
                    "step_complete",
                    {
                        "stepId": child.step_id,
                        "taskRunId": child.task_run_id,
                        "status": status,
                        "duration": _elapsed(child.started),
                        "error": error_of(state) if status in ("failed", "crashed") else None,
                        "childRunId": run_id,
                    },
                )
        _runs.pop(run_id, None)
        _runs[run_id] = _Run(run_id, finished=True)  # later reports of this run are ignored
    publisher.flush()
    if run.link is not None:
        run.link.join(ui_link.END_OF_RUN_WAIT)
