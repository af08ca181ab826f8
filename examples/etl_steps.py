"""Python steps of the example workflows (diamond.yaml, failing.yaml).

``prefect-ws run examples/diamond.yaml`` puts this folder first on ``sys.path``, so the workflow
refers to these functions as ``etl_steps:<name>``. A function gets its step's ``params`` as
keyword arguments, each upstream step's result as the argument named after that step, and any
workflow parameter it names.
"""

from __future__ import annotations

import time

from prefect import get_run_logger


def extract(rows: int) -> list[dict[str, int]]:
    """Read ``rows`` records from a (pretend) source."""
    logger = get_run_logger()
    logger.info("extracting %d rows", rows)
    records = [{"id": i, "value": (i * 37) % 101} for i in range(rows)]
    logger.info("extracted %d rows", len(records))
    return records


def transform_sum(extract: list[dict[str, int]], seconds: float = 1.0) -> int:
    """Total of all values (runs in parallel with transform_max)."""
    logger = get_run_logger()
    logger.info("summing %d values", len(extract))
    time.sleep(seconds)
    total = sum(r["value"] for r in extract)
    logger.info("sum is %d", total)
    return total


def transform_max(extract: list[dict[str, int]], seconds: float = 1.0) -> int:
    """Largest value (runs in parallel with transform_sum)."""
    print(f"scanning {len(extract)} values for the maximum")  # print() is streamed too
    time.sleep(seconds)
    peak = max(r["value"] for r in extract)
    print(f"maximum is {peak}")
    return peak


def load(transform_sum: int, transform_max: int, target: str) -> str:
    """Write the results to ``target`` (a workflow parameter)."""
    summary = f"total={transform_sum} peak={transform_max}"
    get_run_logger().info("loading %s into %s", summary, target)
    return summary


def validate(extract: list[dict[str, int]], max_value: int) -> int:
    """Fail when a value is above ``max_value``: the halfway failure of failing.yaml."""
    logger = get_run_logger()
    bad = [r["id"] for r in extract if r["value"] > max_value]
    logger.info("checked %d rows against max_value=%d", len(extract), max_value)
    if bad:
        raise ValueError(f"{len(bad)} row(s) above {max_value}")
    return len(extract)


def archive(extract: list[dict[str, int]]) -> int:
    """An independent branch: it runs to completion even though validate failed."""
    time.sleep(0.2)
    get_run_logger().info("archived %d rows", len(extract))
    return len(extract)


def report(validate: int) -> str:
    """Never runs in failing.yaml: its upstream fails."""
    return f"{validate} rows valid"
