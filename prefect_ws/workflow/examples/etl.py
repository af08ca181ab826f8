"""Step functions of the packaged demo diamond (``prefect-ws demo``).

Each receives its upstream steps' results as arguments named after those steps.
"""

from __future__ import annotations

import random
import time

from prefect import get_run_logger


def extract(rows: int) -> list[int]:
    logger = get_run_logger()
    logger.info("connecting to the source")
    time.sleep(0.4)
    data = [random.Random(i).randint(1, 100) for i in range(rows)]
    logger.info("extracted %d rows", len(data))
    return data


def transform_sum(extract: list[int]) -> int:
    logger = get_run_logger()
    logger.debug("summing")
    for part in range(3):
        time.sleep(0.3)
        logger.info("summed part %d of 3", part + 1)
    return sum(extract)


def transform_max(extract: list[int]) -> int:
    time.sleep(0.5)
    print(f"largest value is {max(extract)}")  # steps run with log_prints: this is a step_log
    if max(extract) > 90:
        get_run_logger().warning("outlier above 90 found; keeping it")
    time.sleep(0.4)
    return max(extract)


def load(transform_sum: int, transform_max: int) -> str:
    logger = get_run_logger()
    time.sleep(0.3)
    logger.info("loaded total=%d peak=%d", transform_sum, transform_max)
    return f"total={transform_sum} peak={transform_max}"
