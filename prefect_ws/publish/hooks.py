"""The broadcast logger's lifecycle half: Prefect state hooks that emit run and step events.

Prefect has no global hooks, so these are attached per flow and per task: by the drop-in
decorators :func:`prefect_ws.flow` and :func:`prefect_ws.task`, or by hand from
:func:`flow_hooks` / :func:`task_hooks`. Each hook queues an event and returns; the only wait is
at the end of a flow run, which gives the publisher a bounded moment to send the run's last
events before the process may exit.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from prefect_ws.publish.log_handler import install_log_handler
from prefect_ws.publish.publisher import get_publisher

_lock = threading.Lock()
_started: dict[str, float] = {}  # flow or task run id -> monotonic start
_step_counts: dict[str, Counter[str]] = {}  # flow run id -> step status counts
_failed_steps: dict[str, list[str]] = {}  # flow run id -> ids of failed steps, in order


def _begin(key: str) -> None:
    with _lock:
        _started[key] = time.monotonic()


def _duration(key: str, fallback_start: Any = None) -> float | None:
    with _lock:
        started = _started.pop(key, None)
    if started is not None:
        return round(time.monotonic() - started, 6)
    if fallback_start is not None:
        try:
            return round(time.time() - fallback_start.timestamp(), 6)
        except Exception:
            return None
    return None


def _error_of(state: Any) -> str:
    """A one-line description of the exception behind a failed state."""
    try:
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, BaseException):
            return f"{type(exc).__name__}: {exc}"
    except Exception:
        pass
    return str(getattr(state, "message", None) or getattr(state, "name", "failed"))


# -- flow hooks ------------------------------------------------------------------------------
def prefect_ws_run_running(flow: Any, flow_run: Any, state: Any) -> None:
    install_log_handler()
    run_id = str(flow_run.id)
    _begin(run_id)
    with _lock:
        _step_counts[run_id] = Counter()
        _failed_steps[run_id] = []
    layers_of = getattr(flow, "prefect_ws_layers", None)
    get_publisher().emit(
        run_id,
        "run_start",
        {
            "flowName": flow.name,
            "flowRunId": run_id,
            "flowRunName": flow_run.name,
            "parameters": dict(flow_run.parameters or {}),
            "layers": layers_of(flow_run) if callable(layers_of) else None,
        },
    )


def _flow_finisher(status: str) -> Any:
    def hook(flow: Any, flow_run: Any, state: Any) -> None:
        run_id = str(flow_run.id)
        with _lock:
            counts = _step_counts.pop(run_id, Counter())
            failed_steps = _failed_steps.pop(run_id, [])
        publisher = get_publisher()
        publisher.emit(
            run_id,
            "run_complete",
            {
                "status": status,
                "duration": _duration(run_id, getattr(flow_run, "start_time", None)),
                "steps": {
                    s: counts.get(s, 0) for s in ("completed", "failed", "skipped", "cancelled")
                },
                "failedSteps": failed_steps,
                "error": _error_of(state) if status in {"failed", "crashed"} else None,
            },
        )
        publisher.flush()

    hook.__name__ = f"prefect_ws_run_{status}"
    return hook


# -- task hooks ------------------------------------------------------------------------------
def prefect_ws_step_running(task: Any, task_run: Any, state: Any) -> None:
    if task_run.flow_run_id is None:
        return  # a task called outside any flow run has no stream
    install_log_handler()
    task_run_id = str(task_run.id)
    _begin(task_run_id)
    get_publisher().emit(
        str(task_run.flow_run_id),
        "step_start",
        {
            "stepId": task_run.name,
            "taskRunId": task_run_id,
            "layer": getattr(task, "prefect_ws_layer", None),
            "attempt": max(1, int(getattr(task_run, "run_count", 1) or 1)),
        },
    )


def _task_finisher(status: str) -> Any:
    def hook(task: Any, task_run: Any, state: Any) -> None:
        if task_run.flow_run_id is None:
            return
        run_id = str(task_run.flow_run_id)
        task_run_id = str(task_run.id)
        with _lock:
            counts = _step_counts.get(run_id)
            if counts is not None:
                counts[status] += 1
            if status == "failed" and run_id in _failed_steps:
                _failed_steps[run_id].append(task_run.name)
        get_publisher().emit(
            run_id,
            "step_complete",
            {
                "stepId": task_run.name,
                "taskRunId": task_run_id,
                "status": status,
                "duration": _duration(task_run_id, getattr(task_run, "start_time", None)),
                "error": _error_of(state) if status == "failed" else None,
            },
        )

    hook.__name__ = f"prefect_ws_step_{status}"
    return hook


_on_run_completed = _flow_finisher("completed")
_on_run_failed = _flow_finisher("failed")
_on_run_cancelled = _flow_finisher("cancelled")
_on_run_crashed = _flow_finisher("crashed")
_on_step_completed = _task_finisher("completed")
_on_step_failed = _task_finisher("failed")


def flow_hooks() -> dict[str, list[Any]]:
    """Hook lists for ``@flow(**prefect_ws.flow_hooks())`` or ``flow.with_options(...)``."""
    return {
        "on_running": [prefect_ws_run_running],
        "on_completion": [_on_run_completed],
        "on_failure": [_on_run_failed],
        "on_cancellation": [_on_run_cancelled],
        "on_crashed": [_on_run_crashed],
    }


def task_hooks() -> dict[str, list[Any]]:
    """Hook lists for ``@task(**prefect_ws.task_hooks())`` or ``task.with_options(...)``."""
    return {
        "on_running": [prefect_ws_step_running],
        "on_completion": [_on_step_completed],
        "on_failure": [_on_step_failed],
    }


def record_step_outcome(run_id: str, status: str) -> None:
    """Count a step outcome decided outside Prefect's hooks (``skipped``) for ``run_complete``."""
    with _lock:
        counts = _step_counts.get(run_id)
        if counts is not None:
            counts[status] += 1
