"""A flow for the delivery fault tests: long enough to kill Redis while it runs."""

from __future__ import annotations

import time

from prefect import get_run_logger

import prefect_ws


@prefect_ws.task(task_run_name="chatty")
def chatty(lines: int, pause: float) -> int:
    logger = get_run_logger()
    for i in range(lines):
        logger.info("chatty line %d", i)
        if i % 10 == 9:
            time.sleep(pause)
    return lines


@prefect_ws.flow(name="delivery-chatty")
def chatty_flow(lines: int = 400, pause: float = 0.1) -> int:
    """One step logging ``lines`` lines over about ``lines / 10 * pause`` seconds."""
    get_run_logger().info("chatty flow starts")
    return chatty.submit(lines, pause).result()
