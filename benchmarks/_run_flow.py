"""Run one benchmark flow in this process: ``python _run_flow.py FLOW [RUN_ID|-] [JSON params]``.

Prints one JSON line: final state, result and the flow's wall time (process start-up and imports
excluded). The flow-run heartbeat is off (it adds ~1 s to every sync run; research/prefect.md §7).
"""

from __future__ import annotations

import json
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
        started = time.perf_counter()
        state = run_flow(flow, flow_run=flow_run, parameters=parameters, return_type="state")
        seconds = time.perf_counter() - started
    result = state.result(raise_on_failure=False) if state.is_completed() else None
    print(
        json.dumps({"state": state.type.value, "result": result, "seconds": round(seconds, 4)}),
        flush=True,
    )


if __name__ == "__main__":
    main()
