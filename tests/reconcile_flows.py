"""Flows for the reconciliation tests: runs that a test kills, cancels or lets finish."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger, task

import prefect_ws


@prefect_ws.task(task_run_name="work")
def work(seconds: float) -> int:
    get_run_logger().info("work started")
    time.sleep(seconds)
    return 1


@prefect_ws.flow(name="reconcile-hooked")
def hooked_sleeper(seconds: float = 60.0) -> int:
    """Streams run_start and step_start through its hooks, then sleeps until stopped."""
    return work(seconds)


@task(task_run_name="plain-work")
def plain_work(seconds: float, pid_file: str) -> int:
    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    get_run_logger().info("plain work started")
    time.sleep(seconds)
    return 1


@flow(name="reconcile-plain")
def plain_sleeper(seconds: float = 0.0, pid_file: str = "") -> int:
    """No prefect-ws code: its stream ends only through reconciliation (or the plugin)."""
    return plain_work(seconds, pid_file)
