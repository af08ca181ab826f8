"""Prefect state hooks that stream a run: the public-API half of the flow-process side.

Prefect has no global hooks, so these are attached per flow and per task: by the drop-in
decorators :func:`prefect_ws.flow` and :func:`prefect_ws.task`, or by hand from
:func:`flow_hooks` / :func:`task_hooks`. A hook is an instance of a small module-level class, so a
flow that carries it survives pickle and cloudpickle (``flow.serve()``, workers). Each call only
reports the state to :mod:`.lifecycle`, which owns what it means; the engine watch
(:mod:`.engine_watch`) usually reported the same state a moment earlier, and lifecycle publishes
each transition once. A hook also carries what the stream needs from its caller: a step's
workflow ``layer``, or how to describe a run's ``layers``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect_ws.publish import lifecycle
from prefect_ws.publish.log_handler import install_log_handler

LayersOf = Callable[[Any], list[list[str]] | None]


class RunHooks:
    """One hook for every flow state list (``on_running``, ``on_completion``, ...)."""

    def __init__(self, layers: LayersOf | None = None) -> None:
        self.layers = layers
        self.__name__ = "prefect_ws_run_hook"  # Prefect logs hooks by name; our filter drops these

    def __call__(self, flow: Any, flow_run: Any, state: Any) -> None:
        install_log_handler()
        lifecycle.flow_state(flow, flow_run, state, layers=self.layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunHooks) and other.layers == self.layers

    def __hash__(self) -> int:
        return hash((RunHooks, self.layers))


class StepHooks:
    """One hook for every task state list (``on_running``, ``on_completion``, ``on_failure``).

    A task sent to another process by value (a process pool's worker receives it pickled, and
    imports none of the modules that decorated it) carries its hooks along: unpickled there, a
    hook installs the engine watch, before the task's first state.
    """

    def __init__(self, layer: int | None = None) -> None:
        self.layer = layer
        self.__name__ = "prefect_ws_step_hook"

    def __call__(self, task: Any, task_run: Any, state: Any) -> None:
        install_log_handler()
        lifecycle.task_state(task_run, state, self.layer)

    def __setstate__(self, state: dict[str, Any]) -> None:
        from prefect_ws.publish import engine_watch

        self.__dict__.update(state)
        engine_watch.install()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepHooks) and other.layer == self.layer

    def __hash__(self) -> int:
        return hash((StepHooks, self.layer))


FLOW_HOOK_LISTS = ("on_running", "on_completion", "on_failure", "on_cancellation", "on_crashed")
TASK_HOOK_LISTS = ("on_running", "on_completion", "on_failure")


def flow_hooks(layers: LayersOf | None = None) -> dict[str, Any]:
    """Hook lists for ``@flow(**prefect_ws.flow_hooks())`` or ``flow.with_options(...)``.

    ``layers(flow_run)``, when given, describes the run's workflow layers for ``run_start``.
    """
    from prefect_ws.publish import engine_watch

    engine_watch.install()
    hook = RunHooks(layers)
    return {name: [hook] for name in FLOW_HOOK_LISTS}


def task_hooks(layer: int | None = None) -> dict[str, Any]:
    """Hook lists for ``@task(**prefect_ws.task_hooks())`` or ``task.with_options(...)``;
    ``layer`` is the step's workflow layer, reported in ``step_start``."""
    from prefect_ws.publish import engine_watch

    engine_watch.install()
    hook = StepHooks(layer)
    return {name: [hook] for name in TASK_HOOK_LISTS}
