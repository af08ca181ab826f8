"""Zero-code mode: a ``prefect.plugins`` entry point.

With ``PREFECT_PLUGINS_ENABLED=true``, Prefect calls :func:`setup_environment` at
``import prefect``. A handler added at that moment would be wiped by Prefect's own logging
setup, so instead we point ``PREFECT_LOGGING_CONFIG_PATH`` at a packaged copy of Prefect's
default logging config that adds the prefect-ws handler. Every flow run in the environment (and
its child processes, which inherit the variable) then streams its logs with no code change.
Lifecycle events still need the hooks (``prefect_ws.flow`` / ``prefect_ws.task``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect._internal.plugins.manager import register_hook
from prefect._internal.plugins.spec import SetupResult

PREFECT_PLUGIN_API_REQUIRES = ">=0.1,<1"
LOGGING_CONFIG = Path(__file__).with_name("logging.yml")
_CONFIG_VARIABLES = ("PREFECT_LOGGING_CONFIG_PATH", "PREFECT_LOGGING_SETTINGS_PATH")


@register_hook
def setup_environment(*, ctx: Any) -> SetupResult | None:
    for variable in _CONFIG_VARIABLES:
        if os.environ.get(variable):
            return SetupResult(
                env={},
                note=f"prefect-ws: {variable} is set; add prefect_ws.log_handler.PrefectWsHandler "
                "to prefect.flow_runs and prefect.task_runs in that file to stream logs",
            )
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    if (home / "logging.yml").exists():
        return SetupResult(
            env={},
            note=f"prefect-ws: {home / 'logging.yml'} exists; add the prefect-ws handler to it",
        )
    return SetupResult(
        env={"PREFECT_LOGGING_CONFIG_PATH": str(LOGGING_CONFIG)},
        note="prefect-ws: run logs stream through the prefect-ws handler",
    )
