"""``prefect-ws demo``: a diamond-shaped flow streamed live to a terminal client, in one process.

The server runs in a background thread on the embedded ``memory://`` backend, Prefect runs the
flow on its ephemeral server, and a WebSocket client prints every event as it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from typing import Any

from prefect_ws.decorators import flow, task


@task(task_run_name="extract")
def extract(rows: int) -> list[int]:
    from prefect import get_run_logger

    logger = get_run_logger()
    logger.info("connecting to the source")
    time.sleep(0.4)
    data = [random.Random(i).randint(1, 100) for i in range(rows)]
    logger.info("extracted %d rows", len(data))
    return data


@task(task_run_name="transform_sum")
def transform_sum(data: list[int]) -> int:
    from prefect import get_run_logger

    logger = get_run_logger()
    logger.debug("summing")
    for part in range(3):
        time.sleep(0.3)
        logger.info("summed part %d of 3", part + 1)
    return sum(data)


@task(task_run_name="transform_max", log_prints=True)
def transform_max(data: list[int]) -> int:
    from prefect import get_run_logger

    time.sleep(0.5)
    print(f"largest value is {max(data)}")
    if max(data) > 90:
        get_run_logger().warning("outlier above 90 found; keeping it")
    time.sleep(0.4)
    return max(data)


@task(task_run_name="load")
def load(total: int, peak: int) -> str:
    from prefect import get_run_logger

    logger = get_run_logger()
    time.sleep(0.3)
    logger.info("loaded total=%d peak=%d", total, peak)
    return f"total={total} peak={peak}"


@flow(name="prefect-ws-demo", log_prints=True)
def diamond(rows: int = 50) -> str:
    """extract -> (transform_sum, transform_max in parallel) -> load."""
    data = extract.submit(rows)
    total = transform_sum.submit(data)
    peak = transform_max.submit(data)
    result = load.submit(total, peak).result()
    print(f"demo finished: {result}")
    return result


def run_demo(keep_serving: bool = False) -> int:
    """Run the demo; return the process exit code (0 when the run completed)."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from rich.console import Console

    from prefect_ws.client import follow, stream_url
    from prefect_ws.console import render_event
    from prefect_ws.server import serve_in_thread
    from prefect_ws.settings import Settings

    # Prefect's ephemeral server is a child process: it reads this from the environment.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    console = Console(highlight=False, soft_wrap=True)
    settings = Settings(broadcast_url="memory://", log_level="WARNING")
    _quiet_prefect_console()
    final: dict[str, Any] = {}

    with serve_in_thread(settings) as base_url:
        console.print(f"[bold]prefect-ws[/] serving on {base_url} (memory:// backend)")
        console.print("Starting Prefect (its ephemeral server takes a few seconds the first time)...")
        with get_client(sync_client=True) as client:
            flow_run = client.create_flow_run(diamond, parameters={"rows": 50})
        run_id = str(flow_run.id)
        console.print(f"run id: [bold]{run_id}[/]\nstream: {stream_url(base_url, run_id)}\n")

        async def watch() -> None:
            async for event in follow(base_url, run_id):
                console.print(render_event(event))
                if event["type"] == "run_complete":
                    final.update(event["payload"])

        watcher = threading.Thread(target=asyncio.run, args=(watch(),), daemon=True)
        watcher.start()
        run_flow(diamond, flow_run=flow_run, parameters={"rows": 50}, return_type="state")
        watcher.join(timeout=30)
        console.print(f"\nReplay it any time: websocat '{stream_url(base_url, run_id)}'")
        if keep_serving:
            console.print("Serving until Ctrl+C ...")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0 if final.get("status") == "completed" else 1


def _quiet_prefect_console() -> None:
    """The demo shows the stream; Prefect's console handler would print every line twice."""
    import prefect.main  # noqa: F401  (configures logging)
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.ERROR)
