"""What each worker process of ``prefect-ws serve --workers N`` imports, by name.

uvicorn spawns every worker as a fresh interpreter and can only name what it should load, so
the app factory and the HTTP protocol class live here, built from the settings in the
environment the command prepared. Only worker processes import this module.
"""

from __future__ import annotations

from starlette.applications import Starlette

from prefect_ws.server.app import create_app
from prefect_ws.server.security.guard import handshake_timeout_protocol
from prefect_ws.settings import get_settings

# h11 with a deadline for request headers (slowloris): prefect_ws.server.security.guard
HttpProtocol = handshake_timeout_protocol(get_settings().handshake_timeout)


def create_worker_app() -> Starlette:
    """The app of one worker: its own hub and subscriptions, the shared backend behind it."""
    return create_app(get_settings())
