"""The broadcast logger's log half: a ``logging.Handler`` on Prefect's run loggers.

It sits beside Prefect's own handlers (console, API), so both keep working. It turns records
that carry a ``flow_run_id`` (what ``get_run_logger()`` and ``log_prints=True`` produce) into
``step_log`` events, skipping Prefect's engine chatter unless asked. Kept import-light: Prefect
may load it from a logging config file while ``prefect`` itself is still importing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

RUN_LOGGERS: Final = ("prefect.flow_runs", "prefect.task_runs")
# Lines such as "Beginning flow run ...", "Running hook ...", "Finished in state Completed()"
# come from these modules; user code never does.
ENGINE_MODULES: Final = frozenset({"flow_engine", "task_engine", "engine", "_hook_runner"})


class PrefectWsHandler(logging.Handler):
    """Publishes run log records as ``step_log`` events; costs microseconds per call."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._lifecycle: tuple[Callable[[], Any], Callable[[str, str, Any], Any]] | None = None

    def handle(self, record: logging.LogRecord) -> bool:
        # The publisher's deque is thread-safe: skip logging's per-handler lock.
        if self.filter(record):
            self.emit(record)
            return True
        return False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            attributes = record.__dict__
            run_id = attributes.get("flow_run_id")
            if not run_id:
                return
            if self._lifecycle is None:  # imported on first use: this module must stay light
                from prefect_ws.publish.lifecycle import step_id_for as step_id_of_run
                from prefect_ws.publish.publisher import get_publisher as publisher_of_process

                self._lifecycle = (publisher_of_process, step_id_of_run)
            get_publisher, step_id_for = self._lifecycle
            publisher = get_publisher()
            if record.module in ENGINE_MODULES and not publisher.settings.include_engine_logs:
                return
            message = record.getMessage()
            if record.exc_info:
                message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
            task_run_id = attributes.get("task_run_id")
            step_id = attributes.get("task_run_name")
            if task_run_id:
                task_run_id = str(task_run_id)
                step_id = step_id_for(str(run_id), task_run_id, step_id)
            publisher.emit(
                str(run_id),
                "step_log",
                {
                    "stepId": step_id,
                    "taskRunId": task_run_id or None,
                    "level": record.levelname,
                    "message": message,
                    "logger": record.name,
                },
                record.created,
            )
        except Exception:
            self.handleError(record)


_OUR_HOOKS: Final = "'prefect_ws_"  # every hook of ours is named prefect_ws_*


def _not_about_our_hooks(record: logging.LogRecord) -> bool:
    """Drop Prefect's "Running hook '...'" / "Hook '...' finished" lines about our own hooks.

    Prefect logs two INFO lines around every hook call, through every handler (console, API):
    for our hooks that is four lines of plumbing per step, and most of a small step's overhead
    (measured in docs/benchmarks.md). Lines about the user's own hooks stay.
    """
    message = record.msg
    return not (
        isinstance(message, str)
        and message.startswith(("Running hook '", "Hook '"))
        and _OUR_HOOKS in message
    )


def install_log_handler() -> PrefectWsHandler:
    """Attach one handler to Prefect's run loggers (idempotent).

    Must run after Prefect has configured logging (``prefect.main`` imported): its
    ``dictConfig`` replaces the handlers of the loggers it names.
    """
    handler: PrefectWsHandler | None = None
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _not_about_our_hooks not in logger.filters:
            logger.addFilter(_not_about_our_hooks)
        existing = next((h for h in logger.handlers if isinstance(h, PrefectWsHandler)), None)
        if existing is None:
            handler = handler or PrefectWsHandler()
            logger.addHandler(handler)
        else:
            handler = handler or existing
    assert handler is not None
    return handler
