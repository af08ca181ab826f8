"""Flows the benchmarks run in their own processes (see ``_run_flow.py``).

``BENCH_STREAMING=off`` builds the same flows with Prefect's plain decorators: the "without
prefect-ws" side of every comparison; ``noop-hooks`` adds hooks that do nothing, to separate
what Prefect charges for running hooks from what prefect-ws' own code costs.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any

import prefect
from prefect import get_run_logger

import prefect_ws

MODE = os.environ.get("BENCH_STREAMING", "on")


def _noop_hook(*args: object) -> None:
    """Does nothing: what Prefect itself charges for running a hook (it logs two lines each)."""


def _with_noop_hooks(decorator: Any, names: tuple[str, ...]) -> Any:
    def decorate(fn: Any = None, /, **kwargs: Any) -> Any:
        kwargs.update({name: [_noop_hook] for name in names})
        return decorator(fn, **kwargs) if fn is not None else lambda f: decorator(f, **kwargs)

    return decorate


if MODE == "on":
    flow, task = prefect_ws.flow, prefect_ws.task
elif MODE == "noop-hooks":  # Prefect's hook machinery alone, no prefect-ws code at all
    flow = _with_noop_hooks(prefect.flow, ("on_running", "on_completion", "on_failure"))
    task = _with_noop_hooks(prefect.task, ("on_running", "on_completion", "on_failure"))
else:
    flow, task = prefect.flow, prefect.task


@task(task_run_name="emit-logs")
def emit_logs(lines: int, rate: float) -> int:
    """``lines`` log lines at ``rate`` per second, each carrying ``time.time_ns()`` at the call."""
    logger = get_run_logger()
    started = time.perf_counter()
    for index in range(lines):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        logger.info("lat %d %d", index, time.time_ns())
    return lines


@flow(name="bench-latency")
def latency_flow(lines: int = 500, rate: float = 100.0) -> int:
    return emit_logs(lines, rate)


@task
def dag_step(index: int, lines: int) -> int:
    logger = get_run_logger()
    for line in range(lines):
        logger.info("step %d line %d", index, line)
    return index


@flow(name="bench-dag")
def dag_flow(steps: int = 200, lines: int = 10, width: int = 20) -> int:
    """``steps`` tasks in layers of ``width``; each layer waits for the previous one."""
    previous: list[prefect.futures.PrefectFuture[int]] = []
    done = 0
    for start in range(0, steps, width):
        layer = [
            dag_step.with_options(task_run_name=f"step-{i}").submit(i, lines, wait_for=previous)
            for i in range(start, min(steps, start + width))
        ]
        done += sum(future.result() for future in layer)
        previous = layer
    return done


@task(task_run_name="log-calls")
def log_calls(blocks: int, per_block: int) -> dict[str, float]:
    """Per-call cost of ``logger.info`` on the task thread, with our handler attached and not.

    Blocks alternate between the two, so drift and noise hit both sides alike.
    """
    from prefect_ws.publish.log_handler import PrefectWsHandler

    logger = get_run_logger()
    run_logger = logging.getLogger("prefect.task_runs")
    ours = [h for h in run_logger.handlers if isinstance(h, PrefectWsHandler)]
    with_us: list[float] = []
    without: list[float] = []
    for block in range(blocks):
        attached = block % 2 == 0
        for handler in ours:
            if attached:
                run_logger.addHandler(handler)
            else:
                run_logger.removeHandler(handler)
        started = time.perf_counter_ns()
        for index in range(per_block):
            logger.info("call %d of the benchmark, some text to format", index)
        per_call_us = (time.perf_counter_ns() - started) / per_block / 1000
        (with_us if attached else without).append(per_call_us)
    for handler in ours:
        run_logger.addHandler(handler)
    # Our handler alone, on a record exactly as get_run_logger() makes it: the noise-free number.
    handler_us = None
    if ours:
        message, kwargs = logger.process("call %d of the benchmark, some text to format", {})
        record = run_logger.makeRecord(
            run_logger.name, logging.INFO, __file__, 1, message, (1,), None, extra=kwargs["extra"]
        )
        samples = []
        for _ in range(blocks):
            started = time.perf_counter_ns()
            for _ in range(per_block):
                ours[0].handle(record)
            samples.append((time.perf_counter_ns() - started) / per_block / 1000)
        handler_us = statistics.median(samples)
    return {
        "handler_attached": bool(ours),
        "handler_us": handler_us,
        "with_us": statistics.median(with_us),
        "without_us": statistics.median(without),
        "added_us": statistics.median(with_us) - statistics.median(without),
    }


@flow(name="bench-log-calls")
def log_call_flow(blocks: int = 20, per_block: int = 2000) -> dict[str, float]:
    return log_calls(blocks, per_block)


def _hook_probe_tasks() -> dict[str, Any]:
    """The same no-op task with no hooks, with prefect-ws' hooks, and with no-op hooks."""

    def step() -> None:
        """A task body; never called."""

    return {
        "none": prefect.task(step, name="probe-none"),
        "ours": prefect_ws.task(step, name="probe-ours"),
        "noop": prefect.task(
            step,
            name="probe-noop",
            on_running=[_noop_hook],
            on_completion=[_noop_hook],
            on_failure=[_noop_hook],
        ),
    }


@task(task_run_name="hook-cost")
def hook_cost(calls: int, blocks: int) -> dict[str, float]:
    """CPU us per task run that Prefect's ``call_hooks`` costs: on_running + on_completion.

    Drives Prefect 3.9's own ``SyncTaskRunEngine.call_hooks`` (benchmark code only: it sets the
    engine's ``task_run`` and ``logger`` by hand) on this task's real run and run logger, so the
    hook log lines go through the real handlers (console, API, ours, our filter). Time is this
    thread's CPU time (``time.thread_time``), min over ``blocks``: other threads and other
    processes on the box do not count.
    """
    from prefect.context import TaskRunContext
    from prefect.states import Completed, Running
    from prefect.task_engine import SyncTaskRunEngine

    context = TaskRunContext.get()
    assert context is not None
    running, completed = Running(), Completed()
    results: dict[str, float] = {}
    for label, probe in _hook_probe_tasks().items():
        engine = SyncTaskRunEngine(task=probe)
        engine.task_run = context.task_run
        engine.logger = get_run_logger()  # type: ignore[assignment]
        samples = []
        for _ in range(blocks):
            started = time.thread_time_ns()
            for _ in range(calls):
                engine.call_hooks(running)
                engine.call_hooks(completed)
            samples.append((time.thread_time_ns() - started) / calls / 1000)
        results[f"{label}_us"] = round(min(samples), 1)
    return results


@flow(name="bench-hook-cost")
def hook_cost_flow(calls: int = 300, blocks: int = 5) -> dict[str, float]:
    return hook_cost(calls, blocks)
