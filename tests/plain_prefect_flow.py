"""A flow that knows nothing of prefect-ws (zero-code mode streams its logs via the plugin)."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger, task
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings


@task(task_run_name="plain-step", log_prints=True)
def plain_step() -> int:
    get_run_logger().info("plain step logs")
    print("plain step prints")
    return 1


@flow(name="plain-flow")
def plain_flow() -> str:
    from prefect.runtime import flow_run

    get_run_logger().warning("plain flow warns")
    plain_step()
    return str(flow_run.id)


if __name__ == "__main__":
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        print(json.dumps({"run_id": plain_flow()}), flush=True)
