"""Run one benchmark flow in this process: ``python _run_flow.py FLOW [RUN_ID|-] [JSON params]``.

Prints one JSON line: final state, result, the flow's wall time and the process' CPU time over
the same span (all threads; start-up and imports excluded), and with prefect-ws on the events
it published, in how many round trips (batches) and the publisher thread's CPU time. The
flow-run heartbeat is off: Prefect's heartbeat thread adds about 1 s to every sync run.

``BENCH_ATTRIBUTE=1`` also reports ``entry_cpu_seconds`` (and ``entry_cpu_by_name``): the CPU
time every thread spent inside prefect-ws' entry points (the engine watch's calls into the
lifecycle, the hooks and Prefect's ``call_hooks`` that runs them, the log handler, the UI link
thread). With the publisher thread's it is what prefect-ws' own code costs the run, free of the
run-to-run spread that an on/off difference of two processes carries; what it cannot see is the
cost to Prefect's own threads of sharing the GIL. Its clock reads add ~1 us per entry.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from typing import Any
from uuid import UUID


def main() -> None:
    name = sys.argv[1]
    run_id = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    parameters = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    import _flows
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    flow = getattr(_flows, name)
    account = _Account() if os.environ.get("BENCH_ATTRIBUTE") == "1" else None
    if account is not None:
        account.install()
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        flow_run = None
        if run_id:
            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(UUID(run_id))
        started, cpu_started = time.perf_counter(), time.process_time()
        state = run_flow(flow, flow_run=flow_run, parameters=parameters, return_type="state")
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
    result = state.result(raise_on_failure=False) if state.is_completed() else None
    print(
        json.dumps(
            {
                "state": state.type.value,
                "result": result,
                "seconds": round(seconds, 4),
                "cpu_seconds": round(cpu_seconds, 4),
                **_publisher_stats(),
                **(account.report() if account is not None else {}),
            }
        ),
        flush=True,
    )


class _Account:
    """CPU time spent inside prefect-ws' entry points, on whichever thread enters them.

    A call made from inside another accounted call (a hook calling the lifecycle, the
    lifecycle calling ``emit``) is counted once, in the outermost.
    """

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self._inside = threading.local()
        self._lock = threading.Lock()

    def install(self) -> None:
        from prefect import task_engine

        from prefect_ws.publish import engine_watch, hooks, lifecycle, ui_link
        from prefect_ws.publish.log_handler import PrefectWsHandler

        for owner, name in (
            (lifecycle, "task_state"),
            (lifecycle, "flow_state"),
            (engine_watch, "_task_layer"),
            (hooks.StepHooks, "__call__"),
            (hooks.RunHooks, "__call__"),
            # Prefect's hook runner: with prefect-ws' hooks it builds and filters two log
            # records per hook; without hooks it returns in ~1 us (bench_overhead's hooks part).
            (task_engine.SyncTaskRunEngine, "call_hooks"),
            (PrefectWsHandler, "handle"),
            (ui_link, "_create_with"),
        ):
            setattr(owner, name, self._timed(name, getattr(owner, name)))

    def _timed(self, name: str, fn: Any) -> Any:
        inside = self._inside
        self.ns[name] = 0

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(inside, "active", False):
                return fn(*args, **kwargs)
            inside.active = True
            started = time.thread_time_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.thread_time_ns() - started
                inside.active = False
                with self._lock:
                    self.ns[name] += spent

        return timed

    def report(self) -> dict[str, Any]:
        return {
            "entry_cpu_seconds": round(sum(self.ns.values()) / 1e9, 4),
            "entry_cpu_by_name": {name: round(ns / 1e9, 4) for name, ns in self.ns.items()},
        }


def _publisher_stats() -> dict[str, float]:
    """Events prefect-ws published and in how many round trips (batches), if it ran at all."""
    publisher = sys.modules.get("prefect_ws.publish.publisher")
    running = getattr(publisher, "_publisher", None)
    if running is None:
        return {}
    # The batch counter is the publisher's idempotency key sequence: next() - 1 batches so far.
    stats = {"published": running.published, "batches": next(running._batches) - 1}
    thread = running._thread
    if thread is not None and thread.ident is not None:
        # The thread's own CPU clock (ns), not /proc's 10 ms ticks.
        clock = time.pthread_getcpuclockid(thread.ident)
        stats["publisher_cpu_seconds"] = round(time.clock_gettime(clock), 4)
    return stats


if __name__ == "__main__":
    main()
