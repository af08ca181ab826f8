"""What each worker process of ``prefect-ws serve --workers N`` imports, by name.

uvicorn spawns every worker as a fresh interpreter and can only name what it should load, so
the app factory and the protocol classes live here, built from the settings in the
environment the command prepared. Only worker processes import this module.
"""

from __future__ import annotations

from starlette.applications import Starlette

from prefect_ws.server.app import create_app
from prefect_ws.server.gctuning import tune_for_serving
from prefect_ws.server.uvicorn import logs
from prefect_ws.server.uvicorn.config import protocol_classes
from prefect_ws.settings import get_settings

logs.install()  # the filters of uvicorn's loggers, in this process too
HttpProtocol, WebSocketProtocol = protocol_classes(get_settings())


def create_worker_app() -> Starlette:
    """The app of one worker: its own hub and subscriptions, the shared backend behind it."""
    tune_for_serving()  # a worker is a serving process of its own
    return create_app(get_settings())
