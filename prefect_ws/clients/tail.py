"""``prefect-ws tail``: follow one run from a terminal, live, on the public stream.

Two outputs: a ``rich`` live view (steps grouped by layer with status, spinner and duration, a
progress bar of finished steps, and the log lines scrolling above it), or ``--json``: every event
on its own line, byte for byte as the server sent it, for ``jq``. Either way the stream resumes
with ``since`` after a drop, so no line is lost or printed twice, and the exit code says how the
run ended: scripts can ``prefect-ws tail $RUN && deploy``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TextIO

from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from prefect_ws.clients.console import STATUS_STYLES, render_event
from prefect_ws.clients.follow import StreamError, follow_messages
from prefect_ws.clients.tail_args import LEVELS
from prefect_ws.protocol.events import canonical_run_id

# Exit codes: a script can tell a failed run from a refused or unreachable stream.
EXIT_COMPLETED: Final = 0
EXIT_RUN_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_STREAM_ERROR: Final = 3
EXIT_INTERRUPTED: Final = 130


@dataclass(frozen=True)
class TailOptions:
    """Validated ``tail`` arguments."""

    base_url: str
    run_id: str
    since: int = 0
    types: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()
    level: str | None = None
    token: str | None = None
    json: bool = False
    wait: float | None = None


def wanted(event: dict[str, Any], options: TailOptions) -> bool:
    """The filters again, client side: a server that predates them streams everything.

    ``types`` and ``level`` apply as on the server; ``step`` applies to step events only.
    ``run_complete`` always passes: it carries the outcome.
    """
    kind = event.get("type")
    if kind == "run_complete":
        return True
    if options.types and kind not in options.types:
        return False
    payload = event.get("payload") or {}
    step_event = kind in ("step_start", "step_log", "step_complete")
    if options.steps and step_event and payload.get("stepId") not in options.steps:
        return False
    if options.level and kind == "step_log":
        level = str(payload.get("level", "")).upper()
        minimum = LEVELS.index(options.level)
        return level in LEVELS and LEVELS.index(level) >= minimum
    return True


def _server_types(types: tuple[str, ...]) -> tuple[str, ...]:
    """The outcome is needed for the exit code: ``run_complete`` is always asked for."""
    return (*types, "run_complete") if types and "run_complete" not in types else types


# -- the live view ---------------------------------------------------------------------------
def _parse_ts(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}s" if value < 60 else f"{value / 60:.1f}m"


@dataclass
class StepState:
    step_id: str
    layer: int | None
    status: str = "running"
    started: float | None = None  # epoch seconds, from the event's ts
    duration: float | None = None
    attempt: int = 1
    error: str | None = None
    child_run_id: str | None = None  # a subflow run: a step with a stream of its own


@dataclass
class RunView:
    """A run as its events describe it; ``rich`` renders it on every refresh.

    Layers come from ``run_start.layers`` or ``step_start.layer``. A plain Prefect flow has
    neither, so a step's layer is inferred: one past the deepest step that had finished when it
    started, which draws a fan-out/fan-in flow as the diamond it is.
    """

    run_id: str
    flow_name: str | None = None
    run_name: str | None = None
    layers: list[list[str]] = field(default_factory=list)
    steps: dict[str, StepState] = field(default_factory=dict)
    status: str = "waiting"
    started: float | None = None
    duration: float | None = None
    error: str | None = None
    logs: int = 0
    waiting_for: str | None = None  # Prefect's state of a run that has not started (hello)

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        payload = event.get("payload") or {}
        ts = _parse_ts(event.get("ts"))
        if kind == "run_start":
            self.flow_name = payload.get("flowName")
            self.run_name = payload.get("flowRunName")
            self.status, self.started = "running", ts
            layers = payload.get("layers")
            if isinstance(layers, list):
                self.layers = [
                    [str(s) for s in layer] for layer in layers if isinstance(layer, list)
                ]
        elif kind == "step_start":
            step_id = str(payload.get("stepId"))
            layer = payload.get("layer")
            if not isinstance(layer, int):
                layer = self._layer_of(step_id)
            self.steps[step_id] = StepState(
                step_id,
                layer,
                started=ts,
                attempt=int(payload.get("attempt") or 1),
                child_run_id=_child_of(payload),
            )
            if self.status == "waiting":
                self.status = "running"
        elif kind == "step_complete":
            step_id = str(payload.get("stepId"))
            step = self.steps.get(step_id) or StepState(step_id, self._layer_of(step_id))
            step.status = str(payload.get("status"))
            duration = payload.get("duration")
            step.duration = float(duration) if isinstance(duration, int | float) else None
            step.error = payload.get("error")
            step.child_run_id = _child_of(payload) or step.child_run_id
            self.steps[step_id] = step
        elif kind == "step_log":
            self.logs += 1
        elif kind == "run_complete":
            self.status = str(payload.get("status"))
            duration = payload.get("duration")
            self.duration = float(duration) if isinstance(duration, int | float) else None
            self.error = payload.get("error")
            for step in self.steps.values():
                if step.status == "running":  # no step_complete came: the run ended under it
                    step.status = "cancelled"

    def _layer_of(self, step_id: str) -> int:
        for index, layer in enumerate(self.layers):
            if step_id in layer:
                return index
        finished = [s.layer for s in self.steps.values() if s.status != "running"]
        return 1 + max((x for x in finished if x is not None), default=-1)

    def total_steps(self) -> int:
        declared = {s for layer in self.layers for s in layer}
        return len(declared | set(self.steps))

    def finished_steps(self) -> int:
        return sum(1 for s in self.steps.values() if s.status != "running")

    def grouped(self) -> list[tuple[int, list[tuple[str, StepState | None]]]]:
        """Layer index -> its steps (declared ones not started yet as ``None``), in order."""
        groups: dict[int, list[tuple[str, StepState | None]]] = {}
        for index, layer in enumerate(self.layers):
            groups[index] = [(s, self.steps.get(s)) for s in layer]
        declared = {s for layer in self.layers for s in layer}
        for step in self.steps.values():
            if step.step_id not in declared:
                groups.setdefault(step.layer or 0, []).append((step.step_id, step))
        return sorted(groups.items())

    def __rich__(self) -> RenderableType:
        now = time.time()
        title = Text()
        title.append(f"{self.flow_name or 'run'} ", style="bold magenta")
        if self.run_name:
            title.append(f"({self.run_name}) ", style="magenta")
        title.append(self.status, style="bold " + STATUS_STYLES.get(self.status, "cyan"))
        if self.status == "waiting" and self.waiting_for:
            title.append(f" for the run to start (Prefect state: {self.waiting_for})", style="cyan")
        elapsed = self.duration
        if elapsed is None and self.started is not None:
            elapsed = max(0.0, now - self.started)
        if elapsed is not None:
            title.append(f"  {_seconds(elapsed)}", style="dim")
        title.append(f"  {self.run_id}", style="dim")

        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        table.add_column("layer", justify="right", style="dim")
        table.add_column("", width=2)
        table.add_column("step")
        table.add_column("status")
        table.add_column("time", justify="right")
        for index, members in self.grouped():
            for position, (step_id, step) in enumerate(members):
                label = str(index) if position == 0 else ""
                if step is None:
                    table.add_row(
                        label,
                        Text("·", style="dim"),
                        Text(step_id, style="dim"),
                        Text("pending", style="dim"),
                        "",
                    )
                    continue
                if step.status == "running":
                    icon: RenderableType = Spinner("dots", style="blue")
                    running = now - step.started if step.started is not None else None
                    timing = Text(_seconds(running), style="blue")
                else:
                    icon = Text(
                        "✔" if step.status == "completed" else "✘",
                        style=STATUS_STYLES.get(step.status, ""),
                    )
                    timing = Text(_seconds(step.duration))
                status = Text(step.status, style=STATUS_STYLES.get(step.status, "blue"))
                if step.attempt > 1:
                    status.append(f" (attempt {step.attempt})", style="dim")
                name = Text(step_id, style="bold")
                if step.child_run_id:
                    name.append(f" → subflow {step.child_run_id}", style="dim")
                table.add_row(label, icon, name, status, timing)

        total, finished = self.total_steps(), self.finished_steps()
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(total, 1), completed=finished, width=30),
            Text(f"{finished}/{total} steps finished · {self.logs} log lines", style="dim"),
        )
        parts: list[RenderableType] = [title, table, bar]
        if self.error:
            parts.append(Text(str(self.error), style="red"))
        return Group(*parts)


def _child_of(payload: dict[str, Any]) -> str | None:
    """The subflow run id a step carries, if it is a subflow run (``childRunId``)."""
    child = payload.get("childRunId")
    return canonical_run_id(child) if isinstance(child, str) else None


def waiting_message(hello: dict[str, Any]) -> str | None:
    """What to show while the server holds the stream for a run that has not started."""
    state = hello.get("waiting")
    if not isinstance(state, str):
        return None
    return f"waiting for the run to start (Prefect state: {state[:40]})"


def _log_line(event: dict[str, Any]) -> Text | None:
    """What scrolls above the live view: logs, failures and the end of the run."""
    kind = event.get("type")
    payload = event.get("payload") or {}
    if kind in ("step_log", "run_start", "run_complete"):
        return render_event(event)
    if kind == "step_start" and _child_of(payload):
        return render_event(event)
    if kind == "step_complete" and payload.get("status") != "completed":
        return render_event(event)
    return None


def exit_code_for(status: str | None) -> int:
    if status is None:
        return EXIT_STREAM_ERROR
    return EXIT_COMPLETED if status == "completed" else EXIT_RUN_FAILED


async def run_tail(
    options: TailOptions,
    *,
    console: Console | None = None,
    stdout: TextIO | None = None,
    stderr: Console | None = None,
) -> int:
    """Follow the run until ``run_complete``; return the process exit code."""
    out = stdout or sys.stdout
    err = stderr or Console(stderr=True, highlight=False, soft_wrap=True)
    final_status: str | None = None

    def reconnecting(code: int, reason: str) -> None:
        err.print(f"[dim]stream interrupted ({code} {reason}); reconnecting...[/]")

    view = RunView(options.run_id)
    said_waiting = False

    def greeted(hello: dict[str, Any]) -> None:
        nonlocal said_waiting
        message = waiting_message(hello)
        if message is not None and not said_waiting:
            said_waiting = True  # once, not on every reconnect
            view.waiting_for = str(hello["waiting"])[:40]
            err.print(Text(f"{message}...", style="cyan"))

    def reset(last_seq: int) -> None:
        err.print(
            f"[yellow]the server lost this run's history: lines after seq {last_seq} may be "
            "missing; following the run's new history from its start[/]"
        )

    stream = follow_messages(
        options.base_url,
        options.run_id,
        since=options.since,
        types=_server_types(options.types),
        steps=options.steps,
        level=options.level,
        wait=options.wait,
        token=options.token,
        connect_retries=2,
        on_reconnect=reconnecting,
        on_reset=reset,
        on_hello=greeted,
    )
    try:
        if options.json:
            async for text, event in stream:
                if not wanted(event, options):
                    continue
                out.write(text + "\n")
                out.flush()
                if event.get("type") == "run_complete":
                    final_status = str((event.get("payload") or {}).get("status"))
        else:
            final_status = await _live(options, stream, console or Console(highlight=False), view)
    except StreamError as exc:
        err.print(f"[red]prefect-ws tail: {_explain(exc)}[/]", highlight=False)
        return EXIT_STREAM_ERROR
    if final_status is None:
        err.print("[red]prefect-ws tail: the stream ended without run_complete[/]")
    return exit_code_for(final_status)


async def _live(options: TailOptions, stream: Any, console: Console, view: RunView) -> str | None:
    """The live view, started with the first event: a refused stream shows only its reason."""
    from rich.live import Live

    final_status: str | None = None
    live: Live | None = None
    try:
        async for _, event in stream:
            if not wanted(event, options):
                continue
            if live is None:
                live = Live(view, console=console, refresh_per_second=8, transient=False)
                live.start()
            view.apply(event)
            line = _log_line(event)
            if line is not None:
                live.console.print(line)
            if event.get("type") == "run_complete":
                final_status = view.status
            live.refresh()
    finally:
        if live is not None:
            live.stop()
            if not console.is_terminal:
                console.line()  # piped output: end the final view's last line
    return final_status


def _explain(exc: StreamError) -> str:
    if exc.status in (401, 403) or exc.code in (1008, 4401, 4403):
        return f"access refused: {exc.reason} (pass a valid --token or set PREFECT_WS_TOKEN)"
    if exc.status == 404 or exc.code == 4404:
        if "did not start" in exc.reason:
            return exc.reason.replace("run did", "the run did", 1)
        return (
            "unknown run: the server has no events for it (yet); use --wait SECONDS to wait for it"
        )
    return str(exc)


def tail(options: TailOptions) -> int:
    """Blocking entry point for the CLI."""
    try:
        return asyncio.run(run_tail(options))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


__all__ = [
    "EXIT_COMPLETED",
    "EXIT_RUN_FAILED",
    "EXIT_STREAM_ERROR",
    "EXIT_USAGE",
    "RunView",
    "TailOptions",
    "run_tail",
    "tail",
]
