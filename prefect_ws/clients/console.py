"""Terminal rendering of events, shared by ``prefect-ws demo`` and ``prefect-ws tail``."""

from __future__ import annotations

from typing import Any

from rich.text import Text

LEVEL_STYLES = {
    "DEBUG": "dim",
    "INFO": "cyan",
    "WARNING": "yellow",
    "ERROR": "bold red",
    "CRITICAL": "bold white on red",
}
STATUS_STYLES = {
    "completed": "green",
    "failed": "bold red",
    "skipped": "yellow",
    "cancelled": "yellow",
    "crashed": "bold red",
}


def _seconds(value: Any) -> str:
    return f"{value:.2f}s" if isinstance(value, int | float) else "?"


def render_event(event: dict[str, Any]) -> Text:
    """One line (or a few, for multi-line logs) describing an event."""
    payload = event.get("payload") or {}
    kind = event.get("type")
    clock = str(event.get("ts", ""))[11:23]
    line = Text(f"{clock} ", style="dim")
    line.append(f"#{event.get('seq', '?'):<4} ", style="dim")
    if kind == "run_start":
        line.append("▶ run started ", style="bold")
        line.append(f"{payload.get('flowName')} ", style="bold magenta")
        line.append(f"({payload.get('flowRunName')})", style="magenta")
        if payload.get("layers"):
            line.append(f"  layers: {payload['layers']}", style="dim")
    elif kind == "step_start":
        line.append("  ● ", style="blue")
        line.append(str(payload.get("stepId")), style="bold blue")
        attempt = payload.get("attempt") or 1
        line.append(" started" + (f" (attempt {attempt})" if attempt > 1 else ""))
        if payload.get("childRunId"):
            line.append(f"  subflow run {payload['childRunId']}", style="dim")
    elif kind == "step_log":
        level = str(payload.get("level", "INFO"))
        line.append(f"    {level:<7} ", style=LEVEL_STYLES.get(level, ""))
        line.append(f"[{payload.get('stepId') or 'flow'}] ", style="blue")
        line.append(str(payload.get("message", "")))
    elif kind == "step_complete":
        status = str(payload.get("status"))
        style = STATUS_STYLES.get(status, "")
        line.append("  ✔ " if status == "completed" else "  ✘ ", style=style)
        line.append(str(payload.get("stepId")), style="bold " + style)
        line.append(f" {status} in {_seconds(payload.get('duration'))}", style=style)
        if payload.get("error"):
            line.append(f": {payload['error']}", style="red")
    elif kind == "run_complete":
        status = str(payload.get("status"))
        style = STATUS_STYLES.get(status, "")
        line.append(f"■ run {status}", style="bold " + style)
        line.append(f" in {_seconds(payload.get('duration'))}")
        steps = payload.get("steps") or {}
        counts = ", ".join(f"{n} {s}" for s, n in steps.items() if n)
        if counts:
            line.append(f"  steps: {counts}", style="dim")
        if payload.get("error"):
            line.append(f"\n  {payload['error']}", style="red")
    else:
        line.append(str(event))
    return line
