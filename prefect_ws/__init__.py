"""prefect-ws: stream every Prefect flow run live to WebSocket clients.

Publishing side: :func:`flow` and :func:`task` (drop-in Prefect decorators), :func:`stream`,
:func:`flow_hooks`, :func:`task_hooks`. Serving side: :func:`create_app`, :func:`mint_token`.
Workflows (DAGs of Python and shell steps run as Prefect flows): :func:`run_workflow`,
:class:`Workflow`.

A flow process imports this package for its decorators, so the serving side is imported only
when one of its names is first used: a flow never pays for the server's modules.
"""

from typing import TYPE_CHECKING, Any

from prefect_ws.protocol.events import EVENT_TYPES, Draft, Frame, encode
from prefect_ws.publish.decorators import flow, stream, task
from prefect_ws.publish.hooks import flow_hooks, task_hooks
from prefect_ws.publish.log_handler import PrefectWsHandler, install_log_handler
from prefect_ws.publish.publisher import Publisher, get_publisher
from prefect_ws.settings import Settings, get_settings
from prefect_ws.workflow import Workflow, WorkflowError, WorkflowRun, load_workflow, run_workflow

if TYPE_CHECKING:
    from prefect_ws.server.app import create_app
    from prefect_ws.server.security.auth import mint_token

__version__ = "0.1.0"

_SERVING_SIDE = {
    "create_app": "prefect_ws.server.app",
    "mint_token": "prefect_ws.server.security.auth",
}


def __getattr__(name: str) -> Any:
    if name in _SERVING_SIDE:
        import importlib

        return getattr(importlib.import_module(_SERVING_SIDE[name]), name)
    raise AttributeError(f"module 'prefect_ws' has no attribute {name!r}")


__all__ = [
    "EVENT_TYPES",
    "Draft",
    "Frame",
    "PrefectWsHandler",
    "Publisher",
    "Settings",
    "Workflow",
    "WorkflowError",
    "WorkflowRun",
    "create_app",
    "encode",
    "flow",
    "flow_hooks",
    "get_publisher",
    "get_settings",
    "install_log_handler",
    "load_workflow",
    "mint_token",
    "run_workflow",
    "stream",
    "task",
    "task_hooks",
]
