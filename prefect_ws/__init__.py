"""prefect-ws: stream every Prefect flow run live to WebSocket clients.

Publishing side: :func:`flow` and :func:`task` (drop-in Prefect decorators), :func:`stream`,
:func:`flow_hooks`, :func:`task_hooks`. Serving side: :func:`create_app`. Workflows (DAGs of
Python and shell steps run as Prefect flows): :func:`run_workflow`, :class:`Workflow`.
"""

from prefect_ws.protocol.events import EVENT_TYPES, Draft, Frame, encode
from prefect_ws.publish.decorators import flow, stream, task
from prefect_ws.publish.hooks import flow_hooks, task_hooks
from prefect_ws.publish.log_handler import PrefectWsHandler, install_log_handler
from prefect_ws.publish.publisher import Publisher, get_publisher
from prefect_ws.server.app import create_app
from prefect_ws.server.security.auth import mint_token
from prefect_ws.settings import Settings, get_settings
from prefect_ws.workflow import Workflow, WorkflowError, WorkflowRun, load_workflow, run_workflow

__version__ = "0.1.0"

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
