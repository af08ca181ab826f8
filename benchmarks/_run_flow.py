"""Run one benchmark flow in this process: ``python _run_flow.py FLOW [RUN_ID|-] [JSON params]``.

Prints one JSON line: final state, result, the flow's wall time and the process' CPU time over
the same span (all threads; start-up and imports excluded), and with prefect-ws on the events
it published, in how many round trips (batches) and the publisher thread's CPU time. The
flow-run heartbeat is off: Prefect's heartbeat thread adds about 1 s to every sync run.
"""

from __future__ import annotations

import json
import os
import sys
import time
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
            }
        ),
        flush=True,
    )


def _publisher_stats() -> dict[str, float]:
    """Events prefect-ws published and in how many round trips (batches), if it ran at all."""
    publisher = sys.modules.get("prefect_ws.publish.publisher")
    running = getattr(publisher, "_publisher", None)
    if running is None:
        return {}
    # The batch counter is the publisher's idempotency key sequence: next() - 1 batches so far.
    stats = {"published": running.published, "batches": next(running._batches) - 1}
    thread = running._thread
    if thread is not None and thread.native_id is not None:
        stats["publisher_cpu_seconds"] = _thread_cpu_seconds(thread.native_id)
    return stats


def _thread_cpu_seconds(native_id: int) -> float:
    """CPU time (user + system) of one thread of this process so far, from /proc (Linux)."""
    try:
        with open(f"/proc/self/task/{native_id}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 3)


if __name__ == "__main__":
    main()
