"""The logging handler's public import path, kept for logging configuration files.

``prefect_ws.log_handler.PrefectWsHandler`` is what users name in their own ``logging.yml``;
the handler lives in :mod:`prefect_ws.publish.log_handler`.
"""

from prefect_ws.publish.log_handler import PrefectWsHandler, install_log_handler

__all__ = ["PrefectWsHandler", "install_log_handler"]
