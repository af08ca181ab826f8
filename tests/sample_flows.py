"""Flows the tests run, in the test process or in a separate one (see run_flow.py)."""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.task_runners import ProcessPoolTaskRunner

import prefect_ws


@prefect_ws.task(task_run_name="prepare")
def prepare() -> int:
    logger = get_run_logger()
    logger.info("prepare line 1")
    logger.info("prepare line 2")
    return 3


@prefect_ws.task(task_run_name="left")
def left(n: int) -> int:
    logger = get_run_logger()
    for i in range(n):
        logger.info("left line %d", i)
        time.sleep(0.1)
    return n


@prefect_ws.task(task_run_name="right", log_prints=True)
def right(n: int, fail: bool = False) -> int:
    for i in range(n):
        print(f"right print {i}")
        time.sleep(0.1)
    if fail:
        raise ValueError("right exploded")
    return n * 10


@prefect_ws.task(task_run_name="finish")
def finish(a: int, b: int) -> int:
    get_run_logger().warning("finish warning: %d", a + b)
    return a + b


@prefect_ws.flow(name="spine-four-steps")
def four_steps(fail: bool = False) -> int:
    """prepare -> (left, right concurrently) -> finish."""
    get_run_logger().info("flow says hello")
    prepared = prepare.submit()
    a = left.submit(prepared)
    b = right.submit(prepared, fail)
    return finish.submit(a, b).result()


# Expected step logs of a successful four_steps run, in per-step order.
FOUR_STEPS_LOGS = {
    None: ["flow says hello"],
    "prepare": ["prepare line 1", "prepare line 2"],
    "left": ["left line 0", "left line 1", "left line 2"],
    "right": ["right print 0", "right print 1", "right print 2"],
    "finish": ["finish warning: 33"],
}


@prefect_ws.task(task_run_name="pooled-{i}")
def pooled(i: int) -> int:
    get_run_logger().info("pooled step %d says hello", i)
    return i * 2


@prefect_ws.flow(name="spine-process-pool", task_runner=ProcessPoolTaskRunner(max_workers=2))
def process_pool_steps() -> int:
    """Three steps run in worker processes, which import this module but run no flow."""
    return sum(future.result() for future in pooled.map(range(3)))
