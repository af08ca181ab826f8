"""The one place prefect-ws relies on Prefect's private engine internals (Prefect 3.9).

Prefect has no global hook and its public state hooks miss states a stream must end with: a task
that crashes or is cancelled (no task hook exists for either), a task skipped because its
upstream failed (``Pending('NotReady')``, no hook fires), and the retry states of a flow. Two
points in Prefect's engines see every state a run enters, in the run's own thread:

- ``prefect.task_engine.emit_task_run_state_change_event``: both task engines (sync and async)
  call this module-level name from ``set_state`` for every task run state, including Crashed,
  Cancelled and NotReady, right after the state is set.
- ``FlowRunEngine.call_hooks`` / ``AsyncFlowRunEngine.call_hooks``: both flow engines call it from
  ``set_state`` after every state the Prefect API accepted (``engine.flow``, ``engine.flow_run``).

We wrap those three, report the state to :mod:`.lifecycle`, then call Prefect's original. A
mapped task run's index comes from wrapping ``Task.map`` (public), which knows the order of the
futures it returns. :func:`check` verifies the internals are what we wrap; if not, nothing is
patched, a warning is logged once, and the public hooks of the decorators still stream the
states they see. tests/test_engine_watch.py fails when these internals change.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import threading
from typing import Any, Final

from prefect_ws.publish import lifecycle
from prefect_ws.publish.log_handler import install_log_handler

logger = logging.getLogger("prefect_ws.engine_watch")

TASK_EVENT_PARAMETERS: Final = ("task_run", "initial_state", "validated_state", "follows")
FLOW_ENGINES: Final = ("FlowRunEngine", "AsyncFlowRunEngine")
_MAP_WAIT_SECONDS: Final = 10.0

_install_lock = threading.Lock()
_installed: bool | None = None  # None: not tried yet


class _MapCall:
    """One ``Task.map`` call: the index of each task run it submitted, once it returned."""

    def __init__(self) -> None:
        self.returned = threading.Event()
        self.index: dict[str, int] = {}


_map_call: contextvars.ContextVar[_MapCall | None] = contextvars.ContextVar(
    "prefect_ws_map_call", default=None
)


def map_index(task_run: Any) -> int | None:
    """The index of a mapped task run, None for any other.

    The task runner copies the submitting context into the task's thread, so a task run made
    by ``Task.map`` sees that call here. Its thread may start before ``map`` returned the futures
    that give the order: it waits for that (the submitting loop only queues work, so this is
    short and cannot deadlock), bounded by ``_MAP_WAIT_SECONDS``.
    """
    call = _map_call.get()
    if call is None:
        return None
    call.returned.wait(_MAP_WAIT_SECONDS)
    return call.index.get(str(task_run.id))


def check() -> list[str]:
    """What differs from the internals this module wraps (empty: all as expected)."""
    problems: list[str] = []
    try:
        from prefect import flow_engine, task_engine
        from prefect.tasks import Task
    except ImportError as exc:
        return [f"cannot import Prefect's engines: {exc}"]
    emit = getattr(task_engine, "emit_task_run_state_change_event", None)
    if not callable(emit):
        problems.append("prefect.task_engine.emit_task_run_state_change_event is gone")
    else:
        names = tuple(inspect.signature(_original(emit)).parameters)
        if names != TASK_EVENT_PARAMETERS:
            problems.append(f"emit_task_run_state_change_event takes {names}")
    for name in FLOW_ENGINES:
        engine = getattr(flow_engine, name, None)
        call_hooks = getattr(engine, "call_hooks", None)
        if call_hooks is None:
            problems.append(f"prefect.flow_engine.{name}.call_hooks is gone")
            continue
        names = tuple(inspect.signature(_original(call_hooks)).parameters)
        if names != ("self", "state"):
            problems.append(f"{name}.call_hooks takes {names}")
        if inspect.iscoroutinefunction(_original(call_hooks)) != name.startswith("Async"):
            problems.append(f"{name}.call_hooks changed between sync and async")
    if not callable(getattr(Task, "map", None)):
        problems.append("prefect.tasks.Task.map is gone")
    return problems


def _original(fn: Any) -> Any:
    return getattr(fn, "__prefect_ws_wraps__", fn)


def installed() -> bool:
    return bool(_installed)


def install() -> bool:
    """Wrap Prefect's engines once per process; False (and one warning) if they changed."""
    global _installed
    if _installed is not None:
        return _installed
    with _install_lock:
        if _installed is not None:
            return _installed
        problems = check()
        if problems:
            logger.warning(
                "prefect-ws: Prefect's engine internals differ from the tested ones (%s); only "
                "the states Prefect's public hooks report will stream",
                "; ".join(problems),
            )
            _installed = False
            return False
        _wrap_task_events()
        _wrap_flow_engines()
        _wrap_task_map()
        lifecycle.set_map_index_source(map_index)
        _installed = True
        return True


