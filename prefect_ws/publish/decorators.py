"""Drop-in ``flow`` and ``task`` decorators: Prefect's own, with prefect-ws hooks added.

They accept every Prefect argument and every decorator form (``@flow``, ``@flow()``,
``@flow(name=...)``, ``flow(fn, ...)``). Hooks the user passes run first; ours are appended,
never replacing them.

Both install the engine watch, which reports every task state on its own. A task therefore
carries our hook in ``on_failure`` alone (a pickled copy installs the watch in the process it
lands in; see :class:`~.hooks.StepHooks`), and in every list only where the watch cannot be
installed: in ``on_running`` and ``on_completion`` it would add nothing but Prefect's price for
running a hook, two log lines built and filtered per call, ~50 us per step in a 20-wide DAG
(docs/benchmarks.md, section 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import prefect

from prefect_ws.publish.hooks import flow_hooks, task_hooks

T = TypeVar("T")


def _with_hooks(kwargs: dict[str, Any], ours: dict[str, list[Any]]) -> dict[str, Any]:
    merged = dict(kwargs)
    for name, hooks in ours.items():
        theirs = list(merged.get(name) or [])
        merged[name] = [*theirs, *(h for h in hooks if h not in theirs)]
    return merged


def _decorator(
    prefect_decorator: Callable[..., Any], ours: Callable[[], dict[str, list[Any]]]
) -> Callable[..., Any]:
    def decorate(__fn: Any = None, /, **kwargs: Any) -> Any:
        kwargs = _with_hooks(kwargs, ours())
        if __fn is None:
            return lambda fn: prefect_decorator(fn, **kwargs)
        return prefect_decorator(__fn, **kwargs)

    return decorate


flow = _decorator(prefect.flow, flow_hooks)
flow.__doc__ = (
    "``prefect.flow`` that streams the run: ``run_start``, ``run_complete`` and its logs."
)


def _task_hooks_unless_watched() -> dict[str, list[Any]]:
    from prefect_ws.publish import engine_watch

    hooks = task_hooks()
    return {"on_failure": hooks["on_failure"]} if engine_watch.install() else hooks


task = _decorator(prefect.task, _task_hooks_unless_watched)
task.__doc__ = (
    "``prefect.task`` that streams the step: ``step_start``, ``step_complete`` and its logs."
)


def stream(obj: T) -> T:
    """Return a copy of an existing Prefect ``Flow`` or ``Task`` with prefect-ws hooks added."""
    from prefect import Flow, Task

    if isinstance(obj, Flow):
        current: dict[str, list[Any]] = {
            "on_running": obj.on_running_hooks,
            "on_completion": obj.on_completion_hooks,
            "on_failure": obj.on_failure_hooks,
            "on_cancellation": obj.on_cancellation_hooks,
            "on_crashed": obj.on_crashed_hooks,
        }
        return obj.with_options(**_with_hooks(current, flow_hooks()))  # type: ignore[return-value]
    if isinstance(obj, Task):
        task_current: dict[str, list[Any]] = {
            "on_running": obj.on_running_hooks,
            "on_completion": obj.on_completion_hooks,
            "on_failure": obj.on_failure_hooks,
        }
        ours = _task_hooks_unless_watched()
        return obj.with_options(**_with_hooks(task_current, ours))  # type: ignore[return-value]
    raise TypeError(f"stream() takes a Prefect Flow or Task, not {type(obj).__name__}")
