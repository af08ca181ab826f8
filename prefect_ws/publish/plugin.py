"""Zero-code mode: a ``prefect.plugins`` entry point.

With ``PREFECT_PLUGINS_ENABLED=true``, Prefect calls :func:`setup_environment` at
``import prefect``. Whether Prefect's logging is configured before or after that moment has
varied, so we cover both: we point ``PREFECT_LOGGING_CONFIG_PATH`` at a packaged copy of
Prefect's default logging config that adds the prefect-ws handler (used when logging is set up
afterwards, and inherited by child processes), and we attach the handler to the run loggers now
(kept when logging was already set up: Prefect 3.9.1 then only re-applies levels). Every flow
run in the environment then streams its logs with no code change. The lifecycle events
(``run_start``, ``step_start``, ``step_complete``, ``run_complete``) come from the engine watch
(:mod:`.engine_watch`), installed here too, so a flow with plain ``@flow``/``@task`` streams
completely.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect.plugins import SetupResult, register_hook

from prefect_ws.publish.log_handler import install_log_handler

PREFECT_PLUGIN_API_REQUIRES = ">=0.1,<1"
LOGGING_CONFIG = Path(__file__).with_name("logging.yml")
_CONFIG_VARIABLES = ("PREFECT_LOGGING_CONFIG_PATH", "PREFECT_LOGGING_SETTINGS_PATH")


@register_hook
def setup_environment(*, ctx: Any) -> SetupResult | None:
    from prefect_ws.publish import engine_watch

    engine_watch.install()
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
    install_log_handler()
    return SetupResult(
        env={"PREFECT_LOGGING_CONFIG_PATH": str(LOGGING_CONFIG)},
        note="prefect-ws: run logs stream through the prefect-ws handler",
    )