def _task_layer() -> int | None:
    """The workflow layer the running task's prefect-ws hooks carry, if any."""
    from prefect.context import TaskRunContext

    from prefect_ws.publish.hooks import StepHooks

    context = TaskRunContext.get()
    task = getattr(context, "task", None)
    for hook in getattr(task, "on_running_hooks", None) or ():
        if isinstance(hook, StepHooks):
            return hook.layer
    return None


def _wrap_task_events() -> None:
    from prefect import task_engine

    original = task_engine.emit_task_run_state_change_event

    @functools.wraps(original)
    def emit_task_run_state_change_event(
        task_run: Any, initial_state: Any, validated_state: Any, follows: Any = None
    ) -> Any:
        try:
            layer = None
            if validated_state.type.value == "RUNNING":
                # A task's first state in a process that imported no decorated flow (a
                # process pool's worker, a plain flow with decorated tasks): its log lines
                # need the handler here. Idempotent, and Running is once per attempt.
                install_log_handler()
                layer = _task_layer()  # only step_start carries it
            lifecycle.task_state(task_run, validated_state, layer)
        except Exception:  # pragma: no cover - streaming must never break a task
            logger.exception("prefect-ws: could not stream a task run state")
        return original(
            task_run=task_run,
            initial_state=initial_state,
            validated_state=validated_state,
            follows=follows,
        )

    emit_task_run_state_change_event.__prefect_ws_wraps__ = original  # type: ignore[attr-defined]
    task_engine.emit_task_run_state_change_event = emit_task_run_state_change_event


def _report_flow_state(engine: Any, state: Any) -> None:
    try:
        from prefect.context import FlowRunContext

        from prefect_ws.publish.hooks import RunHooks

        state = state if state is not None else engine.state
        flow, flow_run = engine.flow, engine.flow_run
        if flow_run is None:
            return
        ours = next((h for h in flow.on_running_hooks if isinstance(h, RunHooks)), None)
        # A subflow's engine reports its first states while its parent's run context is current.
        context = FlowRunContext.get()
        parent = getattr(getattr(context, "flow_run", None), "id", None)
        lifecycle.flow_state(
            flow,
            flow_run,
            state,
            layers=ours.layers if ours is not None else None,
            parent_run_id=str(parent) if parent and parent != flow_run.id else None,
            client=_blocking_client(engine),
        )
    except Exception:  # pragma: no cover - streaming must never break a flow
        logger.exception("prefect-ws: could not stream a flow run state")


def _blocking_client(engine: Any) -> Any:
    """The sync flow engine's Prefect client (``FlowRunEngine.client``, set while it runs); None
    for the async engine, whose client belongs to its event loop."""
    from prefect.client.orchestration import SyncPrefectClient

    try:
        client = engine.client
    except Exception:  # not started, or no such property any more: the link makes its own
        return None
    return client if isinstance(client, SyncPrefectClient) else None


def _wrap_flow_engines() -> None:
    from prefect import flow_engine

    sync_call_hooks = flow_engine.FlowRunEngine.call_hooks

    @functools.wraps(sync_call_hooks)
    def call_hooks(self: Any, state: Any = None) -> None:
        _report_flow_state(self, state)
        sync_call_hooks(self, state)

    async_call_hooks = flow_engine.AsyncFlowRunEngine.call_hooks

    @functools.wraps(async_call_hooks)
    async def async_call_hooks_wrapper(self: Any, state: Any = None) -> None:
        _report_flow_state(self, state)
        await async_call_hooks(self, state)

    call_hooks.__prefect_ws_wraps__ = sync_call_hooks  # type: ignore[attr-defined]
    async_call_hooks_wrapper.__prefect_ws_wraps__ = async_call_hooks  # type: ignore[attr-defined]
    flow_engine.FlowRunEngine.call_hooks = call_hooks  # type: ignore[method-assign]
    flow_engine.AsyncFlowRunEngine.call_hooks = async_call_hooks_wrapper  # type: ignore[method-assign]


def _wrap_task_map() -> None:
    from prefect.tasks import Task

    original = Task.map

    @functools.wraps(original)
    def map(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = _MapCall()
        token = _map_call.set(call)
        try:
            result = original(self, *args, **kwargs)
            for index, item in enumerate(result or ()):
                task_run_id = getattr(item, "task_run_id", None)
                if task_run_id is None:  # return_state=True gives states
                    details = getattr(item, "state_details", None)
                    task_run_id = getattr(details, "task_run_id", None)
                if task_run_id is not None:
                    call.index[str(task_run_id)] = index
        finally:
            _map_call.reset(token)
            call.returned.set()  # also after a failed map: release the runs it started
        return result

    map.__prefect_ws_wraps__ = original  # type: ignore[attr-defined]
    Task.map = map  # type: ignore[method-assign]
