"""The serving process' garbage-collector tuning (``prefect-ws serve``)."""

from __future__ import annotations

from helpers import python_output

from prefect_ws.server.gctuning import THRESHOLDS


def test_tune_for_serving_raises_the_young_generation_threshold() -> None:
    # In a child process: the tuning is process-wide and the test process keeps the defaults.
    code = (
        "import gc\n"
        "from prefect_ws.server.gctuning import tune_for_serving\n"
        "tune_for_serving()\n"
        "print(gc.get_threshold())\n"
    )
    assert python_output(code).strip() == str(THRESHOLDS)
