"""``prefect-ws demo``: a diamond workflow streamed live to a terminal client, in one process.

The diamond (extract -> transform_sum, transform_max in parallel -> load) ships inside the package
(``prefect_ws/workflow/examples``) and runs through the workflow runner, exactly as
``prefect-ws run`` would run it. The server runs in a background thread on the embedded
``memory://`` backend, Prefect runs the flow on its ephemeral server, and a WebSocket client
prints every event as it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any


def run_demo(keep_serving: bool = False) -> int:
    """Run the demo; return the process exit code (0 when the run completed)."""
    from rich.console import Console

    from prefect_ws.clients.console import render_event
    from prefect_ws.clients.follow import follow, stream_url
    from prefect_ws.server.uvicorn.config import serve_in_thread
    from prefect_ws.settings import Settings
    from prefect_ws.workflow.examples import DIAMOND
    from prefect_ws.workflow.runner import run_workflow

    # Prefect's ephemeral server is a child process: it reads this from the environment.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    console = Console(highlight=False, soft_wrap=True)
    settings = Settings(broadcast_url="memory://", log_level="WARNING")
    _quiet_prefect_console()
    final: dict[str, Any] = {}

    with serve_in_thread(settings) as base_url:
        console.print(f"[bold]prefect-ws[/] serving on {base_url} (memory:// backend)")
        console.print(
            "Starting Prefect (its ephemeral server takes a few seconds the first time)..."
        )
        watcher: threading.Thread | None = None

        def announce(run_id: str, flow_run_name: str) -> None:
            nonlocal watcher
            console.print(f"run id: [bold]{run_id}[/]\nstream: {stream_url(base_url, run_id)}\n")

            async def watch() -> None:
                async for event in follow(base_url, run_id, wait=120):
                    console.print(render_event(event))
                    if event["type"] == "run_complete":
                        final.update(event["payload"])

            watcher = threading.Thread(target=asyncio.run, args=(watch(),), daemon=True)
            watcher.start()

        result = run_workflow(DIAMOND, {"rows": 50}, on_start=announce)
        if watcher is not None:
            watcher.join(timeout=30)
        run_id = result.run_id
        console.print(f"\nReplay it: websocat '{stream_url(base_url, run_id)}'")
        console.print(f"Web page: {base_url.replace('ws://', 'http://', 1)}/runs/{run_id}")
        if not keep_serving:
            console.print("(this server stops now: `prefect-ws demo --keep-serving` keeps both up)")
        else:
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
