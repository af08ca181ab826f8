"""The serving process' garbage-collector tuning (``prefect-ws serve``)."""

from __future__ import annotations

import subprocess
import sys

from prefect_ws.server.gctuning import THRESHOLDS


def test_tune_for_serving_raises_the_young_generation_threshold() -> None:
    # In a child process: the tuning is process-wide and the test process keeps the defaults.
    code = (
        "import gc\n"
        "from prefect_ws.server.gctuning import tune_for_serving\n"
        "tune_for_serving()\n"
        "print(gc.get_threshold())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == str(THRESHOLDS)
