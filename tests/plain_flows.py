"""Ordinary Prefect flows that never import prefect_ws: what zero-code mode must stream.

Each leaves the happy path in one way (retries, crashes, cancellation, mapping, subflows,
async). Attempts are counted in a file so that a retried run behaves differently the next time.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import cast

from prefect import flow, get_run_logger, task
from prefect.states import Cancelled, State


def _attempt(marker: str) -> int:
    path = Path(marker)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    return attempt


@task
def square(x: int) -> int:
    get_run_logger().info("square %d", x)
    return x * x


@task
def total(values: list[int]) -> int:
    get_run_logger().info("total of %d", len(values))
    return sum(values)


@flow(name="zero-code-shapes")
def shapes() -> int:
    get_run_logger().info("shapes begin")
    squares = square.map([1, 2, 3])
    first = total(squares.result())
    second = total([first])  # a second run of the same task
    return second


@flow(name="zero-code-flaky", retries=1)
def flaky(marker: str) -> int:
    attempt = _attempt(marker)
    get_run_logger().info("flow attempt %d", attempt)
    square(attempt)
    if attempt == 1:
        raise RuntimeError("first attempt fails")
    return attempt


@task(retries=2)
def stubborn(marker: str) -> int:
    attempt = _attempt(marker)
    get_run_logger().info("task attempt %d", attempt)
    if attempt < 3:
        raise RuntimeError(f"attempt {attempt} fails")
    return attempt


@flow(name="zero-code-task-retries")
def task_retries(marker: str) -> int:
    return stubborn(marker)


class Abandon(BaseException):
    """Not an Exception: Prefect records the task run as Crashed."""


@task
def crashes() -> None:
    get_run_logger().info("about to crash")
    raise Abandon("the step's process gave up")


@task
def gives_up() -> State:
    get_run_logger().info("cancelling myself")
    return Cancelled(message="nothing to do")


@task
def after(value: int) -> int:
    return value


@flow(name="zero-code-crash-cancel")
def crash_and_cancel() -> str:
    with contextlib.suppress(Abandon):  # the flow carries on; the step has crashed
        crashes.submit().wait()
    gives_up.submit().wait()
    failed = square.submit("not a number")  # type: ignore[call-overload]
    after.submit(failed).wait()  # NotReady: its upstream failed
    return "done"


@flow(name="zero-code-child")
def child(n: int) -> int:
    get_run_logger().info("child %d", n)
    return square(n)


@flow(name="zero-code-parent")
def parent() -> int:
    get_run_logger().info("parent begins")
    return child(2) + child(3)


@task
async def double(x: int) -> int:
    await asyncio.sleep(0.05)
    get_run_logger().info("double %d", x)
    return 2 * x


@flow(name="zero-code-async")
async def async_gather() -> int:
    direct = await asyncio.gather(*(double(i) for i in range(3)))
    submitted = [double.submit(10 + i) for i in range(2)]
    later = await asyncio.gather(*(asyncio.to_thread(f.result) for f in submitted))
    return sum(cast(list[int], direct)) + sum(cast(list[int], later))
