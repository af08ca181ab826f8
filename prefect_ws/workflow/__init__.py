"""The workflow runner: YAML/JSON/Python DAG definitions run as Prefect flows, streamed live.

See docs/workflows.md. Import cost: Prefect (the runner builds Prefect flows and tasks).
"""

from typing import TYPE_CHECKING, Any

from prefect_ws.workflow.loader import load_workflow, parse_param_assignments
from prefect_ws.workflow.model import Problem, Step, Workflow, WorkflowError
from prefect_ws.workflow.runner import (
    WorkflowFailed,
    WorkflowRun,
    make_flow,
    run_workflow,
    runner_flow,
)

if TYPE_CHECKING:
    from prefect import Flow

    workflow_flow: Flow[..., Any]


def __getattr__(name: str) -> Any:
    # The deployable runner (``flows/workflow.py``), built on first use: see runner_flow.
    if name == "workflow_flow":
        return runner_flow()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Problem",
    "Step",
    "Workflow",
    "WorkflowError",
    "WorkflowFailed",
    "WorkflowRun",
    "load_workflow",
    "make_flow",
    "parse_param_assignments",
    "run_workflow",
    "runner_flow",
    "workflow_flow",
]
