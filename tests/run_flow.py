"""Run a flow for an existing flow run: ``python run_flow.py module:flow RUN_ID [JSON]``.

Prints one JSON line with the final state type. Used to run flows in a separate process.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import sys
from uuid import UUID


def main() -> None:
    spec, run_id = sys.argv[1], sys.argv[2]
    parameters = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    module_name, flow_name = spec.split(":")
    flow = getattr(importlib.import_module(module_name), flow_name)

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.states import State

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(UUID(run_id))
        state = run_flow(flow, flow_run=flow_run, parameters=parameters, return_type="state")
        if inspect.iscoroutine(state):  # an async flow
            state = asyncio.run(state)
    assert isinstance(state, State), state
    result = state.result(raise_on_failure=False) if state.is_completed() else None
    print(json.dumps({"state": state.type.value, "result": result}), flush=True)


if __name__ == "__main__":
    main()
