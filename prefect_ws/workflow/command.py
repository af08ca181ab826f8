"""``prefect-ws run WORKFLOW_FILE``: validate, announce the run, run it, exit with its outcome.

Exit codes: 0 the run completed, 1 it did not (failed, crashed, cancelled), 2 the workflow or a
parameter is invalid (nothing ran, no flow run was created). With the embedded ``memory://``
backend the events exist only in this process, so the command serves the stream itself for as
long as the run lasts; with ``redis://`` any ``prefect-ws serve`` replica serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from prefect_ws.settings import Settings
from prefect_ws.workflow.loader import load_workflow, parse_param_assignments
from prefect_ws.workflow.model import WorkflowError

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def _error(message: str) -> None:
    for line in message.splitlines():
        typer.secho(f"prefect-ws: {line}", err=True, fg="red")


@contextlib.contextmanager
def _stream_base(settings: Settings, url: str | None) -> Iterator[str]:
    """The base URL clients use; serves the stream here when nothing else can (memory://)."""
    if url:
        yield url.rstrip("/")
        return
    if settings.broadcast_url.startswith("memory://"):
        from prefect_ws.server.uvicorn.config import serve_in_thread

        quiet = settings.model_copy(update={"log_level": "WARNING"})
        with serve_in_thread(quiet, host=settings.host) as base:
            typer.echo(f"serving the stream from this process while the run lasts: {base}")
            yield base
        return
    yield (settings.public_url or f"ws://{settings.host}:{settings.port}").rstrip("/")


def run_command(
    path: Path, assignments: list[str], url: str | None, watch: bool, settings: Settings
) -> int:
    """The body of ``prefect-ws run``; returns the exit code."""
    try:
        workflow = load_workflow(path)
        overrides = parse_param_assignments(assignments, workflow)
    except WorkflowError as exc:
        _error(str(exc))
        return EXIT_INVALID
    except ValueError as exc:
        _error(str(exc))
        return EXIT_INVALID

    from prefect_ws.clients.follow import follow, stream_url
    from prefect_ws.workflow.runner import run_workflow

    watcher: threading.Thread | None = None
    if watch:
        _quiet_prefect_console()
    with _stream_base(settings, url) as base:

        def announce(run_id: str, flow_run_name: str) -> None:
            nonlocal watcher
            typer.echo(f"workflow: {workflow.title} ({len(workflow.steps)} steps)")
            typer.echo(f"flow run: {flow_run_name}")
            typer.echo(f"run id: {run_id}")
            typer.echo(f"stream: {stream_url(base, run_id)}", color=False)
            if watch:
                watcher = threading.Thread(
                    target=asyncio.run, args=(_watch(follow(base, run_id, wait=120)),), daemon=True
                )
                watcher.start()

        try:
            result = run_workflow(
                workflow, overrides, base_dir=path.resolve().parent, on_start=announce
            )
        except KeyboardInterrupt:
            _error("interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:  # e.g. the Prefect API is unreachable: one line, no traceback
            _error(f"could not run {path}: {type(exc).__name__}: {str(exc)[:500]}")
            return EXIT_FAILED
        if watcher is not None:
            watcher.join(timeout=30)
    if result.ok:
        typer.secho(f"run completed: {result.run_id}", fg="green")
        return EXIT_OK
    typer.secho(f"run {result.status}: {result.error}", err=True, fg="red")
    return EXIT_FAILED


async def _watch(events: Any) -> None:
    from rich.console import Console

    from prefect_ws.clients.console import render_event

    console = Console(highlight=False, soft_wrap=True)
    with contextlib.suppress(Exception):
        async for event in events:
            console.print(render_event(event))


def _quiet_prefect_console() -> None:
    """When the stream is printed, Prefect's console handler would print every line twice."""
    import logging

    import prefect.main  # noqa: F401  (configures logging)
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.ERROR)
